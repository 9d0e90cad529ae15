"""The numbers behind the guideline curves, from hand-made results files with known
answers (grouping, seeds, recommend's listings, CSV cells, extrapolate's bad run configs)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from benchmarks.aggregate import aggregate
from benchmarks.extrapolate import main as extrapolate_main
from benchmarks.recommend import recommend
from benchmarks.results_io import read_rows, write_rows


@pytest.mark.parametrize("column, values", [
    ("mask_schedule", ("cycle", "random")),
    ("f_max_iter", (10, 30)),
    ("weight_decay", (0.0, 0.05)),
    ("image_size", (14, 28)),
])
def test_rows_without_config_id_that_differ_in_a_setting_are_two_configurations(
        tmp_path, column, values):
    # hand-written rows (no config_id) are grouped by their configuration columns: two settings
    # of mask_schedule / f_max_iter / ... are two configurations, not one mean over both
    rows = [{"run_id": f"{v}{s}", "label": "WT", "depth": 4, column: v, "seed": s,
             "test_acc": acc}
            for v, accs in zip(values, ((0.80, 0.84), (0.60, 0.70))) for s, acc in enumerate(accs)]
    write_rows(tmp_path / "results.csv", rows)
    groups = aggregate(read_rows(tmp_path / "results.csv"), ["test_acc"])
    got = {g[column]: (g["n"], g["test_acc_mean"], g["test_acc_std"]) for g in groups}
    assert got == {values[0]: (2, pytest.approx(0.82), pytest.approx(statistics.stdev((.8, .84)))),
                   values[1]: (2, pytest.approx(0.65), pytest.approx(statistics.stdev((.6, .7))))}


def test_seed_column_mixing_numbers_and_text_does_not_crash_the_grouping():
    rows = [{"config_id": "a", "seed": 1, "test_acc": 0.5},
            {"config_id": "a", "seed": "s0", "test_acc": 0.7},
            {"config_id": "a", "seed": 0, "test_acc": 0.6}]
    (group,) = aggregate(rows, ["test_acc"])
    assert group["n"] == 3 and group["test_acc_mean"] == pytest.approx(0.6)
    assert group["seeds"] == [0, 1, "s0"]


def test_numpy_floats_are_written_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    write_rows(tmp_path / "r.csv", [{"run_id": "a", "test_acc": np.float64(0.5),
                                     "params": np.int64(7), "x": np.float32(0.25)}])
    assert read_rows(tmp_path / "r.csv") == [{"run_id": "a", "test_acc": 0.5, "params": 7,
                                              "x": 0.25}]


def _diverged_early_rows():
    ok = {"label": "WT", "width": 8, "status": "ok"}
    return [
        {**ok, "run_id": "a0", "config_id": "a", "depth": 2, "params": 1000, "seed": 0,
         "test_acc": 0.9, "train_time_s": 3.0},
        # every seed stopped on non-finite losses in its first epoch: params from the model,
        # but no accuracy and no training time recorded
        {**ok, "run_id": "b0", "config_id": "b", "depth": 4, "params": 2000, "seed": 0,
         "status": "diverged"},
        {**ok, "run_id": "b1", "config_id": "b", "depth": 4, "params": 2000, "seed": 1,
         "status": "diverged"},
    ]


def test_a_configuration_that_diverged_before_recording_time_is_listed_under_a_time_budget():
    by_params = recommend(_diverged_early_rows(), params=3000)
    assert [g["config_id"] for g in by_params["unstable"]] == ["b"]
    by_time = recommend(_diverged_early_rows(), time_s=10)
    assert by_time["choice"]["config_id"] == "a"
    listed = by_time["unstable"] + by_time["unmeasured"]
    assert [g["config_id"] for g in listed] == ["b"]


def test_results_of_two_datasets_ask_for_one_in_the_callers_spelling():
    """The notebook calls recommend(); its hint named only the command line's --dataset."""
    rows = [{**r, "dataset": name} for name in ("digits", "fashion_mnist")
            for r in _diverged_early_rows()[:1]]
    with pytest.raises(ValueError, match=r"digits, fashion_mnist.*dataset=NAME.*--dataset NAME"):
        recommend(rows, params=3000)
    assert recommend(rows, params=3000, dataset="digits")["choice"]["config_id"] == "a"


