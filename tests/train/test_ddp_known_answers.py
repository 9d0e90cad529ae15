"""DDP (2 CPU processes under torchrun) against known answers: a train size the ranks do not
divide, and a data error that only one rank's shard meets (review 13)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from PIL import Image

from tests.train.test_ddp import ENV, SETTINGS, _torchrun
from wtmodels.checkpoint import load_checkpoint
from wtmodels.train import run


def test_a_train_size_the_ranks_do_not_divide_trains_on_one_process_s_batches(tmp_path):
    """97 images, global batch 32, 2 ranks: the sampler repeats one image so both ranks take 4
    steps (rank 1's last batch is that repeat alone). Before, the repeat was trained on and
    counted: train_acc was k/98, and the weights were 5e-3 away from one process's."""
    settings = {**SETTINGS, "train_size": 97, "test_size": 37, "epochs": 1}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(_torchrun(two, settings), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run({**settings, "out": str(one), "progress": "none"})
    (a,), (b,) = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                  for d in (one, two))
    correct = b["train_acc"] * 97
    assert abs(correct - round(correct)) < 1e-9  # a share of the 97 images, each counted once
    assert b["train_acc"] == a["train_acc"] and b["test_acc"] == a["test_acc"]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-5
    assert b["images_per_s"] * b["epoch_time_s"] == pytest.approx(97)
    wa = load_checkpoint(one / "checkpoint.pt")["model"]
    wb = load_checkpoint(two / "checkpoint.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_corrupt_image_in_rank_1_s_shard_is_reported(tmp_path):
    """The test image at index 1 (rank 1's shard) is not a PNG: rank 1 alone meets it. Before,
    only rank 0 printed errors, so the cause was lost: rank 0 died on a gloo 'Connection closed
    by peer' traceback and nothing named the file."""
    for split in ("train", "val"):
        for cls, colour in (("cat", (250, 10, 20)), ("dog", (5, 100, 200))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (9, 7), colour).save(tmp_path / split / cls / f"{i}.png")
    bad = tmp_path / "val" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    settings = {"model": "test_wt", "dataset": "imagefolder", "data_dir": tmp_path,
                "image_size": 8, "batch_size": 2, "epochs": 1, "threads": 1, "device": "cpu"}
    proc = subprocess.run(_torchrun(tmp_path / "out", settings), capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("wtmodels.train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("wtmodels.train: error: rank 1: reading the data failed")
    assert str(bad) in lines[0]
