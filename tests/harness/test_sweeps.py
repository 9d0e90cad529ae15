"""Sweeps with the real trainer at smoke size: rows, reruns, kills, failures, launchers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import wtmodels as wt
from benchmarks import presets
from benchmarks.presets import Preset, Variant, build_runs
from benchmarks.results_io import read_rows, write_rows
from benchmarks.run import RESULTS, run_dir_of, sweep

# tests/, where benchmark_fakes.py is
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_COLUMNS = ("run_id", "model", "dataset", "depth", "width", "mask_k", "mask_density",
                  "seed", "test_acc", "best_test_acc", "epoch_time_s", "images_per_s",
                  "peak_mem_mb", "params", "git_sha", "torch_version", "device")
TINY = {"dataset": "digits", "train_size": 64, "test_size": 32, "batch_size": 32, "epochs": 1}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def quick_d2(tmp_path_factory):
    """The quick preset's depth-2 runs at smoke size, by the command line, two at a time."""
    out = tmp_path_factory.mktemp("sweep") / "quick"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "quick", "--smoke", "--out",
                           str(out), "--only", "_d2_", "--jobs", "2", "--device", "cpu"],
                          capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_sweep_writes_one_complete_row_per_run(quick_d2):
    out, stdout = quick_d2
    expected = [r for r in build_runs("quick", smoke=True) if "_d2_" in r.run_id]
    rows = read_rows(out / RESULTS)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in expected)
    for row in rows:
        for column in DESIGN_COLUMNS:
            assert column in row
            assert row[column] is not None or column == "mask_density", column
        assert 0.0 <= row["test_acc"] <= row["best_test_acc"] <= 1.0
        assert row["device"] == "cpu" and row["threads"] == 1 and row["status"] == "ok"
        assert row["epochs_done"] == row["epochs"] == 1
        assert row["torch_version"] == torch.__version__
    by_label = {r["label"]: r for r in rows}
    assert by_label["WT + distinct masks"]["mask_k"] == 2
    assert by_label["WT"]["mask_k"] == 0 and by_label["WT"]["mask_density"] is None
    # known answer: the trainable parameters of the model the run trained
    model = wt.create_model("test_untied", num_classes=10, in_chans=1, depth=2, width=8)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert by_label["untied"]["params"] == params
    tied = wt.create_model("test_wt", num_classes=10, in_chans=1, depth=2, width=8)
    assert by_label["WT"]["params"] == sum(p.numel() for p in tied.parameters())
    assert by_label["WT + distinct masks"]["params"] == by_label["WT"]["params"]
    assert "harness" in stdout and "% of the runs" in stdout


def test_sweep_ends_with_plots_summary_and_extrapolation(quick_d2):
    out, stdout = quick_d2
    assert "| label |" in stdout  # the summary table is printed
    for name in ("summary.csv", "summary.md", "machine.json", "harness_timing.json"):
        assert (out / name).is_file(), name
    pngs = sorted(p for p in os.listdir(out / "plots") if p.endswith(".png"))
    assert "capacity.png" in pngs and "extrapolation.png" in pngs
    for png in pngs:
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pdf = out / "plots" / png.replace(".png", ".pdf")  # the vector copy beside it
        assert pdf.read_bytes()[:5] == b"%PDF-"
    # extrapolation: the tied runs (not the untied one) at test depths 1..4; at the trained
    # depth the accuracy is the run's own final test accuracy (same checkpoint, same test set)
    results = {r["run_id"]: r for r in read_rows(out / RESULTS)}
    extra = read_rows(out / "extrapolation.csv")
    assert {r["label"] for r in extra} == {"WT", "WT + distinct masks"}
    assert sorted({r["test_depth"] for r in extra}) == [1, 2, 3, 4]
    for r in extra:
        if r["test_depth"] == r["train_depth"]:
            assert r["test_acc"] == pytest.approx(results[r["run_id"]]["test_acc"], abs=1e-9)


def test_extrapolation_rebuilds_the_model_from_its_saved_settings(quick_d2, monkeypatch):
    from benchmarks.extrapolate import load_trained_model
    from wtmodels import models as model_registry

    out, _ = quick_d2
    run_id = next(r["run_id"] for r in read_rows(out / RESULTS) if r["label"] == "WT")
    original = model_registry._REGISTRY["test_wt"]
    # a later edit of the registry (a setting the run did not override) must not reach it
    monkeypatch.setitem(model_registry._REGISTRY, "test_wt",
                        lambda: {**original(), "norm_groups": 1})
    model, config = load_trained_model(run_dir_of(str(out), run_id))
    assert config["model_config"]["norm_groups"] != 1
    assert all(m.num_groups == config["model_config"]["norm_groups"]
               for m in model.modules() if isinstance(m, torch.nn.GroupNorm))