def test_recommend_cli_names_the_diverged_configuration_under_a_time_budget(tmp_path):
    write_rows(tmp_path / "results.csv", _diverged_early_rows())
    out = subprocess.run([sys.executable, "-m", "benchmarks.recommend", str(tmp_path),
                          "--time", "10"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not considered" in out.stdout and "depth 4" in out.stdout
    assert "[2/2 diverged]" in out.stdout


@pytest.mark.parametrize("model_config", [None, {"core": "unrolled"}])
def test_extrapolate_a_run_config_without_a_depth_is_one_line_exit_2(
        tmp_path, capsys, model_config):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (tmp_path / "results.csv").write_text("run_id,core,status,depth\nr1,unrolled,ok,4\n")
    config = {"train": {"model": "test_wt"}, "data_info": {"num_classes": 10, "in_chans": 1}}
    if model_config is not None:
        config["model_config"] = model_config
    (run / "config.json").write_text(json.dumps(config))
    (run / "checkpoint.pt").write_bytes(b"")
    assert extrapolate_main([str(tmp_path), "--factors", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err, err


def test_extrapolate_refuses_a_run_id_on_two_rows_before_evaluating_anything(tmp_path, capsys,
                                                                             monkeypatch):
    import benchmarks.extrapolate as ex

    evaluated = []
    monkeypatch.setattr(ex, "evaluate_depths", lambda *a, **k: evaluated.append(a) or [])
    (tmp_path / "results.csv").write_text(
        "run_id,core,status,depth\nr1,unrolled,ok,4\nr2,unrolled,ok,4\nr1,unrolled,ok,4\n")
    assert extrapolate_main([str(tmp_path), "--factors", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 4" in err and "line 2" in err, err
    assert evaluated == []


def test_extrapolate_a_row_without_run_id_is_skipped_as_without_checkpoint(tmp_path):
    from benchmarks.extrapolate import extrapolate_sweep

    (tmp_path / "results.csv").write_text("core,status,depth\nunrolled,ok,4\n")
    said = []
    assert extrapolate_sweep(str(tmp_path), [1.0], echo=said.append) == 0
    assert len(said) == 1 and "checkpoint" in said[0], said


def test_an_unknown_status_is_refused_not_averaged_in_as_clean(tmp_path, capsys):
    rows = [{"run_id": "a0", "config_id": "a", "depth": 2, "params": 100, "seed": 0,
             "status": "ok", "test_acc": 0.9},
            {"run_id": "a1", "config_id": "a", "depth": 2, "params": 100, "seed": 1,
             "status": "crashed", "test_acc": 0.1}]
    with pytest.raises(ValueError, match="'crashed'.*ok, diverged, nonfinite, failed"):
        aggregate(rows, ["test_acc"])
    write_rows(tmp_path / "results.csv", rows)
    from benchmarks.recommend import main as recommend_main

    assert recommend_main([str(tmp_path), "--params", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "crashed" in err, err
    # the documented ones and an empty status are accepted; only the clean seed is averaged
    rows[1]["status"] = "diverged"
    (group,) = aggregate(rows + [{"run_id": "a2", "config_id": "a", "seed": 2,
                                  "test_acc": 0.7}], ["test_acc"])
    assert (group["n"], group["n_stopped"], group["test_acc_mean"]) == (3, 1, pytest.approx(0.8))


@pytest.mark.parametrize("status, evaluated", [("", True), ("ok", True), ("diverged", False),
                                               ("nonfinite", False)])
def test_extrapolate_takes_a_row_with_an_empty_status_as_clean(tmp_path, monkeypatch, status,
                                                                evaluated):
    # as aggregate does: an empty status (a hand-written row) is a clean run
    import benchmarks.extrapolate as ex

    seen = []
    monkeypatch.setattr(ex, "evaluate_depths", lambda run_dir, factors, device=None: seen.append(
        factors) or [{"train_depth": 4, "test_depth": 4, "factor": 1.0, "test_acc": 0.5}])
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (tmp_path / "results.csv").write_text(f"run_id,core,status,depth\nr1,unrolled,{status},4\n")
    (run / "config.json").write_text(json.dumps(
        {"train": {}, "data_info": {}, "model_config": {"core": "unrolled", "depth": 4}}))
    (run / "checkpoint.pt").write_bytes(b"")
    added = ex.extrapolate_sweep(str(tmp_path), [1.0], echo=lambda *a: None)
    assert (added, bool(seen)) == ((1, True) if evaluated else (0, False))
