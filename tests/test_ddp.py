"""DistributedDataParallel: 2 CPU processes (gloo) under torchrun against 1 process.

With the same global batch, the two ranks' half batches together are the one-process batch
(augmentation included: each image's crop follows (seed, epoch, index)), and DDP averages their
gradients, so both runs must reach the same weights and metrics up to float
summation order. Only rank 0 writes the run directory; metrics are reduced over the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from wtmodels.checkpoint import load_checkpoint
from wtmodels.train import run

SETTINGS = {"model": "test_wt", "dataset": "digits", "train_size": 256, "test_size": 101,
            "batch_size": 32, "augment": True, "epochs": 2, "threads": 1, "lr": 0.01}


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "wtmodels.train", "--out", str(two), "--progress", "lines"]
    for key, value in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
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
