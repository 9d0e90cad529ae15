"""Tests of masks: generation (counts, structure, distinctness, seeds) and attaching to layers."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import wtmodels as wt
from wtmodels.masks import (
    apply_masks,
    formed_masks,
    mask_count,
    mask_index,
    mask_schedule,
    remove_masks,
    set_mask_index,
)


def test_random_has_exact_count_and_is_distinct():
    masks = wt.make_masks((6, 5, 3, 3), k=8, density=0.3, kind="random", seed=3)
    assert masks.shape == (8, 6, 5, 3, 3) and masks.dtype == torch.bool
    expected = round(0.3 * 6 * 5 * 9)
    assert masks.flatten(1).sum(1).tolist() == [expected] * 8
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 8


def test_random_positions_are_uniform():
    # every position is one with probability density: mean over many masks is close to it
    masks = wt.make_masks((10, 10), k=2000, density=0.25, kind="random", seed=0)
    freq = masks.float().mean(0)  # (10, 10)
    # binomial std of a frequency at n=2000, p=.25 is ~0.0097; allow 5 sigma
    assert (freq - 0.25).abs().max() < 0.05


def test_bernoulli_density_close_to_p():
    masks = wt.make_masks((64, 64), k=4, density=0.2, kind="bernoulli", seed=1)
    share = masks.float().mean().item()
    assert abs(share - 0.2) < 0.01  # 16384 draws: std ~0.003
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 4


def test_nm_two_four_along_input_dimension():
    masks = wt.make_masks((8, 4, 3, 3), k=4, density=0.5, kind="nm", seed=0)
    groups = masks.reshape(4, 8, 36 // 4, 4)  # (k, rows, groups, m)
    assert (groups.sum(-1) == 2).all()


def test_nm_options_n_m():
    masks = wt.make_masks((3, 16), k=2, density=0.125, kind="nm", n=1, m=8, seed=0)
    assert (masks.reshape(2, 3, 2, 8).sum(-1) == 1).all()
    masks = wt.make_masks((3, 16), k=2, density=0.75, kind="nm", seed=0)  # 3:4
    assert (masks.reshape(2, 3, 4, 4).sum(-1) == 3).all()


def test_same_seed_same_masks_regardless_of_global_rng():
    for kind in ("random", "bernoulli", "nm"):
        torch.manual_seed(0)
        a = wt.make_masks((8, 8), k=3, kind=kind, seed=7)
        torch.manual_seed(123)
        torch.rand(100)
        b = wt.make_masks((8, 8), k=3, kind=kind, seed=7)
        c = wt.make_masks((8, 8), k=3, kind=kind, seed=8)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_global_rng_untouched():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    wt.make_masks((8, 8), k=3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_distinct_when_few_masks_exist():
    # C(4, 2) = 6 masks exist: asking for all 6 must return each exactly once
    masks = wt.make_masks((4,), k=6, density=0.5, kind="random", seed=0)
    assert len({tuple(m.tolist()) for m in masks}) == 6
    with pytest.raises(ValueError, match="distinct"):
        wt.make_masks((4,), k=7, density=0.5, kind="random")
    # one 2:4 row has C(4, 2) = 6 patterns
    with pytest.raises(ValueError, match="distinct"):
        wt.make_masks((1, 4), k=7, density=0.5, kind="nm")


def test_density_one_is_dense():
    for kind in ("random", "bernoulli", "nm"):
        masks = wt.make_masks((4, 8), k=3, density=1.0, kind=kind)
        assert masks.all() and masks.shape == (3, 4, 8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(density=-0.1), "density"),
        (dict(k=0), "k"),
        (dict(kind="gaussian"), "random, bernoulli, nm"),
        (dict(kind="nm", density=0.3), "N:M"),
        (dict(kind="nm", shape=(4, 6)), "multiple of m"),
        (dict(kind="nm", n=1), "density"),
        (dict(kind="random", m=4), "n and m"),
        (dict(shape=(0, 3)), "shape"),
        (dict(density=0.01, shape=(4,)), "rounds to 0"),
    ],
)
def test_bad_arguments(kwargs, field):
    shape = kwargs.pop("shape", (8, 8))
    with pytest.raises(ValueError, match=field):
        wt.make_masks(shape, **kwargs)


def test_large_weight_is_quick_enough_to_draw():
    masks = wt.make_masks((64, 64, 3, 3), k=8, density=0.5, kind="random", seed=0)
    assert masks.flatten(1).sum(1).eq(math.prod((64, 64, 3, 3)) // 2).all()


# ------------------------------------------------------------------------------------------
# Attaching masks to layers



def test_schedules():
    assert [mask_index(t, 8, 3, "cyclic") for t in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [mask_index(t, 8, 4, "block") for t in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [mask_index(t, 7, 3, "block") for t in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="cyclic, block"):
        mask_index(0, 4, 2, "random")


def test_masked_conv_uses_selected_mask():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    apply_masks(conv, k=3, density=0.5, seed=2)
    x = torch.randn(2, 3, 5, 5)
    for i in range(3):
        set_mask_index(conv, i)
        expected = F.conv2d(x, conv.weight * conv.weight_masks[i], conv.bias, padding=1)
        assert torch.allclose(conv(x), expected)
        with formed_masks(conv):
            assert torch.allclose(conv(x), expected)
    # distinct masks give distinct outputs
    set_mask_index(conv, 0)
    y0 = conv(x)
    set_mask_index(conv, 1)
    assert not torch.allclose(y0, conv(x))


class _CountMuls(TorchDispatchMode):
    """Counts elementwise multiplies producing a tensor of each shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mul.Tensor:
            self.shapes.append(tuple(out.shape))
        return out


