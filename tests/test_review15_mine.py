"""Review round 15 (mine): fixes found while reading the helpers' reports."""

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
