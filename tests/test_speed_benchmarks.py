"""benchmarks.step_time and benchmarks.train_speed: rows, files and bad input (CPU)."""

from __future__ import annotations

import csv
import math

import pytest

from benchmarks.step_time import main, time_steps
from benchmarks.train_speed import main as train_speed_main


def test_writes_one_row_per_model_batch_and_variant(tmp_path, capsys):
    rc = main(["--models", "test_wt,test_deq", "--batch-sizes", "4,8", "--image-size", "8",
               "--variants", "base,amp,compile_graphs", "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "step_time_cpu_test_wt-test_deq.csv").open()))
    # compile_graphs needs CUDA: skipped on the CPU, the other variants kept
    assert [(r["model"], r["batch"], r["variant"]) for r in rows] == [
        (m, b, v) for m in ("test_wt", "test_deq") for b in ("4", "8") for v in ("base", "amp")]
    for row in rows:
        step_ms, rate = float(row["step_ms"]), float(row["img_per_s"])
        assert step_ms > 0 and rate == pytest.approx(int(row["batch"]) / step_ms * 1000, rel=1e-2)
        assert math.isnan(float(row["gpu_busy_frac"]))
    assert {r["cell_evals"] for r in rows if r["model"] == "test_wt"} == {"2.0"}
    assert "| test_deq | amp | 8 |" in (tmp_path / "step_time_cpu_test_wt-test_deq.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--variants", "base,turbo"], "unknown variant 'turbo'; valid: base"),
    (["--models", "nope"], "unknown model 'nope'; registered models:"),
    (["--batch-sizes", "4,x"], "--batch-sizes must be positive integers separated by commas"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive integers"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--image-size", "-3"], "--image-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--variants", "compile_graphs", "--device", "cpu"], "compile_graphs (CUDA graphs) needs"),
    (["--out", "/proc/no/such/dir"], "No such file or directory"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_unknown_variant_raises_value_error():
    import torch
    with pytest.raises(ValueError, match="valid: base, channels_last"):
        time_steps("test_wt", "fast", 2, 8, 1, torch.device("cpu"))


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model 'nope'; registered models:"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--image-size", "-1"], "--image-size must be >= 1"),
    (["--variants", "base,foo"], "unknown variant(s) ['foo']; choose from base"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_train_speed_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert train_speed_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
