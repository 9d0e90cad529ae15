"""Findings of a seeded randomized sweep over masks and CapaBoost / LoRA.

1. ``apply_masks`` took any ``seed``: 1.5 and True silently became seed 1 (``derive_seed`` calls
   ``int``), -1 was accepted; ``make_masks``, ``add_lora`` and ``ModelConfig`` refuse them.
2. A compact sweep of something no other test checks: CapaBoost-LoRA on statically masked
   convolutions of a weight-tied cell (masks attached before or after the LoRA wrappers, every
   impl), against a hand-written loop ``z <- tanh(W2_t relu(W1_t z) + x)`` with
   ``Wi_t = Wi * mask_{index(t)} + sum_c (M_B^c * B)(M_A^c * A)``.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.cores import UnrolledCore
from wtmodels.peft import add_lora


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", None])
def test_apply_masks_refuses_a_seed_make_masks_refuses(seed):
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        wt.apply_masks(conv, k=2, seed=seed)
    assert not hasattr(conv, "weight_masks")  # nothing changed


def test_apply_masks_seed_one_and_seed_one_point_five_no_longer_alias():
    a = wt.apply_masks(nn.Conv2d(4, 4, 3), k=2, seed=1)
    b = wt.apply_masks(nn.Conv2d(4, 4, 3), k=2, seed=2)
    assert not torch.equal(a.weight_masks, b.weight_masks)
    with pytest.raises(ValueError):
        wt.apply_masks(nn.Conv2d(4, 4, 3), k=2, seed=1.5)


class _Cell(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.lin = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, z, x):
        return torch.tanh(self.lin(torch.relu(self.conv(z))) + x)


def _index(t, depth, k, schedule):  # README: cyclic t mod K; block: D / K iterations per mask
    return t % k if schedule == "cyclic" else t * k // depth


def _effective(layer, index):
    base = layer.base
    w = base.weight * base.weight_masks[index]
    ones_a = torch.ones(layer.copies, *layer.lora_A.shape, dtype=torch.bool)
    ones_b = torch.ones(layer.copies, *layer.lora_B.shape, dtype=torch.bool)
    ma = ones_a if layer.mask_A is None else layer.mask_A
    mb = ones_b if layer.mask_B is None else layer.mask_B
    delta = sum((mb[c] * layer.lora_B) @ (ma[c] * layer.lora_A).flatten(1)
                for c in range(layer.copies))
    return w, layer.scale * delta.view_as(w)


def test_capaboost_on_masked_tied_cell_equals_hand_loop_seeded_sweep():
    rng = random.Random(0)
    done = 0
    for case in range(24):
        c, k, depth = 4, rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
        schedule = rng.choice(["cyclic", "block"])
        rank, copies = rng.choice([1, 2]), rng.choice([1, 2, 3])
        density, impl = rng.choice([0.5, 1.0]), rng.choice(["factorized", "dense", "auto"])
        masks_first = rng.random() < 0.5
        torch.manual_seed(case)
        cell = _Cell(c).double()
        core = UnrolledCore(cell, depth)
        if masks_first:
            wt.apply_masks(cell, k=k, density=0.5, seed=case, schedule=schedule)
        layers = add_lora(core, rank=rank, copies=copies, density=density, seed=case, impl=impl)
        if not masks_first:
            wt.apply_masks(cell, k=k, density=0.5, seed=case, schedule=schedule)
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.normal_()
        x = torch.randn(2, c, 4, 4, dtype=torch.float64)
        z = core(x)
        ref = torch.zeros_like(x)
        for t in range(depth):
            i = _index(t, depth, k, schedule)
            (w1, d1), (w2, d2) = _effective(cell.conv, i), _effective(cell.lin, i)
            h = torch.relu(F.conv2d(ref, w1 + d1, cell.conv.base.bias, padding=1))
            ref = torch.tanh(F.conv2d(h, w2 + d2) + x)
        assert torch.allclose(z, ref, atol=1e-10), (case, masks_first, impl, schedule)
        g = torch.randn_like(z)
        factors = [cell.conv.lora_A, cell.lin.lora_B]
        got = torch.autograd.grad((z * g).sum(), factors)
        want = torch.autograd.grad((ref * g).sum(), factors)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want)), case
        done += 1
    assert done == 24
