"""Static sparse masks: generation (random, bernoulli, N:M).

A weight-tied cell applied D times uses the same weights at every iteration. Giving each
iteration one of K distinct static sparse masks varies the effective weights from one iteration
to the next at no extra parameter cost. This module draws those masks.

Example:
    >>> import wtmodels as wt
    >>> masks = wt.make_masks((8, 4, 3, 3), k=4, density=0.5, kind="nm", seed=0)
    >>> masks.shape, masks.dtype
    (torch.Size([4, 8, 4, 3, 3]), torch.bool)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MASK_KINDS = ("random", "bernoulli", "nm")

# Redraws allowed per mask before giving up on distinctness (only reachable when nearly
# every possible mask has already been drawn, e.g. bernoulli at a density close to 1).
_MAX_REDRAWS = 1000


def make_masks(
    shape: int | Sequence[int],
    k: int = 4,
    density: float = 0.5,
    kind: str = "random",
    seed: int = 0,
    *,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Draw ``k`` distinct static sparse masks for a weight of the given shape.

    Kinds:
        - ``"random"``: exactly ``round(density * numel)`` ones per mask, positions drawn
          uniformly without replacement.
        - ``"bernoulli"``: every entry independently one with probability ``density``.
        - ``"nm"``: N:M structure along the flattened input dimension (all dimensions after the
          first, as in 2:4 GEMM sparsity): every group of ``m`` consecutive entries of a row holds
          exactly ``n`` ones. ``m`` defaults to 4 and ``n`` to ``density * m`` (2:4 at density
          0.5). A 1-d shape is a single row.

    The k masks are pairwise distinct (duplicates are redrawn). ``density=1`` is the dense
    reference: it returns k identical all-ones masks. Any other request that admits fewer than k
    distinct masks raises ``ValueError``. The masks depend only on the arguments: the same seed
    gives the same masks bit for bit, whatever the global random state (a private
    ``torch.Generator`` is used).

    Args:
        shape: shape of the weight to mask, e.g. ``(C_out, C_in, kh, kw)``.
        k: number of masks (>= 1).
        density: share of ones, in (0, 1].
        kind: ``"random"``, ``"bernoulli"`` or ``"nm"``.
        seed: seed of the private generator.
        n: ones per group for ``kind="nm"``; if given it must equal ``density * m``.
        m: group size for ``kind="nm"`` (default 4).

    Returns:
        Bool tensor of shape ``(k, *shape)`` on the CPU.

    Raises:
        ValueError: density outside (0, 1], k < 1, unknown kind, an empty shape, an N:M pattern
            the shape cannot hold, or fewer than k distinct masks possible.

    Example:
        >>> import wtmodels as wt
        >>> masks = wt.make_masks((16, 9), k=3, density=0.25, kind="random", seed=1)
        >>> masks.sum(dim=(1, 2)).tolist()
        [36, 36, 36]
    """
    shape = _check_shape(shape)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (
        0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    if kind != "nm" and (n is not None or m is not None):
        raise ValueError(f"n and m apply only to kind='nm', not kind={kind!r}")

    numel = math.prod(shape)
    if density == 1.0:
        if kind == "nm":
            _nm_pattern(shape, density, n, m)  # still validate the pattern arguments
        return torch.ones((k, *shape), dtype=torch.bool)

    generator = torch.Generator().manual_seed(int(seed))
    if kind == "random":
        ones = round(density * numel)
        if ones == 0:
            raise ValueError(
                f"density {density} of a weight with {numel} entries rounds to 0 ones; "
                f"use density >= {0.5 / numel:.3g}"
            )
        possible = math.comb(numel, ones)
        draw = lambda count: _draw_random(count, numel, ones, generator)  # noqa: E731
    elif kind == "bernoulli":
        possible = 2**numel  # every pattern has positive probability when 0 < density < 1
        draw = lambda count: torch.rand(count, numel, generator=generator) < density  # noqa: E731
    else:
        n, m = _nm_pattern(shape, density, n, m)
        rows, cols = shape[0], numel // shape[0]
        groups = rows * (cols // m)
        possible = math.comb(m, n) ** groups
        draw = lambda count: _draw_nm(count, groups, n, m, generator)  # noqa: E731

    if possible < k:
        raise ValueError(
            f"only {possible} distinct {kind!r} masks of shape {tuple(shape)} at density "
            f"{density} exist, fewer than k={k}"
        )
    flat = _distinct(draw, k)  # (k, numel)
    return flat.reshape(k, *shape)


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}") from err
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with every dimension >= 1, got {shape}")
    return shape


def _nm_pattern(
    shape: tuple[int, ...], density: float, n: int | None, m: int | None
) -> tuple[int, int]:
    """Resolve and validate (n, m) of an N:M pattern for ``shape``."""
    m = 4 if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (N:M group size) must be an integer >= 1, got {m!r}")
    implied = density * m
    if n is None:
        if abs(implied - round(implied)) > 1e-9 or round(implied) < 1:
            raise ValueError(
                f"density {density} with m={m} gives n={implied:g} ones per group; N:M needs "
                f"density = n/m for an integer 1 <= n <= m, e.g. "
                f"{', '.join(f'{i}/{m}' for i in range(1, m + 1))}"
            )
        n = round(implied)
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m:
        raise ValueError(f"n must be an integer in [1, m={m}], got {n!r}")
    elif abs(implied - n) > 1e-9:
        raise ValueError(
            f"n={n} and m={m} give density {n / m:g} but density={density}; "
            f"pass density={n}/{m} or leave n out"
        )
    cols = math.prod(shape) // shape[0]
    if cols % m:
        raise ValueError(
            f"an N:M pattern with m={m} needs the flattened input dimension of shape "
            f"{tuple(shape)} ({cols} entries per row) to be a multiple of m"
        )
    return n, m


def _draw_random(count: int, numel: int, ones: int, generator: torch.Generator) -> torch.Tensor:
    """(count, numel) bool, exactly ``ones`` per row at uniformly drawn positions."""
    keys = torch.rand(count, numel, generator=generator)
    idx = keys.argsort(dim=1)[:, :ones]  # a uniform random subset of size `ones` per row
    flat = torch.zeros(count, numel, dtype=torch.bool)
    return flat.scatter_(1, idx, True)


def _draw_nm(count: int, groups: int, n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """(count, groups * m) bool, exactly ``n`` ones in every group of ``m``."""
    keys = torch.rand(count, groups, m, generator=generator)
    idx = keys.argsort(dim=2)[..., :n]  # (count, groups, n)
    flat = torch.zeros(count, groups, m, dtype=torch.bool)
    return flat.scatter_(2, idx, True).reshape(count, groups * m)


def _distinct(draw, k: int) -> torch.Tensor:
    """Draw k rows with ``draw(count)``, redrawing rows equal to an earlier one."""
    flat = draw(k)  # (k, numel)
    for _ in range(_MAX_REDRAWS):
        dup = _duplicate_rows(flat)
        if not dup.any():
            return flat
        flat[dup] = draw(int(dup.sum()))
    raise ValueError(f"could not draw {k} distinct masks in {_MAX_REDRAWS} redraws")


def _duplicate_rows(flat: torch.Tensor) -> torch.Tensor:
    """(k,) bool: True for a row equal to an earlier row."""
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), flat.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(flat.shape[0]), reduce="amin")
    return first[inverse] != torch.arange(flat.shape[0])
