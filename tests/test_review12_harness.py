"""Review 12 of the sweep harness's outputs, tried as a new user would: hand-written results
files, outputs that cannot be written, and odd command lines. Each test pins a bug found so."""

from __future__ import annotations

import os

from benchmarks import plot
from benchmarks.results_io import write_rows

COLUMNS = ["run_id", "label", "model", "core", "depth", "width", "seed", "test_acc", "params",
           "status"]


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _hand_rows():
    """No config_id column (written by hand): WT at depths 2 and 4 with seeds 0, 1, 2; untied
    at depth 2 with seed 0 only and at depth 4 with seeds 0, 1."""
    rows = []
    for label, depth, seeds in (("WT", 2, (0, 1, 2)), ("WT", 4, (0, 1, 2)),
                                ("untied", 2, (0,)), ("untied", 4, (0, 1))):
        for s in seeds:
            rows.append({"run_id": f"{label}{depth}s{s}", "label": label, "model": "wt_s",
                         "core": "unrolled", "depth": depth, "width": 8, "seed": s,
                         "test_acc": 0.5 + 0.1 * s, "params": 100, "status": "ok"})
    return rows


def test_title_counts_seeds_per_configuration_not_per_label_without_config_ids():
    # before: seeds were counted per label when the rows had no config_id, so untied's two
    # seeds at depth 4 hid that its depth-2 point is one seed: the title said "over 2–3 seeds"
    rows = _hand_rows()
    assert plot.describe_setting(rows) == "mean ± 1 sample std (n − 1) over 1–3 seeds"
    fig = plot.plot_accuracy_vs_depth(rows)
    assert fig._suptitle.get_text().endswith("over 1–3 seeds")


def test_plot_into_a_sweep_whose_outputs_cannot_be_written_is_one_line(tmp_path, capsys):
    # a read-only sweep directory (someone else's results), here a file where plots/ goes:
    # before, a FileExistsError / PermissionError traceback
    write_rows(tmp_path / "results.csv", _hand_rows(), COLUMNS)
    (tmp_path / "plots").write_text("not a folder")
    assert plot.main([str(tmp_path)]) == 2
    line = _one_error_line(capsys, "python -m benchmarks.plot")
    assert "plots" in line and "cannot write" in line, line
    (tmp_path / "plots").unlink()
    (tmp_path / "summary.csv").mkdir()
    assert plot.main([str(tmp_path)]) == 2
    line = _one_error_line(capsys, "python -m benchmarks.plot")
    assert "summary.csv" in line and "cannot write" in line, line
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]  # no temporary file left
    (tmp_path / "summary.csv").rmdir()
    (tmp_path / "plots" / "accuracy_vs_depth.png").unlink()
    (tmp_path / "plots" / "accuracy_vs_depth.png").mkdir()  # a figure's own name taken
    assert plot.main([str(tmp_path)]) == 2
    line = _one_error_line(capsys, "python -m benchmarks.plot")
    assert "accuracy_vs_depth.png" in line and "cannot write" in line, line
    assert not [n for n in os.listdir(tmp_path / "plots") if "tmp" in n]  # before: left
