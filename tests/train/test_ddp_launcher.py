"""DDP under torchrun (2 CPU processes, gloo) and the sweep launcher against known answers
(review 15): a write that fails on rank 0 alone, a bad torchrun environment, DEQ statistics
over ranks, the submitit launcher without its package.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.train.test_ddp import ENV, _rows, _torchrun
from wtmodels.train import run

TINY = {"model": "test_wt", "dataset": "digits", "train_size": 64, "test_size": 16,
        "batch_size": 16, "epochs": 1, "threads": 1, "device": "cpu"}


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("wtmodels.train:")]


def test_an_out_rank_0_cannot_create_is_one_line_and_no_rank_traceback(tmp_path):
    """--out under /proc: rank 0 alone creates the run directory and failed (one line, exit 2)
    while rank 1 went on into DDP's first collective and died on a gloo 'Connection closed by
    peer' traceback."""
    proc = subprocess.run(_torchrun("/proc/wtmodels-review15", TINY), capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [
        "wtmodels.train: error: --out /proc/wtmodels-review15 cannot be created: No such file "
        "or directory"], proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "Connection closed" not in proc.stderr, \
        proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # the ranks' status, as for any bad input


def test_a_checkpoint_write_failing_on_rank_0_stops_rank_1_quietly(tmp_path):
    """A full disk at the first checkpoint (rank 0 writes it alone): rank 0 reports its OSError,
    rank 1 stops without a traceback of its own (it died in the next epoch's collectives on
    gloo's 'Connection closed by peer', which buried the cause)."""
    script = tmp_path / "full_disk.py"
    script.write_text(textwrap.dedent("""
        import errno, sys
        import wtmodels.train as t

        def full(path, state):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        t.save_checkpoint = full
        sys.exit(t.main())
    """))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", str(script), "--out", str(tmp_path / "run"), "--progress", "none"]
    for key, value in {**TINY, "epochs": 2}.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr
    assert "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr, proc.stderr[-3000:]


def test_launcher_submitit_without_the_package_is_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                       capsys):
    """submitit is a dev dependency only: `--launcher submitit` where it is not installed died
    on a ModuleNotFoundError traceback (exit 1) instead of one line naming the fix."""
    from benchmarks import run as run_cli
    from benchmarks.launch import run_tasks

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(ValueError, match=r"pip install submitit.*--launcher local"):
        run_tasks(abs, [-1], launcher="submitit", folder=tmp_path)
    assert run_cli.main(["quick", "--smoke", "--out", str(tmp_path / "sweep"), "--launcher",
                         "submitit", "--cluster", "local", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install submitit" in err[0], err
    assert not list((tmp_path / "sweep" / "runs").glob("*"))  # no run started


def test_deq_solver_statistics_over_ranks_count_every_test_image_once(tmp_path):
    """37 test images in batches of 5 per rank on 2 ranks (rank 1's shard: 18), a tolerance that
    some solves meet: the share of converged solves is k/37 and the mean nstep m/37 with k, m
    the one-process counts (per-sample solver statistics do not depend on the batch)."""
    settings = {**TINY, "model": "test_deq", "train_size": 97, "test_size": 37,
                "batch_size": 32, "test_batch_size": 10, "f_tol": 0.04}
    proc = subprocess.run(_torchrun(tmp_path / "two", settings), capture_output=True,
                          text=True, timeout=200, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run({**settings, "out": str(tmp_path / "one"), "progress": "none"})
    (a,), (b,) = (_rows(tmp_path / d) for d in ("one", "two"))
    for key in ("converged", "nstep", "test_acc", "train_converged", "train_nstep"):
        n = 97 if key.startswith("train") else 37
        assert abs(b[key] * n - round(b[key] * n)) < 1e-9, key  # a count over the images
        assert round(b[key] * n) == round(a[key] * n), key
    assert 0 < b["converged"] < 1  # the check means something: some solves converge


def _tiny_argv(out) -> list[str]:
    argv = ["--out", str(out)]
    for key, value in TINY.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def test_a_rank_outside_the_group_is_one_line_and_exit_2_at_once(tmp_path):
    """RANK outside 0..WORLD_SIZE-1 (a hand-set environment) waited for peers until the
    30-minute process-group timeout (a separate process under a timeout: a regression hangs)."""
    proc = subprocess.run([sys.executable, "-m", "wtmodels.train", *_tiny_argv(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60,
                          env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
                               "WORLD_SIZE": "2", "RANK": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "RANK=2 must be in 0..WORLD_SIZE-1 (WORLD_SIZE=2)" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "0", "RANK": "0"}, "RANK=0 must be in 0..WORLD_SIZE-1 (WORLD_SIZE=0)"),
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "one"}, "rank one: environment variable RANK='one' is not"),
])
def test_a_bad_torchrun_environment_is_one_line_and_exit_2(tmp_path, env, message, capsys,
                                                           monkeypatch):
    """WORLD_SIZE=two said only "invalid literal for int()", and RANK=one crashed main() with
    a traceback (checked in-process: these fail before any process group is made)."""
    from wtmodels import train

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train.main(_tiny_argv(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_main_reports_a_bad_input_once_and_the_python_api_prints_nothing(tmp_path, capsys):
    """main() reports a bad input where the trainer meets it, before the process group is torn
    down (torch 2.4's torchrun stopped rank 0 in destroy_process_group before main printed, ~1
    run in 8 here): once, and only for the command line."""
    from wtmodels import train

    (tmp_path / "file").write_text("x")  # --out is a file: refused inside the trainer
    assert train.main(_tiny_argv(tmp_path / "file")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wtmodels.train: error: --out"), err
    assert train._report_at_once is None
    with pytest.raises(train.BadInput, match="--out"):
        run({**TINY, "out": str(tmp_path / "file"), "progress": "none"})
    assert capsys.readouterr().err == ""
