"""Regressions: a sweep started inside a torchrun job, thread settings, a float16 f in unroll mode,
registered solvers' corner cases, Ctrl-C before the first checkpoint."""

from __future__ import annotations

import subprocess
import sys

from benchmarks import run as harness


def test_sweep_runs_do_not_inherit_a_torchrun_job(monkeypatch):
    """A sweep started inside a torchrun / DDP job passed that job's WORLD_SIZE / RANK /
    MASTER_* to every training process, each of which then waited to join the job."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                       "TORCHELASTIC_RUN_ID": "x", "WTMODELS_KEEP": "yes"}.items():
        monkeypatch.setenv(key, value)
    env = harness.child_env(3)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["WTMODELS_KEEP"] == "yes"  # everything else is passed on
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    # the training command sees no distributed job in that environment
    code = "import os, sys; sys.exit(0 if 'WORLD_SIZE' not in os.environ else 1)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_sweep_runs_keep_the_thread_settings_when_none_given(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert harness.child_env(None)["OMP_NUM_THREADS"] == "5"


def test_unrolled_deq_allows_for_an_f_returning_float16():
    """The solvers allow for the rounding floor of an f returning float16 for a float32 z0
    (4705cb6); DEQ(grad="unroll") runs its own iteration and flagged such samples diverged."""
    import torch

    import wtmodels as wt

    g = torch.Generator().manual_seed(0)
    D = 64
    W = torch.randn(D, D, generator=g)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    b = torch.randn(16, D, generator=g)
    f = lambda z: (torch.tanh(z @ W.T) + b).half()  # noqa: E731
    deq = wt.DEQ(grad="unroll", f_max_iter=100, f_tol=1e-7)
    _, stats = deq(f, torch.zeros(16, D))
    assert not stats.diverged.any(), stats.diverged.nonzero().flatten().tolist()
    # a float16 runaway is still caught
    _, stats = wt.DEQ(grad="unroll", f_max_iter=100)(lambda z: (1.5 * z + 1.0).half(),
                                                      torch.zeros(2, 4))
    assert bool(stats.diverged.all())


def test_register_solver_refuses_a_blank_name():
    import pytest

    import wtmodels as wt

    def mine(f, z0, *, max_iter, tol, stop_mode):  # pragma: no cover - never called
        raise AssertionError

    for name in ("", "  ", "\t"):  # refused before anything is registered
        with pytest.raises(ValueError, match="non-empty"):
            wt.register_solver(name, mine)
    assert "  " not in wt.list_solvers()


def test_solve_returns_z_contiguous_from_a_registered_solver_too(monkeypatch):
    import torch

    import wtmodels as wt
    from wtmodels.solvers import fixed_point

    def transposing(f, z0, *, max_iter, tol, stop_mode):
        z, stats = fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
        return z.t().contiguous().t(), stats  # same values, column-major

    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # kept clean
    wt.register_solver("review15_transposing", transposing)
    z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4),
                        method="review15_transposing", tol=1e-8, max_iter=100)
    assert z.is_contiguous() and bool(stats.converged.all())
    assert torch.allclose(z, torch.full((3, 4), 2.0), atol=1e-6)


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_one(tmp_path, capsys,
                                                               monkeypatch):
    """Ctrl-C said "--resume continues from the last checkpoint" when none had been written;
    --resume then starts over (the start files make a plain rerun be refused)."""
    from wtmodels import train

    out = tmp_path / "run"
    calls = []

    def interrupted(settings):
        out.mkdir()
        (out / train.CONFIG_FILE).write_text("{}")
        calls.append(settings)
        if len(calls) == 2:
            (out / train.CHECKPOINT_FILE).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    assert train.main(["--model", "test_wt", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written yet: --resume starts the run over" in err
    assert "continues from the last checkpoint" not in err and err.count("\n") == 1
    import shutil
    shutil.rmtree(out)
    assert train.main(["--model", "test_wt", "--out", str(out)]) == 130
    assert "--resume continues from the last checkpoint" in capsys.readouterr().err
