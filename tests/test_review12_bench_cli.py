"""Review 12: the benchmark scripts refuse an absurd --threads and an --out that takes no files
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
