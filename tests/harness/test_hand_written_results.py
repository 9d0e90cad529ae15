"""The sweep harness's outputs, tried as a new user would: hand-written results
files, outputs that cannot be written, and odd command lines. Each test pins a bug found so."""

from __future__ import annotations

import os

import pytest

from benchmarks import plot
from benchmarks.results_io import write_rows
from tests.harness.test_harness_user_inputs import _one_error_line

COLUMNS = ["run_id", "label", "model", "core", "depth", "width", "seed", "test_acc", "params",
           "status"]


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


def _finished_run(run_dir, first_sha: str, resumed_sha: str | None = None):
    """A finished run directory as the trainer and the harness write it, trained at
    ``first_sha`` (and resumed at ``resumed_sha`` from epoch 2)."""
    import json

    run_dir.mkdir(parents=True)
    env = {"device": "cpu", "git_sha": first_sha, "threads": 1, "torch_version": "2.0"}
    config = {"model": "test_wt", "epochs": 2, "env": env}
    if resumed_sha:
        config["resumes"] = [{"from_epoch": 1, "env": {**env, "git_sha": resumed_sha}}]
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "spec.json").write_text(json.dumps(
        {"run_id": run_dir.name, "label": "WT", "config": {"model": "test_wt", "seed": 0}}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "test_acc": a}) + "\n" for e, a in ((1, 0.25), (2, 0.5))))
    (run_dir / "done.json").write_text(json.dumps({"test_acc": 0.5}))
    return str(run_dir)


def test_a_row_recorded_after_the_code_moved_on_keeps_the_sha_it_trained_at(tmp_path):
    # a run that finished at commit aaaa whose row was missing (killed before the append, or
    # results.csv restored) is recorded by a rerun at commit bbbb: its row said git_sha bbbb,
    # code that never trained it; and a run resumed at bbbb said git_sha bbbb while
    # resumed_with said "epoch 2-: git_sha bbbb" (the first process's is what git_sha means)
    from benchmarks.rows import assemble_row

    old, new = "aaaaaaaaaaaa", "bbbbbbbbbbbb-dirty"
    row = assemble_row(_finished_run(tmp_path / "r1", old), {"git_sha": new})
    assert (row["git_sha"], row["run_git_sha"], row["test_acc"]) == (old, old, 0.5)
    row = assemble_row(_finished_run(tmp_path / "r2", old, new), {"git_sha": new})
    assert row["git_sha"] == old and row["resumed_with"] == f"epoch 2-: git_sha {new}"
    # a custom runner's directory records no env: the harness's sha stays
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "spec.json").write_text('{"run_id": "r3", "label": "x", "config": {}}')
    (tmp_path / "r3" / "done.json").write_text('{"test_acc": 0.5}')
    assert assemble_row(str(tmp_path / "r3"), {"git_sha": new})["git_sha"] == new


def test_an_empty_sweep_out_is_refused_even_for_a_dry_run(tmp_path, capsys, monkeypatch):
    # --out "$UNSET": the dry run listed the current directory's results.csv as this sweep's
    # (exit 0), while the real run said "--out  cannot be created: No such file or directory"
    from benchmarks.results_io import append_row
    from benchmarks.run import main as run_main

    monkeypatch.chdir(tmp_path)
    append_row(tmp_path / "results.csv", {"run_id": "wt_d2_w8_s0_ef0ad1de"})
    for extra in (["--dry-run"], ["--no-plots"]):
        assert run_main(["quick", "--smoke", "--out", "", *extra]) == 2
        assert "empty" in _one_error_line(capsys, "python -m benchmarks.run")
    assert sorted(os.listdir(tmp_path)) == [".results.csv.lock", "results.csv"]


def test_a_run_id_written_twice_is_damage_not_a_second_seed(tmp_path, capsys):
    # two results files merged by hand, or a row pasted twice: the summary counted the run as
    # another seed (WT depth 2: "3 seeds, 90.0 ± 0.0" from the two runs 0.90 and 0.90), and
    # recommend averaged it in twice
    from benchmarks.recommend import main as recommend_main
    from benchmarks.results_io import finished_ids

    rows = [{"run_id": f"r{s}", "label": "WT", "depth": 2, "width": 8, "seed": s,
             "test_acc": acc, "params": 100} for s, acc in ((0, 0.9), (1, 0.5))]
    path = tmp_path / "results.csv"
    write_rows(path, [*rows, rows[1]])
    for call, prog in ((lambda: plot.main([str(tmp_path)]), "python -m benchmarks.plot"),
                       (lambda: recommend_main([str(tmp_path), "--params", "1000"]),
                        "python -m benchmarks.recommend")):
        assert call() == 2
        line = _one_error_line(capsys, prog)
        assert "r1" in line and "line 4" in line and "line 3" in line, line
    with pytest.raises(ValueError, match="r1"):
        finished_ids(path)
    write_rows(path, rows)
    assert plot.main([str(tmp_path)]) == 0
    assert "| WT | 2 | 8 | 2 | 70.0 ± 28.3 | 100 |" in capsys.readouterr().out
