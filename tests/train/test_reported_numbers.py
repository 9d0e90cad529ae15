"""The numbers the training harness reports, checked against what a user computes by hand.

Tiny runs (``test_wt`` / ``test_deq`` on subsets of the built-in digits, one CPU thread).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
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


def test_reported_numbers_equal_a_recomputation(monkeypatch, tmp_path):
    # test_* metrics and the DEQ solver statistics from the checkpoint on the same test subset;
    # the lr of every step; the clipped gradient norm; train_loss is the plain cross-entropy
    import torch.nn.functional as F

    from wtmodels import data as datasets
    from wtmodels import models as model_registry
    from wtmodels.optim import warmup_cosine

    build, seen = train_mod.build_optimizer, {"lr": [], "norm": []}

    def spied(*args, **kwargs):
        opt = build(*args, **kwargs)

        def pre_step(o, _args, _kwargs):
            seen["lr"].append({g["lr"] for g in o.param_groups})
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            seen["norm"].append(float(torch.stack([g.norm() for g in grads]).norm()))

        opt.register_step_pre_hook(pre_step)
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", spied)
    out = tmp_path / "deq"
    cfg = {**BASE, "model": "test_deq", "epochs": 2, "train_size": 100, "test_size": 50,
           "data_seed": 3, "label_smoothing": 0.2, "grad_clip": 0.05, "lr": 0.02,
           "eval_f_max_iter": 5, "out": str(out)}
    final = run(cfg)
    rows = _rows(out)
    steps = 2 * 4  # ceil(100 / 32) per epoch; warm-up round(0.5 * 4) = 2 steps
    assert seen["lr"] == [{0.02 * warmup_cosine(s, steps, 2)}
                          for s in range(steps)]
    assert [r["lr"] for r in rows] == [0.02 * warmup_cosine(s, steps, 2) for s in (3, 7)]
    assert max(seen["norm"]) <= 0.05 * (1 + 1e-5)
    assert final["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert all(r["train_loss"] > 0 for r in rows)

    _, test_ds, info = datasets.get_datasets("digits", train_size=100, test_size=50, seed=3)
    model = model_registry.create_model("test_deq", eval_f_max_iter=5,
                                        num_classes=info["num_classes"],
                                        in_chans=info["in_chans"])
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    x = torch.stack([test_ds[i][0] for i in range(len(test_ds))])  # (50, 1, 8, 8)
    y = torch.tensor([test_ds[i][1] for i in range(len(test_ds))])
    with torch.no_grad():
        loss_sum, correct, stats = 0.0, 0, []
        for i in range(0, 50, 64):  # the test batch: 2 x batch_size
            logits = model(x[i:i + 64])
            loss_sum += float(F.cross_entropy(logits, y[i:i + 64], reduction="sum"))
            correct += int((logits.argmax(1) == y[i:i + 64]).sum())
            stats.append(model.core_stats())
    (last,) = stats
    assert rows[-1]["test_loss"] == pytest.approx(loss_sum / 50, rel=1e-6)
    assert rows[-1]["test_acc"] == correct / 50
    for key in ("nstep", "rel_residual", "rel_residual_max", "converged", "cell_evals"):
        assert rows[-1][key] == pytest.approx(last[key], rel=1e-6), key
    assert rows[-1]["nstep"] <= 5