def test_extrapolation_names_a_damaged_run_config_or_checkpoint(quick_d2, tmp_path):
    from benchmarks.extrapolate import load_trained_model

    out, _ = quick_d2
    run_id = read_rows(out / RESULTS)[0]["run_id"]
    damaged = tmp_path / "run"
    shutil.copytree(run_dir_of(str(out), run_id), damaged)
    (damaged / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"run/checkpoint.pt.* unreadable"):
        load_trained_model(str(damaged))
    (damaged / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json: not a readable run config"):
        load_trained_model(str(damaged))


def test_rerun_skips_finished_runs_and_records_a_finished_but_unrecorded_one(quick_d2):
    out, _ = quick_d2
    rows = read_rows(out / RESULTS)
    victim = rows[0]["run_id"]
    log = os.path.join(run_dir_of(str(out), victim), "train.log")
    log_before = open(log).read()
    # as if the sweep had been killed between the run's done.json and its row
    write_rows(out / RESULTS, rows[1:])
    report = sweep("quick", str(out), smoke=True, only="_d2_", plots=False, echo=_quiet)
    assert (report.ran, report.recorded, report.skipped) == (0, 1, len(rows) - 1)
    assert sorted(r["run_id"] for r in read_rows(out / RESULTS)) == sorted(
        r["run_id"] for r in rows)
    assert open(log).read() == log_before  # recorded from its files, not trained again


def test_rows_end_in_the_preset_s_order_whatever_order_the_runs_finished(quick_d2, tmp_path):
    # two runs at a time were appended as they finished, so the summary table's order (labels
    # by first appearance) changed from one rerun of the same sweep to the next
    out, _ = quick_d2
    copy = tmp_path / "quick"
    shutil.copytree(out, copy)
    write_rows(copy / RESULTS, read_rows(copy / RESULTS)[::-1])  # as if finished in reverse
    report = sweep("quick", str(copy), smoke=True, only="_d2_", echo=_quiet)
    planned = [r for r in build_runs("quick", smoke=True) if "_d2_" in r.run_id]
    assert report.ran == 0
    assert [r["run_id"] for r in read_rows(copy / RESULTS)] == [r.run_id for r in planned]
    labels = list(dict.fromkeys(r.label for r in planned))
    assert [r["label"] for r in read_rows(copy / "summary.csv")] == labels


def _orphans(path: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if path.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_sweep_killed_mid_run_resumes_and_ends_with_every_run_once(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "benchmarks.run", "quick", "--smoke", "--out", str(out),
           "--only", "wt_d2", "--seeds", "0,1", "--set", "epochs=3", "--set", "train_size=768",
           "--jobs", "1", "--no-plots", "--no-extrapolation"]
    runs = build_runs("quick", smoke=True, seeds=[0, 1],
                      overrides={"epochs": 3, "train_size": 768})
    runs = [r for r in runs if "wt_d2" in r.run_id]
    first = run_dir_of(str(out), runs[0].run_id)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(first, "checkpoint.pt")):  # epoch 1 of 3 is done
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert _orphans(str(out)) == []  # its training process died with it
    assert not os.path.exists(os.path.join(first, "done.json"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(out / RESULTS)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)
    resumed = {r["run_id"]: r for r in rows}[runs[0].run_id]
    assert resumed["epochs_done"] == 3
    assert "--resume" in open(os.path.join(first, "train.log")).read()
    assert json.load(open(os.path.join(first, "harness.json")))["resumed"] is True


@pytest.fixture
def tiny_preset(monkeypatch):
    """Register a throw-away preset: ``tiny_preset(name, variants, **options)``."""

    def register(name, variants, **options):
        monkeypatch.setitem(presets._PRESETS, name, Preset(name, "test", lambda smoke: variants,
                                                           **options))
        return name

    return register


def test_failed_run_is_reported_not_recorded_and_diverged_run_is_a_result(tmp_path, tiny_preset):
    name = tiny_preset("fail_and_diverge", [
        Variant("boom", {"model": "test_wt", **TINY, "lr": 1e30, "grad_clip": 0.0,
                         "max_bad_steps": 1}),
        Variant("bad data", {"model": "test_wt", **TINY, "dataset": "cifar10",
                             "data_dir": str(tmp_path / "empty")}),
    ])
    out = str(tmp_path / "s")
    report = sweep(name, out, plots=False, jobs=2, echo=_quiet)
    assert report.ran == 1 and report.diverged == 1 and len(report.failed) == 1
    failed = report.failed[0]
    assert failed.run_id.startswith("bad-data") and "train.log" in failed.message
    assert "cifar" in failed.message.lower()  # the trainer's own error line
    (row,) = read_rows(os.path.join(out, RESULTS))
    assert row["label"] == "boom" and row["status"] == "diverged" and row["test_acc"] is None
    assert row["skipped_steps"] == 1  # in the epoch it stopped in (no metrics row for it)
    again = sweep(name, out, plots=False, echo=_quiet)  # the diverged run is not retried
    assert again.skipped == 1 and again.ran == 0 and len(again.failed) == 1


def test_bad_argument_in_a_preset_fails_before_anything_runs(tmp_path, tiny_preset):
    name = tiny_preset("bad_width", [Variant("WT", {"model": "test_wt", **TINY, "width": 6})])
    with pytest.raises(ValueError, match="norm_groups"):
        sweep(name, str(tmp_path / "s"), echo=_quiet)
    assert not (tmp_path / "s").exists()


def test_custom_runner_and_submitit_launcher(tmp_path, tiny_preset, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    name = tiny_preset("custom", [Variant("custom", {"model": "test_wt", **TINY})],
                       runner="benchmark_fakes:train_runner")
    out = str(tmp_path / "s")
    report = sweep(name, out, plots=False, launcher="submitit", device="cpu",
                   launcher_options={"cluster": "local"}, echo=_quiet)
    assert report.ran == 1 and not report.failed
    (row,) = read_rows(os.path.join(out, RESULTS))
    run_dir = run_dir_of(out, row["run_id"])
    assert row["runner_out_dir"] == run_dir  # ran through the custom runner, in its own process
    assert 0.0 <= row["test_acc"] <= 1.0 and row["label"] == "custom"
    assert json.load(open(os.path.join(run_dir, "done.json")))["test_acc"] == row["test_acc"]
    assert os.listdir(os.path.join(out, "submitit"))  # submitit's job files


def test_missing_custom_runner_module_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(presets._PRESETS, "capaboost", Preset(
        "capaboost", "x", None, runner="benchmarks.not_written_yet:run",
        source="benchmarks.not_written_yet:sweep"))
    from benchmarks.run import main

    assert main(["capaboost", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_out_that_is_a_file_and_only_matching_nothing_are_exit_2(tmp_path, capsys):
    from benchmarks.run import main

    a_file = tmp_path / "results"
    a_file.write_text("keep me")
    assert main(["quick", "--smoke", "--out", str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err and a_file.read_text() == "keep me"
    assert main(["quick", "--smoke", "--out", str(tmp_path / "q"), "--only", "zzz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only 'zzz' matches none" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, match", [
    (["--set", "out=/tmp/elsewhere"], "out is set by the harness"),
    (["--set", "threads=2", "--set", "device=cpu"], "device, threads are set by the harness"),
    (["--seeds", "0,0"], "repeats a seed"),
    (["--set", "dataset=foo"], "unknown dataset 'foo'"),
])
def test_sweep_arguments_checked_before_any_run(tmp_path, capsys, argv, match):
    from benchmarks.run import main

    assert main(["quick", "--smoke", "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "q").exists()


def test_one_directory_holds_one_setting(tmp_path, capsys):
    from benchmarks.run import _check_same_setting, main

    out = tmp_path / "q"
    _check_same_setting(str(out), True, {}, write=True)  # as a first --smoke sweep leaves it
    assert main(["quick", "--smoke", "--out", str(out), "--dry-run"]) == 0
    assert main(["quick", "--smoke", "--out", str(out), "--set", "epochs=2", "--dry-run"]) == 2
    assert main(["quick", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds sweeps with --smoke and no --set, not --smoke and --set epochs=2" in err


def test_rows_without_a_recorded_setting_are_not_pooled_with_another_size(tmp_path, capsys):
    # a folder from before sweep_setting.json existed: its smoke row was adopted by a full-size
    # sweep (a 1-epoch test_wt row beside 15-epoch wt_s rows in one table)
    from benchmarks.run import SETTING, main

    smoke_run = build_runs("quick", smoke=True, seeds=[0])[0]
    row = {"run_id": smoke_run.run_id, "label": smoke_run.label,
           "config_id": presets.config_id_for(smoke_run.label, smoke_run.config),
           "status": "ok", "seed": 0, "test_acc": 0.5}
    out = tmp_path / "old"
    out.mkdir()
    write_rows(out / RESULTS, [row])
    before = (out / RESULTS).read_bytes()
    assert main(["quick", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 1 results row(s)" in err
    assert smoke_run.run_id in err and 'write {"smoke": false, "overrides": {}}' in err
    assert main(["quick", "--out", str(out)]) == 2  # not a dry run: nothing written either
    assert sorted(os.listdir(out)) == [RESULTS] and (out / RESULTS).read_bytes() == before
    # a sweep of the same size (any seeds) takes the folder on
    assert main(["quick", "--smoke", "--seeds", "5", "--out", str(out), "--dry-run"]) == 0
    assert main(["quick", "--smoke", "--out", str(out), "--only", "zzz"]) == 2  # --only typo
    (out / SETTING).write_text(json.dumps({"smoke": False, "overrides": {}}))
    assert main(["quick", "--out", str(out), "--dry-run"]) == 0  # the way out the message gives