def test_masked_weights_formed_once_per_forward():
    conv = apply_masks(nn.Conv2d(4, 4, 3, padding=1, bias=False), k=3, density=0.5)
    x = torch.randn(1, 4, 6, 6)
    with _CountMuls() as counter, formed_masks(conv):
        z = x
        for t in range(6):
            set_mask_index(conv, t % 3)
            z = conv(z)
    assert counter.shapes.count((3, 4, 4, 3, 3)) == 1  # all K masked weights in one multiply
    assert counter.shapes.count((4, 4, 3, 3)) == 0  # none per iteration


def test_gradient_reaches_the_shared_weight_only_through_kept_entries():
    lin = apply_masks(nn.Linear(6, 5, bias=False), k=2, density=0.5, types=(nn.Linear,))
    x = torch.randn(3, 6)
    with formed_masks(lin):
        set_mask_index(lin, 0)
        y = lin(x)
        set_mask_index(lin, 1)
        y = y + lin(x)
    y.sum().backward()
    union = lin.weight_masks.any(0)
    assert (lin.weight.grad[~union] == 0).all()
    assert (lin.weight.grad[union] != 0).all()
    # equals the sum of the grads of the two masked linear maps
    colsum = x.sum(0).expand(5, 6)  # d(sum of W x)/dW for a batch
    expected = colsum * lin.weight_masks[0] + colsum * lin.weight_masks[1]
    assert torch.allclose(lin.weight.grad, expected)


def test_masks_add_no_parameters_and_are_saved():
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    before = [n for n, _ in net.named_parameters()]
    apply_masks(net, k=4, density=0.25, kind="nm", seed=9, schedule="block")
    assert [n for n, _ in net.named_parameters()] == before
    state = net.state_dict()
    assert state["0.weight_masks"].shape == (4, 4, 4, 3, 3)
    assert state["0.weight_masks"].dtype == torch.bool
    assert not torch.equal(state["0.weight_masks"], state["2.weight_masks"])  # own seed per layer
    assert mask_count(net) == 4 and mask_schedule(net) == "block"


def test_masks_compose_with_weight_norm():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3))
    apply_masks(conv, k=2, density=0.5)
    x = torch.randn(1, 3, 4, 4)
    set_mask_index(conv, 1)
    with formed_masks(conv):
        y = conv(x)
    assert torch.allclose(y, F.conv2d(x, conv.weight * conv.weight_masks[1], conv.bias))
    y.sum().backward()
    params = dict(conv.named_parameters())
    assert params["parametrizations.weight.original0"].grad is not None
    assert params["parametrizations.weight.original1"].grad is not None


