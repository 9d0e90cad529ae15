"""The guideline tools: a clean configuration whose rows leave the budget column
blank (a hand-edited results file) was dropped by ``recommend`` without a word, even when it was
the most accurate; it is now listed under "not considered" with the configurations whose runs
failed before recording the budget."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from benchmarks.recommend import main, recommend
from benchmarks.results_io import read_rows

QUICK = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quick" / "results.csv"


def _blanked(label: str, depth: str) -> list[dict]:
    rows = [dict(r) for r in read_rows(QUICK)]
    for row in rows:
        if row["label"] == label and str(row["depth"]) == depth:
            row["params"] = None
    return rows


def test_blank_budget_config_is_listed_not_dropped():
    rows = _blanked("WT + distinct masks", "8")
    pick = recommend(rows, params=1e9)
    assert [(g["label"], g["depth"]) for g in pick["unmeasured"]] == [
        ("WT + distinct masks", 8)]
    assert all(not (g["label"] == "WT + distinct masks" and g["depth"] == 8)
               for g in pick["candidates"])
    assert math.isfinite(pick["best_acc"])


def test_cli_names_the_blank_budget_config(tmp_path, capsys):
    rows = _blanked("WT + distinct masks", "8")
    with open(QUICK, newline="") as f:
        header = next(csv.reader(f))
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items() if k in header}
                         for r in rows)
    assert main([str(tmp_path), "--params", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "not considered: 1 configuration(s) with no params recorded" in out
    assert "WT + distinct masks" in out.split("not considered")[1]
