"""The sweep statistics against hand-computed answers and scipy.stats oracles.

Small hand-made rows with known means / sample stds, recommend's tolerance boundary and ties,
and the README's paired t-tests recomputed with ``scipy.stats.ttest_rel`` from the committed
``results.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import re

import pytest

from benchmarks import plot
from benchmarks.recommend import recommend
from benchmarks.results_io import write_rows
from benchmarks.summary import summary_table, to_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(config, seed, acc, **extra):
    return {"run_id": f"{config}-s{seed}", "config_id": config, "label": "WT", "core": "unrolled",
            "depth": 4, "width": 16, "mask_k": 0, "seed": seed, "status": "ok",
            "test_acc": acc, "params": 1000, "train_time_s": 1.0, **extra}


def test_one_seed_has_no_std_in_summary_csv(tmp_path):
    # a sample std (n - 1) of one value is undefined: summary.csv must not claim 0 spread
    rows = [_row("a", 0, 0.8), _row("b", 0, 0.7, depth=8), _row("b", 1, 0.9, depth=8)]
    write_rows(str(tmp_path / "results.csv"), rows)
    plot.write_summary(str(tmp_path))
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = {r["config_id"]: r for r in csv.DictReader(f)}
    assert summary["a"]["test_acc_count"] == "1"
    assert summary["a"]["test_acc_std"] == ""  # was "0.0"
    assert float(summary["a"]["test_acc_mean"]) == pytest.approx(0.8)
    assert float(summary["b"]["test_acc_std"]) == pytest.approx(math.sqrt(0.02), rel=1e-12)
    assert "| 1 | 80.0 |" in (tmp_path / "summary.md").read_text()  # no "± 0.0" either


def test_diverged_and_nan_seeds_are_out_of_the_mean_and_std():
    # four runs: 0.7 and 0.9 clean, 0.1 diverged, one with a NaN accuracy -> mean 0.8,
    # sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.141421..., over 2 values
    rows = [_row("a", 0, 0.7), _row("a", 1, 0.9), _row("a", 2, 0.1, status="diverged"),
            _row("a", 3, math.nan)]
    g = summary_table(rows)[0]
    assert (g["n"], g["n_stopped"], g["n_noacc"], g["test_acc_count"]) == (4, 1, 1, 2)
    assert g["test_acc_mean"] == pytest.approx(0.8, rel=1e-12)
    assert g["test_acc_std"] == pytest.approx(0.1 * math.sqrt(2), rel=1e-12)
    line = to_markdown([g]).splitlines()[2]
    assert "80.0 ± 14.1" in line and "| 1 | 1 |" in line  # runs stopped, runs without accuracy


def test_recommend_tolerance_boundary_is_inclusive_in_points():
    # best 80.05 %; 79.55 % is exactly 0.5 points below (inclusive), 79.54 % is not
    rows = [_row("big", 0, 0.8005, params=3000),
            _row("edge", 0, 0.7955, params=2000),
            _row("out", 0, 0.7954, params=1000)]
    pick = recommend(rows, params=10_000)
    assert pick["choice"]["config_id"] == "edge"
    assert {g["config_id"] for g in pick["candidates"]} == {"big", "edge"}
    assert recommend(rows, params=10_000, tolerance=0.51)["choice"]["config_id"] == "out"
    assert recommend(rows, params=10_000, tolerance=0.0)["choice"]["config_id"] == "big"


def test_recommend_ties_break_by_cell_evals_then_width_then_masks():
    # equal accuracy and parameters: fewer cell evaluations, then narrower, then fewer masks
    rows = [_row("d8", 0, 0.9, depth=8, cell_evals=16),
            _row("d4k2", 0, 0.9, depth=4, cell_evals=8, mask_k=2, width=16),
            _row("d4k0", 0, 0.9, depth=4, cell_evals=8, mask_k=0, width=16),
            _row("d4w32", 0, 0.9, depth=4, cell_evals=8, mask_k=0, width=32)]
    assert recommend(rows, params=1000, tolerance=0.0)["choice"]["config_id"] == "d4k0"


def test_recommend_averages_seeds_before_comparing():
    # a: seeds 0.90 / 0.80 -> 85.0 %; b: 0.86 one seed -> 86.0 %: b is best, a is 1 point below
    rows = [_row("a", 0, 0.90, params=500), _row("a", 1, 0.80, params=500),
            _row("b", 0, 0.86, params=900)]
    pick = recommend(rows, params=1000)
    assert pick["best"]["config_id"] == "b" and pick["choice"]["config_id"] == "b"
    assert recommend(rows, params=1000, tolerance=1.0)["choice"]["config_id"] == "a"


def _arm(rows, label, k, density):
    return {int(r["seed"]): 100 * float(r["test_acc"]) for r in rows
            if r["label"] == label and r["mask_k"] == k and r["mask_density"] == density}


@pytest.mark.parametrize("arm, other, text", [
    (("WT + distinct masks", "8", "0.25"), ("WT", "0", ""), "t = 7.2, two-sided p = 0.02"),
    (("WT + distinct masks", "8", "0.25"), ("WT + shared mask", "1", "0.25"), "t = 3.7, p = 0.07"),
    (("WT + distinct masks", "8", "0.5"), ("WT + shared mask", "1", "0.5"), "t = 3.2, p = 0.09"),
])
def test_readme_paired_t_tests_match_scipy_on_the_committed_results(arm, other, text):
    stats = pytest.importorskip("scipy.stats")
    with open(os.path.join(ROOT, "benchmarks/results/sparsity_fashion/results.csv"),
              newline="") as f:
        rows = list(csv.DictReader(f))
    a, b = _arm(rows, *arm), _arm(rows, *other)
    assert sorted(a) == sorted(b) == [0, 1, 2]  # paired by seed, none missing
    seeds = sorted(a)
    res = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])  # two-sided
    t, p = (float(x) for x in re.findall(r"[\d.]+", text)[:1] + re.findall(r"[\d.]+$", text))
    assert round(float(res.statistic), 1) == t and round(float(res.pvalue), 2) == p
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text in " ".join(readme.split())
