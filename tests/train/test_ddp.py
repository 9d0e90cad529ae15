"""DistributedDataParallel: 2 CPU processes (gloo) under torchrun against 1 process.

With the same global batch, the two ranks' half batches together are the one-process batch
(augmentation included: each image's crop follows (seed, epoch, index)), and DDP averages their
gradients, so both runs must reach the same weights and metrics up to float
summation order. Only rank 0 writes the run directory; metrics are reduced over the ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from wtmodels.checkpoint import load_checkpoint
from wtmodels.train import run

# device "cpu": two ranks on a machine with one GPU would both take it (NCCL refuses), and the
# checks compare runs bit for bit
SETTINGS = {"model": "test_wt", "dataset": "digits", "train_size": 256, "test_size": 101,
            "batch_size": 32, "augment": True, "epochs": 2, "threads": 1, "lr": 0.01,
            "device": "cpu"}


def _torchrun(out, settings, *extra) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "wtmodels.train", "--out", str(out), "--progress", "lines", *extra]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(_torchrun(two, SETTINGS), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/2") == 1  # rank 0 alone prints

    run({**SETTINGS, "out": str(one), "progress": "none"})

    rows = {name: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for name, d in (("one", one), ("two", two))}
    for a, b in zip(rows["one"], rows["two"], strict=True):
        for key in ("train_loss", "test_loss"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
        for key in ("train_acc", "test_acc", "steps", "lr", "skipped_steps"):
            assert a[key] == b[key], key
    wa = load_checkpoint(one / "checkpoint.pt")["model"]
    wb = load_checkpoint(two / "checkpoint.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    config = json.loads((two / "config.json").read_text())
    assert config["env"]["world_size"] == 2
    ckpt = load_checkpoint(two / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's generators
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoint.pt", "config.json", "done.json", "metrics.jsonl", "model_info.json"]


def _rows(out):
    timing = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(tmp_path):
    settings = {**SETTINGS, "epochs": 3}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.run(_torchrun(ref, settings), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # SIGKILL the whole process group (torchrun and both ranks) once a checkpoint is on disk
    run = subprocess.Popen(_torchrun(killed, settings), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint.pt").exists() and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    epoch = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 3, "the run finished before it could be killed"
    proc = subprocess.run(_torchrun(killed, {}, "--resume"), capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(killed) == _rows(ref)  # every epoch once, the same numbers
    wa = load_checkpoint(ref / "checkpoint.pt")["model"]
    wb = load_checkpoint(killed / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_rank_with_an_empty_test_shard(tmp_path):
    """test_size 1 on 2 processes: rank 1's test shard is empty, so it has no core statistics
    to reduce; the ranks' reductions crashed on a collective mismatch (gloo aborted)."""
    settings = {**SETTINGS, "model": "test_deq", "train_size": 64, "test_size": 1, "epochs": 1}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(_torchrun(two, settings), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run({**settings, "out": str(one), "progress": "none"})
    (a,), (b,) = _rows(one), _rows(two)
    assert a.keys() == b.keys()
    for key in ("test_acc", "nstep", "converged", "rel_residual_max", "cell_evals"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
