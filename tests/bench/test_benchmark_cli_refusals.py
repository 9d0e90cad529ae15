"""The benchmark scripts refuse an absurd --threads and an --out that takes no files
before measuring (one line on stderr, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import benchmarks.models as bm
import benchmarks.peft_speed as ps
import benchmarks.solvers as sb
import benchmarks.step_time as st
import benchmarks.train_speed as ts

linux_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def _never(*args, **kwargs):
    raise AssertionError("measured before checking the arguments")


@pytest.fixture(autouse=True)
def _no_measuring(monkeypatch):
    threads = torch.get_num_threads()
    for module, name in ((sb, "bench_cell"), (bm, "mask_speed"), (st, "time_variants"),
                         (ts, "plain_loop"), (ts, "harness_loop"), (ps, "measure_case")):
        monkeypatch.setattr(module, name, _never)
    yield
    torch.set_num_threads(threads)


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # the argparse-based ones exit from parse_args
        return exc.code


MAINS = {
    "solvers": (sb.main, ["--quick"]),
    "models": (bm.main, ["--quick"]),
    "step_time": (st.main, ["--models", "test_wt", "--device", "cpu"]),
    "train_speed": (ts.main, ["--variants", "base", "--device", "cpu"]),
    "peft_speed": (ps.main, ["--cases", "wt_s"]),
}


@pytest.mark.parametrize("script", sorted(MAINS))
@pytest.mark.parametrize("threads", ["1000000", "99999999999999999999"])
def test_huge_threads_is_one_line_and_exit_2(script, threads, tmp_path, capsys):
    # --threads 1000000 crashed the process (segmentation fault, rc 139) and 1e20 raised an
    # OverflowError traceback from torch.set_num_threads, after the arguments were accepted
    main, argv = MAINS[script]
    assert _exit_code(main, [*argv, "--threads", threads, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 1 and <= 1024" in err and err.count("\n") == 1
    assert torch.get_num_threads() <= 1024


@pytest.mark.parametrize("script", sorted(MAINS))
def test_largest_accepted_threads_is_1024(script, tmp_path, capsys):
    # 1024 passes the check: the run gets to measuring (stubbed out here to fail loudly)
    main, argv = MAINS[script]
    with pytest.raises(AssertionError, match="measured before checking"):
        _exit_code(main, [*argv, "--threads", "1024", "--out", str(tmp_path)])


@linux_proc
@pytest.mark.parametrize("script", sorted(MAINS))
def test_out_that_takes_no_files_fails_before_measuring(script, capsys):
    # /proc exists (mkdir(exist_ok=True) accepted it) but takes no files (a read-only folder
    # likewise, for non-root users): the scripts measured for minutes, then died writing
    # (a PermissionError / FileNotFoundError traceback; peft_speed exit 2 after the run)
    main, argv = MAINS[script]
    assert _exit_code(main, [*argv, "--out", "/proc"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc is not writable" in err and err.count("\n") == 1


def test_out_as_a_file_is_refused_by_every_script(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for script, (main, argv) in MAINS.items():
        assert _exit_code(main, [*argv, "--out", str(tmp_path / "f")]) == 2, script
        err = capsys.readouterr().err
        assert "--out" in err or "File exists" in err, (script, err)
        assert err.count("\n") == 1, (script, err)
    assert (tmp_path / "f").read_text() == "x"


def _sha_changes_during_the_run(monkeypatch, module):
    """The checkout reads ``start`` until the (stubbed) measuring runs, ``later-dirty`` after
    (a file edited during the run); returns the function that marks the measuring."""
    import benchmarks.provenance as prov

    measured = []

    def sha():
        return "later-dirty" if measured else "start"

    monkeypatch.setattr(module, "git_sha", sha, raising=False)
    monkeypatch.setattr(prov, "git_sha", sha)
    return lambda: measured.append(1)


def _fake_solver_rows(B, C, H, *args, measuring=lambda: None):
    measuring()
    return [{"B": B, "C": C, "H": H, "solver": s, "impl": "wtmodels", "f_evals": 10,
             "wall_ms": 2.0, "f_ms": 0.1, "overhead": 2.0, "overhead_best": 2.0,
             "overhead_cpu": 2.0, "f_slowdown": 1.0, "solver_ops": 1.0, "converged": 1.0}
            for s in ("anderson", "broyden", "fixed_point")]


def test_solvers_records_the_sha_of_the_code_measured(monkeypatch, tmp_path, capsys):
    # a file edited during a run made every row of a run of clean code say "-dirty" (and a
    # commit made during it, the new commit): git_sha was read when the files were written
    import csv

    measuring = _sha_changes_during_the_run(monkeypatch, sb)
    monkeypatch.setattr(sb, "bench_cell",
                        lambda *a: _fake_solver_rows(*a[:3], measuring=measuring))
    monkeypatch.setattr(sb, "memory_check", lambda budgets, device="cpu": [
        {"grad": "ift", "f_max_iter": b, "B": 1, "C": 1, "H": 1, "peak_mb": 1.0,
         "saved_for_backward_mb": 1.0} for b in budgets])
    assert sb.main(["--quick", "--threads", "1", "--malloc", "default",
                    "--out", str(tmp_path)]) == 0
    for name in ("solvers_quick.csv", "solvers_quick_memory.csv"):
        rows = list(csv.DictReader((tmp_path / name).open()))
        assert rows and {r["git_sha"] for r in rows} == {"start"}, name
    assert "git `start`" in (tmp_path / "solvers_quick.md").read_text()


def test_step_time_records_the_sha_of_the_code_measured(monkeypatch, tmp_path, capsys):
    import csv

    measuring = _sha_changes_during_the_run(monkeypatch, st)
    row = {"model": "test_wt", "variant": "base", "batch": 2, "image_size": 8, "step_ms": 1.0,
           "img_per_s": 2000.0, "gpu_busy_ms": float("nan"), "gpu_busy_frac": float("nan"),
           "cell_evals": 2.0}
    monkeypatch.setattr(st, "time_variants", lambda *a, **k: measuring() or [dict(row)])
    assert st.main(["--models", "test_wt", "--batch-sizes", "2", "--variants", "base",
                    "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    (written,) = csv.DictReader((tmp_path / "step_time_cpu_test_wt.csv").open())
    assert written["git_sha"] == "start"


def test_train_speed_records_the_sha_of_the_code_measured(monkeypatch, tmp_path, capsys):
    import csv

    measuring = _sha_changes_during_the_run(monkeypatch, ts)
    monkeypatch.setattr(ts, "plain_loop", lambda *a, **k: measuring() or 100.0)
    monkeypatch.setattr(ts, "harness_loop", lambda *a, **k: 80.0)
    assert ts.main(["--variants", "base", "--repeats", "1", "--device", "cpu", "--threads", "1",
                    "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "train_speed_cpu.csv").open()))
    assert [r["git_sha"] for r in rows] == ["start", "start"]


def test_peft_speed_records_the_sha_of_the_code_measured(monkeypatch, tmp_path, capsys):
    import csv

    measuring = _sha_changes_during_the_run(monkeypatch, ps)
    monkeypatch.setattr(ps, "measure_case", lambda case, *a: measuring() or [
        {"case": case, "measure": "train_step", "variant": "lora", "impl": "dense", "batch": 2,
         "median_ms": 1.0, "ratio": 1.0, "ratio_to": "lora", "target": None,
         "meets_target": None}])
    assert ps.main(["--cases", "wt_s", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (row,) = csv.DictReader((tmp_path / "peft_speed.csv").open())
    assert row["git_sha"] == "start"
    assert (tmp_path / "peft_speed.md").read_text().count("git start,") == 1


def test_train_speed_batch_larger_than_an_epoch_is_refused(tmp_path, capsys):
    # --batch-size 100000000 --train-size 2 hung: the harness loop's test set (one batch)
    # generated 1e8 synthetic images; a batch above the epoch size measures a partial batch
    assert ts.main(["--batch-size", "100000000", "--train-size", "2", "--variants", "base",
                    "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be <= --train-size (2), got 100000000" in err
    assert err.count("\n") == 1


def test_a_value_listed_twice_is_measured_once(monkeypatch, tmp_path, capsys):
    # train_speed --variants base,base measured base twice per repeat into one row holding
    # twice --repeats samples (and wrote that row twice); step_time and peft_speed wrote
    # every row of a repeated model / batch size / variant / case twice
    import csv

    calls = []
    monkeypatch.setattr(ts, "plain_loop", lambda *a, **k: calls.append("plain") or 100.0)
    monkeypatch.setattr(ts, "harness_loop", lambda *a, **k: calls.append("harness") or 80.0)
    assert ts.main(["--variants", "base,base", "--repeats", "1", "--device", "cpu",
                    "--threads", "1", "--out", str(tmp_path)]) == 0
    assert calls == ["plain", "harness"]
    rows = list(csv.DictReader((tmp_path / "train_speed_cpu.csv").open()))
    assert [(r["variant"], r["loop"], r["samples"]) for r in rows] == [
        ("base", "plain", "100.0"), ("base", "harness", "80.0")]

    timed = []

    def fake_time(name, variants, batch, *a, **k):
        timed.append((name, list(variants), batch))
        return [{"model": name, "variant": v, "batch": batch, "step_ms": 1.0} for v in variants]

    monkeypatch.setattr(st, "time_variants", fake_time)
    assert st.main(["--models", "test_wt,test_wt", "--batch-sizes", "4,4,04",
                    "--variants", "base,base", "--device", "cpu", "--threads", "1",
                    "--out", str(tmp_path)]) == 0
    assert timed == [("test_wt", ["base"], 4)]

    cases = []
    monkeypatch.setattr(ps, "measure_case", lambda case, *a: cases.append(case) or [
        {"case": case, "measure": "train_step", "variant": "lora", "impl": "dense", "batch": 2,
         "median_ms": 1.0, "ratio": 1.0, "ratio_to": "lora", "target": None,
         "meets_target": None}])
    assert ps.main(["--cases", "wt_s,wt_s", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert cases == ["wt_s"]


def test_gpu_scripts_run_their_benchmarks_on_cuda_only():
    # gpu_step_time.sh ran step_time with --device auto: on a machine without a GPU it timed
    # the CPU and wrote step_time_cpu_* into benchmarks/results/gpu, exit status 0 where the
    # steps finished; with --device cuda step_time exits 2 there and the script reports it
    import re
    import shlex

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    for script in ("gpu_check.sh", "gpu_step_time.sh"):
        text = (root / script).read_text().replace("\\\n", " ")
        calls = re.findall(r"python3 -m (benchmarks\.\w+)([^|>\n]*)", text)
        assert calls, script
        for module, rest in calls:
            argv = shlex.split(rest)
            assert "--device" in argv, (script, module)
            assert argv[argv.index("--device") + 1] == "cuda", (script, module)
