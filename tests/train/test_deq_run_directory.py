"""A DEQ run directory checked as a new user would, against values computed apart.

Tiny ``test_deq`` runs on subsets of the built-in digits, one CPU thread, seconds each.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torch.nn.functional as F

import wtmodels as wt
from wtmodels import data as datasets
from wtmodels.masks import mask_count, set_mask_index
from wtmodels.model_config import ModelConfig
from wtmodels.models import ImplicitClassifier
from wtmodels.train import run

BASE = dict(model="test_deq", dataset="digits", batch_size=32, threads=1, progress="none",
            device="cpu")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_epoch_of_pretrain_steps_only_has_the_same_keys_with_null_solver_statistics(
        tmp_path):
    # 64 images, batch 32: 2 steps per epoch; --pretrain-steps 2 makes epoch 1 all unrolled.
    # Its row lacked every train_ solver key (train_nstep, ...), present from epoch 2 on: rows
    # of one run had different keys (jac_loss is null for such an epoch, as documented)
    out = tmp_path / "deq"
    run({**BASE, "train_size": 64, "test_size": 32, "epochs": 2, "pretrain_steps": 2,
         "jac_reg_weight": 0.1, "out": str(out)})
    first, second = _rows(out)
    assert first.keys() == second.keys()
    for key in ("train_nstep", "train_rel_residual", "train_rel_residual_max",
                "train_converged", "train_diverged", "jac_loss"):
        assert first[key] is None, key
        assert second[key] is not None, key
    assert first["train_cell_evals"] == 2.0  # unrolled: depth 2 cell applications
    assert 1 <= second["train_nstep"] <= 8  # test_deq's training budget f_max_iter 8
    assert 1 <= first["nstep"] <= 8  # the test pass solves in every epoch
    # the first row's keys describe the whole file (csv.DictWriter raised on epoch 2)
    writer = csv.DictWriter(io.StringIO(), fieldnames=list(first))
    writer.writerows([first, second])


def test_solver_statistics_pooled_over_samples_stages_and_uneven_batches(tmp_path):
    # the logged test statistics equal a per-sample recomputation with wt.solve from the
    # checkpoint and config.json alone: 2 stages, 2 masks per cell (one solver step = both
    # masked cells; 2 convs x 2 stages: 4 mask buffers), Broyden, phantom output, 100 test
    # images in batches of 64 + 36
    out = tmp_path / "deq"
    run({**BASE, "train_size": 64, "test_size": 100, "epochs": 1, "stages": 2, "mask_k": 2,
         "f_solver": "broyden", "grad": "phantom", "phantom_steps": 2, "eval_f_max_iter": 12,
         "f_max_iter": 5, "f_tol": 1e-3, "out": str(out)})
    (row,) = _rows(out)
    saved = json.loads((out / "config.json").read_text())
    mc = saved["model_config"]
    assert (mc["f_solver"], mc["grad"], mc["stages"], mc["mask_k"]) == \
        ("broyden", "phantom", 2, 2)
    model = ImplicitClassifier(ModelConfig(**mc))
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    masks = {k: v for k, v in model.state_dict().items() if v.dtype == torch.bool}
    assert len(masks) == 4 and all(torch.equal(v, state[k]) for k, v in masks.items())
    model.load_state_dict(state)
    model.eval()
    _, test_ds, _ = datasets.get_datasets("digits", train_size=64, test_size=100, seed=0)
    x = torch.stack([test_ds[i][0] for i in range(100)])
    y = torch.tensor([test_ds[i][1] for i in range(100)])
    nstep, rel, conv, loss, correct = [], [], [], 0.0, 0
    with torch.no_grad():
        for i in (0, 64):
            h = model.stem(x[i:i + 64])
            for s, core in enumerate(model.cores):
                if s:
                    h = model.transitions[s - 1](h)

                def f(z, cell=core.cell, h=h):
                    for k in range(mask_count(cell)):
                        set_mask_index(cell, k)
                        z = cell(z, h)
                    return z

                z, stats = wt.solve(f, torch.zeros_like(h), method="broyden", max_iter=12,
                                    tol=1e-3)
                nstep.append(stats.nstep.double())
                rel.append(stats.rel_lowest.double())
                conv.append(stats.converged.double())
                h = f(f(z))  # the phantom steps (tau 1)
            logits = model.head(h.mean((2, 3)))
            loss += float(F.cross_entropy(logits, y[i:i + 64], reduction="sum"))
            correct += int((logits.argmax(1) == y[i:i + 64]).sum())
    nstep, rel, conv = torch.cat(nstep), torch.cat(rel), torch.cat(conv)
    assert nstep.numel() == 200 and int(nstep.max()) <= 12
    assert row["nstep"] == pytest.approx(float(nstep.mean()), rel=1e-9)
    assert row["rel_residual"] == pytest.approx(float(rel.mean()), rel=1e-6)
    assert row["rel_residual_max"] == pytest.approx(float(rel.max()), rel=1e-6)
    assert row["converged"] == pytest.approx(float(conv.mean()), rel=1e-9)
    assert row["test_loss"] == pytest.approx(loss / 100, rel=1e-5)
    assert row["test_acc"] == correct / 100
    assert row["images_per_s"] == pytest.approx(64 / row["epoch_time_s"], rel=1e-9)
