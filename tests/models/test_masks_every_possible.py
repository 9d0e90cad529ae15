"""``make_masks`` on tiny weights, where k may be (nearly) every possible mask.

Known answers: the number of possible masks (``math.comb``, ``2**numel``), and the probabilities
of drawing masks one at a time and setting repeats aside (each draw of ``"bernoulli"`` is a
pattern with probability ``d**ones * (1 - d)**zeros``; ``"random"`` draws are uniform).
Before, a k near the count redrew for up to ~28 s and then failed (``"random"``, 576 entries,
k = 576), or failed for some seeds (``"bernoulli"``, 4 entries, density 0.2, k = 16).
"""

import itertools
import math

import pytest
import torch

import wtmodels as wt


def as_rows(masks: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in masks.reshape(len(masks), -1).int()]


@pytest.mark.parametrize("shape, density, kind, possible", [
    ((576,), 1 / 576, "random", 576),
    ((6,), 0.5, "random", math.comb(6, 3)),
    ((7,), 5 / 7, "random", math.comb(7, 5)),  # listed by their zeros
    ((2, 8), 0.75, "nm", math.comb(4, 3) ** 4),
    ((4,), 0.2, "bernoulli", 2**4),
    ((2, 8), 0.5, "nm", math.comb(4, 2) ** 4),
])
def test_k_equal_to_every_possible_mask_returns_each_once(shape, density, kind, possible):
    for seed in range(20):
        masks = wt.make_masks(shape, k=possible, density=density, kind=kind, seed=seed)
        assert masks.shape == (possible, *shape)
        assert len(set(as_rows(masks))) == possible  # all distinct, hence every one
        if kind == "random":
            assert (masks.reshape(possible, -1).sum(1) == round(density * math.prod(shape))).all()
        if kind == "nm":
            assert (masks.reshape(possible, -1, 4).sum(2) == round(4 * density)).all()
    with pytest.raises(ValueError, match=f"only {possible} distinct"):
        wt.make_masks(shape, k=possible + 1, density=density, kind=kind)


def pattern_probability(pattern, density):
    ones = sum(pattern)
    return density**ones * (1 - density) ** (len(pattern) - ones)


def inclusion_probability(target, patterns, probability, k):
    """P(target among k drawn one at a time, repeats set aside), summed over every order."""
    total = 0.0
    for order in itertools.permutations(patterns, k):
        if target in order:
            p, left = 1.0, 1.0
            for pattern in order:
                p *= probability[pattern] / left
                left -= probability[pattern]
            total += p
    return total


@pytest.mark.parametrize("k", [1, 2, 5, 7])  # 1, 2: drawn and redrawn; 5, 7: from the list
def test_bernoulli_draws_follow_the_pattern_probabilities(k):
    # the first mask is each of the 8 patterns of 3 entries as often as d^ones (1-d)^zeros;
    # the rarest pattern (all ones, 0.027) is among the k as often as drawing one at a time
    # and setting repeats aside makes it
    d, trials = 0.3, 2000
    patterns = list(itertools.product((0, 1), repeat=3))
    probability = {a: pattern_probability(a, d) for a in patterns}
    drawn = [as_rows(wt.make_masks((3,), k=k, density=d, kind="bernoulli", seed=s))
             for s in range(trials)]
    assert all(len(set(rows)) == k for rows in drawn)
    first = [rows[0] for rows in drawn]
    for pattern, p in probability.items():
        assert abs(first.count(pattern) - trials * p) <= 4 * math.sqrt(trials * p * (1 - p)) + 1
    p = inclusion_probability((1, 1, 1), patterns, probability, k)
    count = sum((1, 1, 1) in rows for rows in drawn)
    assert abs(count - trials * p) <= 4 * math.sqrt(trials * p * (1 - p)) + 1


@pytest.mark.parametrize("k", [2, 5])  # 2: drawn and redrawn; 5: from the list
def test_random_draws_are_uniform_over_sets_of_masks(k):
    # k of the 6 masks with 2 ones in 4 entries: each of the C(6, k) sets equally likely
    trials, sets = 2000, math.comb(6, k)
    drawn = [frozenset(as_rows(wt.make_masks((4,), k=k, density=0.5, seed=s)))
             for s in range(trials)]
    assert len(set(drawn)) == sets and all(len(d) == k for d in drawn)
    expected, sd = trials / sets, math.sqrt(trials * (1 / sets) * (1 - 1 / sets))
    assert all(abs(drawn.count(one) - expected) <= 4 * sd for one in set(drawn))


def test_a_large_weight_with_one_zero_lists_its_masks_without_forming_them_all():
    # 4096 entries, one zero: 4096 possible masks; k = 3000 comes from the list, each mask with
    # exactly one zero, all distinct (listing every mask's 4095 ones took ~60 s and GBs)
    masks = wt.make_masks((64, 64), k=3000, density=1 - 1 / 4096, seed=0)
    zeros = (~masks).reshape(3000, -1)
    assert (zeros.sum(1) == 1).all()
    assert len(set(zeros.float().argmax(1).tolist())) == 3000