def test_remove_masks_restores_dense_layer():
    conv = nn.Conv2d(2, 2, 3)
    x = torch.randn(1, 2, 4, 4)
    expected = conv(x)
    remove_masks(apply_masks(conv, k=2))
    assert type(conv) is nn.Conv2d and "weight_masks" not in conv.state_dict()
    assert torch.equal(conv(x), expected)


def test_apply_masks_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        apply_masks(nn.Conv2d(2, 2, 1), k=2, schedule="zigzag")
    with pytest.raises(ValueError, match="no layer"):
        apply_masks(nn.Sequential(nn.ReLU()), k=2)
    with pytest.raises(ValueError, match="types"):
        apply_masks(nn.Conv2d(2, 2, 1), k=2, types=(nn.ReLU,))
    with pytest.raises(ValueError, match="density"):
        apply_masks(nn.Conv2d(2, 2, 1), k=2, density=0)
    conv = apply_masks(nn.Conv2d(2, 2, 1), k=2)
    with pytest.raises(ValueError, match="already masked"):
        apply_masks(conv, k=2)
    with pytest.raises(ValueError, match="mask index"):
        set_mask_index(conv, 2)


@pytest.mark.parametrize("seed", [None, -1, 1.5, "0", True])
def test_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        wt.make_masks((4, 4), k=2, seed=seed)


def test_nm_on_a_1d_shape_is_one_row_of_groups():
    masks = wt.make_masks((16,), k=3, density=0.5, kind="nm", seed=0)
    assert masks.shape == (3, 16)
    assert (masks.view(3, 4, 4).sum(-1) == 2).all()  # 2 of every 4 consecutive entries
    with pytest.raises(ValueError, match="multiple of m"):
        wt.make_masks((6,), k=1, density=0.5, kind="nm")


def test_a_layer_with_its_own_forward_is_refused_and_attention_out_proj_skipped():
    class StdConv2d(nn.Conv2d):  # weight standardisation (timm): its forward must not be lost
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return self._conv_forward(x, w, self.bias)

    net = nn.Sequential(nn.Conv2d(2, 4, 3), StdConv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"'1' \(StdConv2d\) overrides forward"):
        wt.apply_masks(net, k=2)
    assert not hasattr(net[0], "weight_masks")  # nothing changed
    # a parametrized conv (weight norm) keeps the plain forward: masked as before
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 2, 3))
    assert mask_count(wt.apply_masks(conv, k=2)) == 2
    # MultiheadAttention reads out_proj.weight directly: a mask there could never apply
    block = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "ff": nn.Linear(8, 8)})
    wt.apply_masks(block, k=2, types=(nn.Linear,))
    assert hasattr(block["ff"], "weight_masks")
    assert not hasattr(block["attn"].out_proj, "weight_masks")


def test_make_masks_takes_numpy_numbers_and_refuses_fractional_shapes():
    import numpy as np

    masks = wt.make_masks((4, 8), k=2, density=np.float32(0.5), seed=np.int64(1))
    assert masks.shape == (2, 4, 8) and masks.sum().item() == 2 * 16
    with pytest.raises(ValueError, match="shape must be an int or a sequence of ints"):
        wt.make_masks((2.7, 8), k=2)  # was silently (2, 8)


def test_apply_masks_takes_one_layer_class():
    layer = apply_masks(nn.Linear(3, 4), k=2, types=nn.Linear)
    assert layer.weight_masks.shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"got \('Linear',\)"):
        apply_masks(nn.Linear(3, 4), k=2, types="Linear")


@pytest.mark.parametrize("numel", [1, 2, 3, 10, 576, 100_000])
def test_density_hint_of_a_too_sparse_mask_is_valid(numel):
    # round() halves to even: the hint 0.5 / numel (e.g. 0.05 for 10 entries) failed itself
    with pytest.raises(ValueError, match="rounds to 0 ones") as err:
        wt.make_masks((numel,), k=1, density=1e-9)
    hint = float(re.search(r">= ([0-9.e+-]+)", str(err.value)).group(1))
    assert int(wt.make_masks((numel,), k=1, density=hint).sum()) == 1
