"""The numbers the training harness reports, checked against what a user computes by hand.

Tiny runs (``test_wt`` / ``test_deq`` on subsets of the built-in digits, one CPU thread).
"""

from __future__ import annotations

import json
import math
import warnings

import torch

from wtmodels import train as train_mod
from wtmodels.optim import parameter_groups
from wtmodels.train import run

BASE = dict(model="test_wt", dataset="digits", train_size=128, test_size=64, batch_size=32,
            threads=1, progress="none")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_weight_norm_magnitudes_get_no_weight_decay():
    # parametrizations.weight_norm's g has shape (C_out, 1, 1, 1): 4-dimensional, so the
    # "2+ dims" rule decayed it although it is a per-channel scale, not a kernel
    from wtmodels import models as model_registry

    model = model_registry.create_model("test_deq", weight_norm=True)
    decayed = {id(p) for p in parameter_groups(model, 0.1)[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and not any(n.endswith("original0") for n in names)
    assert {n for n in names if n.endswith("original1")}  # the directions v are kernels
    with warnings.catch_warnings():  # the legacy API is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        legacy = torch.nn.utils.weight_norm(torch.nn.Conv2d(2, 3, 3))
    decayed = {id(p) for p in parameter_groups(legacy, 0.1)[0]["params"]}
    assert decayed == {id(legacy.weight_v)}


def test_steps_the_grad_scaler_skips_are_counted(monkeypatch, tmp_path):
    # float16 on CUDA: a step whose scaled gradients overflow is skipped by the GradScaler;
    # it was counted as a good step (train metrics included it, skipped_steps stayed 0, and
    # max_bad_steps could never stop a run whose gradients were always non-finite)
    build = train_mod._Trainer._build_optimisation
    scalers = []

    def with_scaler(self):
        build(self)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # overflows at first
        scalers.append(self.scaler)

    monkeypatch.setattr(train_mod._Trainer, "_build_optimisation", with_scaler)
    out = tmp_path / "fp16"
    final = run({**BASE, "epochs": 1, "out": str(out)})
    halvings = 127 - round(math.log2(scalers[0].get_scale()))
    assert halvings >= 1
    assert final["skipped_steps"] == halvings
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["test_loss"])
