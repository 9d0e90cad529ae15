"""``--resume`` is bit-exact on the CPU for model families and options the older
resume tests do not combine (README "Training", Reliability: "``--resume`` after a kill at any
moment continues bit-exactly on the CPU: the final weights and every metrics line (timings
aside) equal an uninterrupted run's").

The oracle is an uninterrupted run with the same settings and seed, which the README names as
the answer. Each case crosses epoch boundaries with state that a resume must carry over: the
``--pretrain-steps`` warm-up and the learning-rate warm-up both end inside epoch 2 (where the
kill lands), SGD momentum buffers, K=2 masks, dropout / augmentation generators, an adaptive
(dopri5) ODE solver, spectral-norm power-iteration vectors.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wtmodels import train as train_mod
from wtmodels.checkpoint import load_checkpoint

TIMING_KEYS = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}
BASE = dict(dataset="digits", batch_size=32, threads=1, progress="none", seed=7, device="cpu",
            epochs=3)


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final(out: Path) -> dict:
    final = json.loads((out / "done.json").read_text())["final"]
    return {k: v for k, v in final.items() if k not in TIMING_KEYS}


def _assert_same_run(ref: Path, resumed: Path, epochs: int) -> None:
    rows_ref, rows_res = _rows(ref), _rows(resumed)
    assert [r["epoch"] for r in rows_res] == list(range(1, epochs + 1))  # each epoch once
    assert rows_res == rows_ref
    assert _final(resumed) == _final(ref)
    w_ref = load_checkpoint(ref / "checkpoint.pt")["model"]
    w_res = load_checkpoint(resumed / "checkpoint.pt")["model"]
    assert w_ref.keys() == w_res.keys()
    different = [k for k in w_ref if not torch.equal(w_ref[k], w_res[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


CASES = {
    # adaptive ODE steps on K=2 masked cells with dropout and augmentation
    "ode_dopri5_masked": dict(model="test_ode", ode_method="dopri5", ode_rtol=1e-2, ode_atol=1e-2,
                              mask_k=2, dropout=0.2, epochs=2, train_size=64, test_size=16),
    # untied cells, Adam at a constant rate, no augmentation, label smoothing
    "untied_adam_constant": dict(model="test_untied", optimizer="adam", schedule="constant",
                                 augment=False, label_smoothing=0.1, train_size=96, test_size=32),
    # spectral norm's power-iteration buffers, Bernoulli masks in blocks, a warm-up past epoch 1
    "wt_spectral_bernoulli": dict(model="test_wt", spectral_norm=True, mask_k=2, dropout=0.2,
                                  mask_kind="bernoulli", mask_schedule="block",
                                  warmup_epochs=1.5, min_lr=1e-3, train_size=96, test_size=32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stopped_after_epoch_one_and_resumed_equals_an_uninterrupted_run(
        name, tmp_path, train_killed_after_epoch):
    settings = {**BASE, **CASES[name]}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train_mod.run({**settings, "out": str(ref)})
    train_killed_after_epoch({**settings, "out": str(killed)}, epoch=1)
    assert not (killed / "done.json").exists()
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1
    # a new process starts from other generator states: the resume must restore them all
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)  # noqa: NPY002 (the legacy global generator is what is restored)
    train_mod.run({"out": str(killed), "resume": True, "progress": "none"})
    _assert_same_run(ref, killed, settings["epochs"])


def test_sigkill_mid_epoch_two_of_a_phantom_masked_deq_under_sgd_resumes_bit_exactly(tmp_path):
    """A real process SIGKILLed during epoch 2: 6 steps an epoch, so the 8 ``--pretrain-steps``
    and the 1.5-epoch learning-rate warm-up both end in the epoch the kill interrupts."""
    settings = {**BASE, "model": "test_deq", "grad": "phantom", "phantom_steps": 3,
                "pretrain_steps": 8, "mask_k": 2, "depth": 4, "optimizer": "sgd",
                "nesterov": True, "momentum": 0.8, "dropout": 0.2, "warmup_epochs": 1.5,
                "train_size": 192, "test_size": 32}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train_mod.run({**settings, "out": str(ref)})
    epoch_time = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])["epoch_time_s"]

    argv = [sys.executable, "-m", "wtmodels.train", "--out", str(killed)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        time.sleep(0.3 * epoch_time)  # into epoch 2's training steps
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1

    assert train_mod.main(["--out", str(killed), "--resume", "--progress", "none"]) == 0
    _assert_same_run(ref, killed, settings["epochs"])
