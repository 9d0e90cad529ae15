"""Tests of mask generation: counts, structure, distinctness, determinism, bad arguments."""

import math

import pytest
import torch

import wtmodels as wt


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
