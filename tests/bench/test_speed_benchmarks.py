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
    (["--variants", ","], "--variants names no variant; choose from base"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_train_speed_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert train_speed_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_step_time_csv_rows_carry_provenance(tmp_path):
    import torch
    assert main(["--models", "test_wt", "--batch-sizes", "4", "--image-size", "8",
                 "--variants", "base", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    (row,) = csv.DictReader((tmp_path / "step_time_cpu_test_wt.csv").open())
    assert row["device"] == "cpu" and row["threads"] == str(torch.get_num_threads())
    assert row["torch_version"] == torch.__version__ and row["git_sha"] and row["date"]
    assert "load_average_1min" in row
    # the Markdown table keeps the measured columns only (provenance is in its header line)
    assert "| model | variant | batch | image_size | step_ms |" in (
        tmp_path / "step_time_cpu_test_wt.md").read_text()


def test_train_speed_alternates_loop_order_and_computes_overhead(tmp_path, monkeypatch):
    import benchmarks.train_speed as ts
    calls = []

    def fake(loop, rate):
        def fn(*args, **kwargs):
            calls.append(loop)
            return rate
        return fn

    monkeypatch.setattr(ts, "plain_loop", fake("plain", 100.0))
    monkeypatch.setattr(ts, "harness_loop", fake("harness", 80.0))
    assert ts.main(["--repeats", "2", "--variants", "base", "--device", "cpu",
                    "--out", str(tmp_path)]) == 0
    # the first run in a process is slower: it must not always be the same loop's
    assert calls == ["plain", "harness", "harness", "plain"]
    rows = {r["loop"]: r for r in csv.DictReader((tmp_path / "train_speed_cpu.csv").open())}
    assert float(rows["harness"]["overhead_pct"]) == 25.0  # plain / harness - 1
    assert "| base | 100.0 | 80.0 | +25.0% |" in (tmp_path / "train_speed_cpu.md").read_text()


def test_models_memory_rows_measure_on_the_batch_device(monkeypatch):
    """The peak is read on the device the batch lives on: a CPU batch on a machine with a GPU
    read the CUDA allocator's peak (0.0 MiB, below the saved bytes) when it asked _device()."""
    import torch

    import benchmarks.models as bm
    devices = []

    def fake_peak(fn, device="cpu"):
        devices.append(device)
        fn()
        return 2**20

    monkeypatch.setattr(bm, "_device", lambda: "cuda")  # what a GPU machine's default says
    monkeypatch.setattr(bm, "peak_memory_bytes", fake_peak)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    row = bm._memory_row("check", net, torch.randn(2, 1, 4, 4))
    assert devices == ["cpu"] and row["peak_mb"] == 1.0


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured before checking --out")


def test_models_bad_out_exits_2_before_measuring(tmp_path, monkeypatch, capsys):
    import benchmarks.models as bm
    monkeypatch.setattr(bm, "mask_speed", _no_measuring)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        bm.main(["--quick", "--out", str(tmp_path / "file")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks.models: error: --out") and err.count("\n") == 1


def test_peft_speed_bad_out_exits_2_before_measuring(tmp_path, monkeypatch, capsys):
    import benchmarks.peft_speed as ps
    monkeypatch.setattr(ps, "measure_case", _no_measuring)
    (tmp_path / "file").write_text("x")
    assert ps.main(["--cases", "wt_s", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'file'} exists and is not a directory" in err
    assert err.count("\n") == 1


def test_models_saved_for_backward_counts_each_storage_once():
    """A ReLU's output saved again by the next conv is one tensor; weights and input excluded."""
    import torch

    import benchmarks.models as bm
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    row = bm._memory_row("check", net, torch.randn(8, 4, 32, 32))
    # the two ReLU outputs, 8x16x32x32 float32 = 0.5 MiB each (+ a few bytes of logsumexp)
    assert row["saved_for_backward_mb"] == pytest.approx(1.0, abs=0.01)
    assert row["saved_for_backward_mb"] <= row["peak_mb"]


def test_peft_speed_alternates_the_order_of_its_variants():
    from benchmarks.peft_speed import _interleaved

    calls = []
    medians = _interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           repeats=4, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and set(medians) == {"a", "b"}


def test_step_time_interleaves_variants_and_drops_a_failing_one(monkeypatch):
    import torch

    import benchmarks.step_time as st
    calls = []

    class FakeModel:
        def core_stats(self):
            return {}

    def fake_build(model_name, variant, batch_size, image_size, device, seed=0):
        if variant == "compile":
            raise RuntimeError("no compiler")

        def step():
            calls.append(variant)
            if variant == "channels_last" and calls.count(variant) == 2:
                raise RuntimeError("out of memory")
        return step, FakeModel()

    monkeypatch.setattr(st, "build_step", fake_build)
    failures = []
    rows = st.time_variants("test_wt", ["base", "amp", "compile", "channels_last"], 4, 8, 4,
                            torch.device("cpu"), on_error=lambda v, e: failures.append(v))
    assert failures == ["compile", "channels_last"]
    assert [r["variant"] for r in rows] == ["base", "amp"]
    # one timed step of each variant per round, the order reversed every other round
    assert calls == ["base", "amp", "channels_last", "channels_last", "amp", "base",
                     "base", "amp", "amp", "base"]
    with pytest.raises(RuntimeError, match="no compiler"):  # no on_error: raised
        st.time_variants("test_wt", ["compile"], 4, 8, 1, torch.device("cpu"))
