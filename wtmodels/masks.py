"""Static sparse masks: generation (random, bernoulli, N:M).

A weight-tied cell applied D times uses the same weights at every iteration. Giving each
iteration one of K distinct static sparse masks varies the effective weights from one iteration
to the next at no extra parameter cost. This module draws those masks (:func:`make_masks`)
and attaches them post-hoc to the layers of a built module, chosen by type, the way weight norm
is attached (:func:`apply_masks`), so model classes hold no mask logic.

A masked layer keeps its one shared weight ``W`` and a bool buffer ``weight_masks`` of shape
``(K, *W.shape)`` (saved in the ``state_dict``). It multiplies by mask ``mask_index``; the caller
(a core running the cell) picks the index per iteration with :func:`set_mask_index` and the
schedule (:func:`mask_index`). Inside :func:`formed_masks` the K masked weights are formed once,
in one multiply per layer, and every iteration reads its slice, so a forward pass of D iterations
pays for the masking once; gradients of all slices reach the shared ``W``.

Example:
    >>> import torch, wtmodels as wt
    >>> masks = wt.make_masks((8, 4, 3, 3), k=4, density=0.5, kind="nm", seed=0)
    >>> masks.shape, masks.dtype
    (torch.Size([4, 8, 4, 3, 3]), torch.bool)
    >>> conv = apply_masks(torch.nn.Conv2d(4, 8, 3), k=4, density=0.5)
    >>> with formed_masks(conv):
    ...     set_mask_index(conv, 1)
    ...     y = conv(torch.randn(2, 4, 5, 5))
    >>> y.shape
    torch.Size([2, 8, 3, 3])
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from wtmodels.keywords import refuse_unknown

MASK_KINDS = ("random", "bernoulli", "nm")
MASK_SCHEDULES = ("cyclic", "block")
MASKABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Redraws allowed per mask before giving up on distinctness (only reachable when nearly
# every possible mask has already been drawn, e.g. bernoulli at a density close to 1).
_MAX_REDRAWS = 1000
# A weight admitting at most this many masks draws its k from the list of all of them (the
# same distribution) when redrawing would be slow: when the k - 1 likeliest masks carry over
# half the probability (redraws could take minutes, or fail, when k is near the count).
_ENUMERATE_LIMIT = 2**14


def make_masks(
    shape: int | Sequence[int],
    k: int = 4,
    density: float = 0.5,
    kind: str = "random",
    seed: int = 0,
    *,
    n: int | None = None,
    m: int | None = None,
    **unknown,
) -> torch.Tensor:
    """Draw ``k`` distinct static sparse masks for a weight of the given shape.

    Kinds:
        - ``"random"``: exactly ``round(density * numel)`` ones per mask, positions drawn
          uniformly without replacement.
        - ``"bernoulli"``: every entry independently one with probability ``density``.
        - ``"nm"``: N:M structure along the flattened input dimension (all dimensions after the
          first, in PyTorch's ``(in, kh, kw)`` order): every group of ``m`` consecutive entries
          of a row holds exactly ``n`` ones. ``m`` defaults to 4 and ``n`` to ``density * m``
          (2:4 at density 0.5). A 1-d shape is a single row. For a linear layer this is the
          2:4 layout sparse tensor cores use; for a conv a group spans consecutive kernel
          positions (with a 3x3 kernel some groups cross into the next input channel), not
          the channels at one position (NVIDIA's layout), so these masks study the
          structure, not hardware speed.

    The k masks are pairwise distinct (duplicates are redrawn). Where redrawing would be slow, on
    a weight with at most 2**14 possible masks whose k - 1 likeliest masks hold over half the
    probability (k near that count; ``"bernoulli"`` at a density near 0 or 1 on a few entries),
    the k are drawn from the list of all masks instead, with the same distribution, so every k
    up to the count of possible masks succeeds at once.
    ``density=1`` is the dense reference: it returns k identical all-ones masks. Any other
    request that admits fewer than k distinct masks raises ``ValueError``. The masks depend only
    on the arguments: the same seed gives the same masks bit for bit, whatever the global
    random state (a private ``torch.Generator`` is used).

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
        ValueError: density outside (0, 1], k < 1, unknown kind or keyword, an empty shape, an
            N:M pattern the shape cannot hold, or fewer than k distinct masks possible.

    Example:
        >>> import wtmodels as wt
        >>> masks = wt.make_masks((16, 9), k=3, density=0.25, kind="random", seed=1)
        >>> masks.sum(dim=(1, 2)).tolist()
        [36, 36, 36]
    """
    refuse_unknown("make_masks", unknown, ("shape", "k", "density", "kind", "seed", "n", "m"))
    shape, k, density, n, m = _resolve(shape, k, density, kind, seed, n, m)
    if density == 1.0:
        return torch.ones((k, *shape), dtype=torch.bool)

    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(int(seed))
    if (every := _all_masks_if_crowded(shape, k, density, kind, n, m)) is not None:
        return _draw_from_all(every, k, generator).reshape(k, *shape)
    if kind == "random":
        ones = round(density * numel)
        draw = lambda count: _draw_random(count, numel, ones, generator)  # noqa: E731
    elif kind == "bernoulli":
        draw = lambda count: torch.rand(count, numel, generator=generator) < density  # noqa: E731
    else:
        groups = _rows_cols(shape)[0] * (_rows_cols(shape)[1] // m)
        draw = lambda count: _draw_nm(count, groups, n, m, generator)  # noqa: E731
    flat = _distinct(draw, k)  # (k, numel)
    return flat.reshape(k, *shape)


def check_masks(
    shape: int | Sequence[int],
    k: int = 4,
    density: float = 0.5,
    kind: str = "random",
    seed: int = 0,
    *,
    n: int | None = None,
    m: int | None = None,
) -> None:
    """Raise the ``ValueError`` :func:`make_masks` would raise for these arguments, drawing
    nothing (cheap for any shape: a config can be checked before a model is built).

    Example:
        >>> check_masks((8, 8, 3, 3), k=4, density=0.5, kind="nm")
        >>> check_masks((6, 6, 3, 3), k=4, density=0.3, kind="nm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: density 0.3 with m=4 gives n=1.2 ones per group; ...
    """
    _resolve(shape, k, density, kind, seed, n, m)


def _resolve(shape, k, density, kind, seed, n, m):
    """Validate the arguments of :func:`make_masks`; return ``(shape, k, density, n, m)``."""
    shape = _check_shape(shape)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
            or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer >= 0 and < 2**64, got {seed!r}")
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not (
        0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    density = float(density)  # numpy scalars too
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    if kind != "nm" and (n is not None or m is not None):
        raise ValueError(f"n and m apply only to kind='nm', not kind={kind!r}")

    numel = math.prod(shape)
    if kind == "nm":
        n, m = _nm_pattern(shape, density, n, m)  # validated at density 1 too
    if density == 1.0:
        return shape, k, density, n, m

    if kind == "random":
        ones = round(density * numel)
        if ones == 0:  # round() halves to even: density 0.5 / numel gives 0 too
            raise ValueError(
                f"density {density} of a weight with {numel} entries rounds to 0 ones; "
                f"use density >= {1 / numel:.3g} (one entry)"
            )
    elif kind == "bernoulli":
        # every pattern is possible when 0 < density < 1, but with under half a one (or, for
        # k > 1, half a zero) expected per mask nearly every draw is the all-zero (all-ones)
        # mask: the redraws then failed at build time, after validation had passed
        if round(density * numel) == 0:
            raise ValueError(
                f"density {density} of a weight with {numel} entries expects "
                f"{density * numel:.3g} ones per 'bernoulli' mask (rounds to 0); use density "
                f">= {1 / numel:.3g} (one entry)"
            )
        if k > 1 and round((1 - density) * numel) == 0:
            raise ValueError(
                f"density {density} of a weight with {numel} entries expects "
                f"{(1 - density) * numel:.3g} zeros per 'bernoulli' mask (rounds to 0): "
                f"k={k} masks would be all-ones, not distinct; use density <= "
                f"{1 - 1 / numel!r} (one zero) or density=1 (the dense reference)"
            )
    log_possible = _log_possible(shape, kind, density, n, m)
    if log_possible < math.log(k) - 1e-9:
        raise ValueError(
            f"only {round(math.exp(log_possible))} distinct {kind!r} masks of shape "
            f"{tuple(shape)} at density {density} exist, fewer than k={k}"
        )
    return shape, k, density, n, m


def _log_possible(shape, kind, density, n, m) -> float:
    """log of the number of distinct masks of ``kind`` for a weight of ``shape`` (density < 1)."""
    numel = math.prod(shape)
    if kind == "random":
        return _log_comb(numel, round(density * numel))
    if kind == "bernoulli":
        return numel * math.log(2)
    return _rows_cols(shape)[0] * (_rows_cols(shape)[1] // m) * _log_comb(m, n)


def _all_masks(shape, kind, density, n, m):
    """Every possible mask of a small weight, as ``(log_p, rows)``: ``log_p`` (P,) the
    log-probability (up to a constant) that one draw of ``kind`` gives each (uniform for
    ``random`` / ``nm``, ``ones * log(density) + zeros * log(1 - density)`` for ``bernoulli``)
    and ``rows(index)`` the masks numbered ``index`` as ``(len(index), numel)`` bool, built only
    for those (a 16384-entry weight with one zero has 16384 masks of 16384 entries)."""
    numel = math.prod(shape)
    if kind == "bernoulli":  # numel <= log2(_ENUMERATE_LIMIT)
        every = (torch.arange(2**numel)[:, None] >> torch.arange(numel)) & 1  # (P, numel)
        ones = every.sum(dim=1, dtype=torch.float64)
        log_p = ones * math.log(density) + (numel - ones) * math.log1p(-density)
        return log_p, lambda index: every[index].bool()
    if kind == "random":
        groups, size, per_group = 1, numel, round(density * numel)
    else:
        groups, size, per_group = _rows_cols(shape)[0] * (_rows_cols(shape)[1] // m), m, n
    few = min(per_group, size - per_group)  # list the ones, or the zeros where they are fewer
    choices = torch.tensor(list(itertools.combinations(range(size), few))).reshape(-1, few)
    count = len(choices)  # (count, few): one group's possible patterns

    def rows(index: torch.Tensor) -> torch.Tensor:
        digits = torch.stack([index // count**g % count for g in range(groups)], 1)
        picked = torch.zeros(len(index), groups, size, dtype=torch.bool)
        picked.scatter_(2, choices[digits], True)  # (len, groups, size)
        return (picked if few == per_group else ~picked).reshape(len(index), groups * size)

    return torch.zeros(count**groups, dtype=torch.float64), rows


def _all_masks_if_crowded(shape, k, density, kind, n, m):
    """``_all_masks(...)`` when redraws would be slow (the k - 1 likeliest of at most
    ``_ENUMERATE_LIMIT`` masks hold over half the probability, so later draws mostly repeat);
    else None, and the masks are drawn as always."""
    log_possible = _log_possible(shape, kind, density, n, m)
    if k == 1 or log_possible > math.log(_ENUMERATE_LIMIT):
        return None
    if kind != "bernoulli" and k - 1 <= 0.5 * round(math.exp(log_possible)):  # uniform
        return None
    log_p, rows = _all_masks(shape, kind, density, n, m)
    p = (log_p - log_p.max()).exp()
    return (log_p, rows) if p.sort(descending=True).values[:k - 1].sum() > 0.5 * p.sum() else None


def _draw_from_all(every, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct masks of ``every = (log_p, rows)`` in the order of drawing one at a time with
    probabilities ``exp(log_p)`` and setting repeats aside (Gumbel top-k, exact: Plackett-Luce)."""
    log_p, rows = every
    uniform = torch.rand(len(log_p), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return rows((log_p + gumbel).topk(k).indices)  # (k, numel)


def _log_comb(n: int, r: int) -> float:
    """log C(n, r), without forming the (possibly huge) integer."""
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
            raise TypeError  # 2.7 must not become 2
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with every dimension >= 1, got {shape}")
    return shape


def _nm_pattern(
    shape: tuple[int, ...], density: float, n: int | None, m: int | None
) -> tuple[int, int]:
    """Resolve and validate (n, m) of an N:M pattern for ``shape``."""
    m = 4 if m is None else m
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"m (N:M group size) must be an integer >= 1, got {m!r}")
    m = int(m)
    implied = density * m
    # 1e-6: a float32 density such as 0.1 is 1.5e-9 off (x m = 10: 1.5e-8)
    if n is None:
        if abs(implied - round(implied)) > 1e-6 or round(implied) < 1:
            raise ValueError(
                f"density {density} with m={m} gives n={implied:g} ones per group; N:M needs "
                f"density = n/m for an integer 1 <= n <= m, e.g. "
                f"{', '.join(f'{i}/{m}' for i in range(1, m + 1))}"
            )
        n = round(implied)
    elif isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= m:
        raise ValueError(f"n must be an integer in [1, m={m}], got {n!r}")
    elif abs(implied - n) > 1e-6:
        raise ValueError(
            f"n={n} and m={m} give density {n / m:g} but density={density}; "
            f"pass density={n}/{m} or leave n out"
        )
    n = int(n)
    _, cols = _rows_cols(shape)
    if cols % m:
        raise ValueError(
            f"an N:M pattern with m={m} needs the flattened input dimension of shape "
            f"{tuple(shape)} ({cols} entries per row) to be a multiple of m"
        )
    return n, m


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, entries per row) of a weight: the first dimension and the rest; a 1-d shape is
    one row."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape) // shape[0]


def _draw_random(count: int, numel: int, ones: int, generator: torch.Generator) -> torch.Tensor:
    """(count, numel) bool, exactly ``ones`` per row at uniformly drawn positions."""
    flat = torch.zeros(count, numel, dtype=torch.bool)
    for row in flat:  # the first `ones` entries of a random permutation: a uniform subset
        row[torch.randperm(numel, generator=generator)[:ones]] = True
    return flat


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


# --------------------------------------------------------------------------------------------
# Attaching masks to layers


def mask_index(t: int, depth: int, k: int, schedule: str = "cyclic") -> int:
    """Index of the mask that iteration ``t`` (0-based) of ``depth`` uses among ``k`` masks.

    ``"cyclic"``: ``t mod k`` (masks 0, 1, ..., k-1, 0, 1, ...). ``"block"``: consecutive blocks
    of about ``depth / k`` iterations share a mask (``t * k // depth``), so every mask is used
    for the same number of iterations (up to one) when ``k <= depth``.

    Args:
        t: iteration, ``0 <= t < depth`` for ``"block"``; any ``t >= 0`` for ``"cyclic"``.
        depth: number of iterations.
        k: number of masks.
        schedule: ``"cyclic"`` or ``"block"``.

    Returns:
        The mask index in ``[0, k)``.

    Example:
        >>> [mask_index(t, 6, 3, "cyclic") for t in range(6)]
        [0, 1, 2, 0, 1, 2]
        >>> [mask_index(t, 6, 3, "block") for t in range(6)]
        [0, 0, 1, 1, 2, 2]
    """
    for name, value, low in (("t", t, 0), ("depth", depth, 1), ("k", k, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if schedule == "cyclic":
        return t % k
    if schedule == "block":
        if t >= depth:  # the blocks tile iterations 0 .. depth-1; t >= depth was clamped silently
            raise ValueError(f"t must be < depth={depth} for the 'block' schedule, got {t}")
        return t * k // depth
    raise ValueError(
        f"unknown mask schedule {schedule!r}; valid schedules: {', '.join(MASK_SCHEDULES)}"
    )


def apply_to_mask_stacks(module: nn.Module, names: tuple[str, ...], module_apply, fn,
                         recurse: bool = True) -> nn.Module:
    """``module_apply(fn, recurse)`` (a module's ``nn.Module._apply``) with the buffers ``names``,
    stacks ``(K, *weight.shape)`` of masks, converted as ``K * weight.shape[0]`` weight-shaped
    rows: a memory format then reaches them as it reaches the weight
    (``.to(memory_format=torch.channels_last)`` refuses a 5-d ``(K, out, in, kh, kw)`` tensor
    itself). The buffers keep their place in the state dict and stay bool (``Module.type``
    converts every tensor).

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> lin.register_buffer("masks", torch.ones(4, 2, 3, dtype=torch.bool))  # (K, out, in)
        >>> _ = apply_to_mask_stacks(lin, ("masks",), lin._apply, lambda t: t.double())
        >>> lin.weight.dtype, lin.masks.dtype, lin.masks.shape
        (torch.float64, torch.bool, torch.Size([4, 2, 3]))
        >>> conv = apply_masks(nn.Conv2d(2, 4, 3), k=3).to(memory_format=torch.channels_last)
        >>> conv.weight_masks[0].is_contiguous(memory_format=torch.channels_last)
        True
    """
    held = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    for n in held:
        module._buffers[n] = None  # skipped by _apply
    try:
        module_apply(fn, recurse)
    finally:
        module._buffers.update(held)
    for n, stack in held.items():
        if stack.dim() >= 3:
            converted = fn(stack.flatten(0, 1)).view(stack.shape)
        else:
            converted = fn(stack)
        if stack.dtype == torch.bool and converted.dtype != torch.bool:
            converted = converted != 0  # Module.type(dtype) converts every tensor: masks stay
        module._buffers[n] = converted  # bool (their 0 / 1 values are exact in any dtype)
    return module


class MaskedLayer:
    """Mixin that makes a conv / linear layer multiply its weight by one of its masks.

    :func:`apply_masks` swaps a layer's class to a subclass with this mixin (as
    ``torch.nn.utils.parametrize`` does), so the layer keeps its parameters, parametrizations
    (weight norm, spectral norm) and ``state_dict`` keys, plus the buffer ``weight_masks``.

    Example:
        >>> conv = apply_masks(nn.Conv2d(2, 4, 3), k=3, density=0.5)
        >>> isinstance(conv, MaskedLayer), conv.weight_masks.shape
        (True, torch.Size([3, 4, 2, 3, 3]))
        >>> set_mask_index(conv, 2)
        >>> torch.equal(conv.masked_weight(), conv.weight * conv.weight_masks[2])
        True
        >>> int(conv.masked_weight().count_nonzero()), conv.weight.numel()  # density 0.5
        (36, 72)
    """

    weight_masks: torch.Tensor  # (K, *weight.shape) bool
    mask_index: int
    mask_schedule: str
    _mask_stack: tuple[torch.Tensor, ...] | None

    def masked_weight(self) -> torch.Tensor:
        """The weight times mask ``mask_index`` (a slice of the formed stack when formed)."""
        if self._mask_stack is not None:
            return self._mask_stack[self.mask_index]
        return self.weight * self.weight_masks[self.mask_index]

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ...) with the masks converted as a stack of
        weight-shaped tensors (see :func:`apply_to_mask_stacks`)."""
        return apply_to_mask_stacks(self, ("weight_masks",), super()._apply, fn, recurse)

    def __reduce_ex__(self, protocol):
        # the masked subclass of a user's conv / linear subclass is made on demand
        # (_masked_class), so pickle cannot find it by name: rebuild it from its base class
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if (cls.__bases__[0] is MaskedLayer and cls.__bases__[1] not in _STATIC_BASES
                and _MASKED_CLASSES.get(cls.__bases__[1]) is cls):
            return (_new_masked, (cls.__bases__[1],), *reduced[2:])
        return reduced

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        weight = self.masked_weight()
        if isinstance(self, nn.Linear):
            return F.linear(input, weight, self.bias)
        return self._conv_forward(input, weight, self.bias)


class MaskedConv1d(MaskedLayer, nn.Conv1d):
    """``nn.Conv1d`` with static masks (made by :func:`apply_masks`).

    Example:
        >>> conv = apply_masks(nn.Conv1d(2, 4, 3), k=2, types=(nn.Conv1d,))
        >>> type(conv).__name__, conv.weight_masks.shape, conv(torch.randn(1, 2, 5)).shape
        ('MaskedConv1d', torch.Size([2, 4, 2, 3]), torch.Size([1, 4, 3]))
    """


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` with static masks (made by :func:`apply_masks`).

    Example:
        >>> conv = apply_masks(nn.Conv2d(2, 4, 3, padding=1), k=2)
        >>> set_mask_index(conv, 1)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> ref = F.conv2d(x, conv.weight * conv.weight_masks[1], conv.bias, padding=1)
        >>> type(conv).__name__, torch.allclose(conv(x), ref)
        ('MaskedConv2d', True)
    """


class MaskedConv3d(MaskedLayer, nn.Conv3d):
    """``nn.Conv3d`` with static masks (made by :func:`apply_masks`).

    Example:
        >>> conv = apply_masks(nn.Conv3d(2, 4, 3), k=2, types=(nn.Conv3d,))
        >>> type(conv).__name__, conv(torch.randn(1, 2, 3, 3, 3)).shape
        ('MaskedConv3d', torch.Size([1, 4, 1, 1, 1]))
    """


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with static masks (made by :func:`apply_masks`).

    Example:
        >>> lin = apply_masks(nn.Linear(4, 3), k=2, density=0.5, types=(nn.Linear,))
        >>> set_mask_index(lin, 1)
        >>> x = torch.randn(5, 4)
        >>> ref = x @ (lin.weight * lin.weight_masks[1]).T + lin.bias
        >>> type(lin).__name__, torch.allclose(lin(x), ref)
        ('MaskedLinear', True)
    """


_MASKED_CLASSES: dict[type, type] = {
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
    nn.Linear: MaskedLinear,
}


_STATIC_BASES = tuple(_MASKED_CLASSES)  # their masked classes are importable by name


def _new_masked(base: type) -> nn.Module:
    """Unpickling: an empty instance of the masked subclass of ``base`` (see
    ``MaskedLayer.__reduce_ex__``)."""
    cls = _masked_class(base)
    return cls.__new__(cls)


_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


def _masked_class(cls: type) -> type:
    """The masked subclass of ``cls`` (made once per class)."""
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (MaskedLayer, cls), {})
    return _MASKED_CLASSES[cls]


def _rebased(cls: type, base: type) -> type:
    """A copy of torch's per-layer parametrized class ``cls`` (its parametrized-tensor
    properties, ``__getstate__``, ``__deepcopy__``) over another ``base``, named as torch
    names it (``Parametrized`` + the base's name)."""
    body = {key: value for key, value in vars(cls).items()
            if key not in ("__dict__", "__weakref__", "__qualname__")}
    return type(f"Parametrized{base.__name__}", (base,), body)


def _class_with_masks(layer: nn.Module) -> type:
    """The class a layer takes when masked. A parametrized layer (weight norm, ...) keeps
    torch's parametrized class on top, over the masked subclass of its class before the
    parametrizations, so ``parametrize.remove_parametrizations`` (which deletes the property
    from the layer's class and steps to its first base) leaves a masked plain layer."""
    if parametrize.is_parametrized(layer):
        return _rebased(type(layer), _masked_class(parametrize.type_before_parametrizations(layer)))
    return _masked_class(type(layer))


def _class_without_masks(layer: nn.Module) -> type | None:
    """The class a masked layer takes when its masks are removed (None: not one of ours)."""
    masked = set(_MASKED_CLASSES.values())
    if type(layer) in masked:
        return type(layer).__bases__[1]  # (MaskedLayer, base)
    if parametrize.is_parametrized(layer):
        before = parametrize.type_before_parametrizations(layer)
        if before in masked:  # masks before or after the parametrizations
            return _rebased(type(layer), before.__bases__[1])
    return None


def derive_seed(seed: int, *path: object) -> int:
    """A seed for a part (layer, cell) derived from a base seed and the part's path.

    Deterministic across runs and platforms (a SHA-256 of the arguments), so every layer gets its
    own masks and two builds with the same base seed get the same ones.

    Example:
        >>> derive_seed(0, "conv1") == derive_seed(0, "conv1") != derive_seed(0, "conv2")
        True
    """
    digest = hashlib.sha256(repr((int(seed), *path)).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def apply_masks(
    module: nn.Module,
    k: int,
    density: float = 0.5,
    kind: str = "random",
    seed: int = 0,
    schedule: str = "cyclic",
    types: tuple[type, ...] = (nn.Conv2d,),
    *,
    n: int | None = None,
    m: int | None = None,
    **unknown,
) -> nn.Module:
    """Attach ``k`` distinct static masks to every layer of the given types inside ``module``.

    Post-hoc, like weight norm: each matching layer (``module`` itself included) gets a bool
    buffer ``weight_masks`` ``(k, *weight.shape)`` drawn by :func:`make_masks` with a seed
    derived from ``seed`` and the layer's name, and multiplies its weight by mask
    ``mask_index`` (0 until :func:`set_mask_index` changes it). Parameters are unchanged: masks
    add no trainable parameters. Weight norm / spectral norm parametrizations may be attached
    before or after; the mask multiplies the parametrized weight.

    Args:
        module: the module to mask (e.g. a cell).
        k: number of masks per layer (>= 1).
        density: share of kept weights, in (0, 1].
        kind: ``"random"``, ``"bernoulli"`` or ``"nm"`` (see :func:`make_masks`).
        seed: base seed.
        schedule: which mask iteration t uses, ``"cyclic"`` or ``"block"`` (see
            :func:`mask_index`); stored on the layers for the caller to read with
            :func:`mask_schedule`.
        types: layer type(s) to mask, among ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (subclasses
            included, parametrized ones too, but not one that overrides ``forward``: a
            ``ValueError``). The ``out_proj`` of an ``nn.MultiheadAttention`` is skipped (the
            attention reads its weight directly).
        n: ones per group for ``kind="nm"``.
        m: group size for ``kind="nm"``.

    Returns:
        ``module`` (masked in place).

    Raises:
        ValueError: bad mask arguments, an unknown schedule, an unsupported type, no layer of
            the types in ``module``, or a layer that is already masked.

    Example:
        >>> import torch
        >>> cell = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> cell = apply_masks(cell, k=4, density=0.25, seed=0)
        >>> mask_count(cell), cell[0].weight_masks.shape
        (4, torch.Size([4, 8, 3, 3, 3]))
    """
    refuse_unknown("apply_masks", unknown, ("module", "k", "density", "kind", "seed",
                                             "schedule", "types", "n", "m"))
    if schedule not in MASK_SCHEDULES:
        raise ValueError(
            f"unknown mask schedule {schedule!r}; valid schedules: {', '.join(MASK_SCHEDULES)}"
        )
    # derive_seed would take int(seed): 1.5 and True silently became seed 1, -1 was accepted
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    # one class (or a stray string) is one item, as add_lora's targets take it
    types = (types,) if isinstance(types, (type, str)) else tuple(types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, MASKABLE_TYPES))]
    if not types or bad:
        raise ValueError(
            f"types must be layer classes among "
            f"{', '.join(t.__name__ for t in MASKABLE_TYPES)} (or subclasses), got {types}"
        )
    # an nn.MultiheadAttention reads its out_proj's weight directly (never calls its forward):
    # a mask there would silently never apply, so that layer is skipped
    attention_outs = {id(sub.out_proj) for sub in module.modules()
                      if isinstance(sub, nn.MultiheadAttention)}
    layers = [(name, sub) for name, sub in module.named_modules()
              if isinstance(sub, types) and id(sub) not in attention_outs]
    if not layers:
        raise ValueError(
            f"no layer of types {', '.join(t.__name__ for t in types)} in "
            f"{type(module).__name__}"
        )
    for name, layer in layers:
        if isinstance(layer, MaskedLayer):
            raise ValueError(f"layer {name or type(layer).__name__!r} is already masked")
        if type(layer).forward not in _PLAIN_FORWARDS:  # the masked class's forward replaces it
            raise ValueError(
                f"layer {name or type(layer).__name__!r} ({type(layer).__name__}) overrides "
                "forward, which masking would replace by the plain conv / linear one; mask a "
                "plain layer (or its weight yourself)"
            )
    drawn = [
        make_masks(
            tuple(layer.weight.shape), k, density, kind, derive_seed(seed, name), n=n, m=m
        )
        for name, layer in layers
    ]  # validate every layer before changing any
    for (_, layer), masks in zip(layers, drawn):
        layer.register_buffer("weight_masks", masks.to(layer.weight.device))
        layer.mask_index = 0
        layer.mask_schedule = schedule
        layer._mask_stack = None
        layer.__class__ = _class_with_masks(layer)
    # a transformer layer's fused eval path would read the unmasked weights
    keep_transformer_fused_path_off(module, lambda sub: isinstance(sub, MaskedLayer))
    return module


def _fused_path_off(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook: torch skips a transformer layer's fused eval path when it has
    one."""


def keep_transformer_fused_path_off(model: nn.Module, holds: Callable[[nn.Module], bool]
                                    ) -> None:
    """Make every ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in ``model`` that
    holds a module for which ``holds`` is true take its module-by-module path in eval mode.

    Their fused eval path reads ``linear1`` / ``linear2``'s weights directly, so a masked or
    wrapped layer there would be skipped silently (or fail). torch takes the plain path for a
    layer with forward hooks (torch 2.4 does not check them), for a layer whose
    ``activation_relu_or_gelu`` flag is 0 (every torch since the fused path; read by nothing
    else but that path's GELU switch, and the plain path applies ``activation``), and for a
    stack whose ``use_nested_tensor`` is False. A layer gets both the hook and the flag.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> keep_transformer_fused_path_off(layer, lambda m: isinstance(m, torch.nn.Linear))
        >>> len(layer._forward_pre_hooks), layer.activation_relu_or_gelu
        (1, 0)
    """
    for sub in model.modules():
        if not isinstance(sub, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(holds(m) for m in sub.modules()):
            continue
        if isinstance(sub, nn.TransformerEncoder):
            sub.use_nested_tensor = False
        else:
            sub.activation_relu_or_gelu = 0
            if _fused_path_off not in sub._forward_pre_hooks.values():
                sub.register_forward_pre_hook(_fused_path_off)


def remove_masks(module: nn.Module) -> nn.Module:
    """Detach the masks from every masked layer in ``module`` (weights stay dense).

    Parametrizations (weight norm, spectral norm) may have been registered before or after the
    masks; they stay. (``parametrize.remove_parametrizations`` on a masked layer likewise keeps
    the masks.)

    Example:
        >>> import torch
        >>> conv = remove_masks(apply_masks(torch.nn.Conv2d(2, 2, 1), k=2))
        >>> mask_count(conv), hasattr(conv, "weight_masks")
        (0, False)
    """
    layers = [(layer, _class_without_masks(layer)) for layer in _masked_layers(module)]
    for layer, plain in layers:  # check every layer before changing any
        if plain is None:
            raise ValueError(f"cannot remove masks from {type(layer).__name__}: its class was "
                             "changed after the masks were attached")
    for layer, plain in layers:
        del layer._buffers["weight_masks"]
        for attr in ("mask_index", "mask_schedule", "_mask_stack"):
            delattr(layer, attr)
        layer.__class__ = plain
    return module


def _masked_layers(module: nn.Module) -> list[MaskedLayer]:
    return [sub for sub in module.modules() if isinstance(sub, MaskedLayer)]


def mask_count(module: nn.Module) -> int:
    """Number K of masks of the masked layers in ``module``; 0 when none is masked.

    Raises:
        ValueError: masked layers with different K.

    Example:
        >>> import torch
        >>> mask_count(torch.nn.Conv2d(2, 2, 1))
        0
    """
    ks = {int(layer.weight_masks.shape[0]) for layer in _masked_layers(module)}
    if len(ks) > 1:
        raise ValueError(f"masked layers of {type(module).__name__} hold different K: {ks}")
    return ks.pop() if ks else 0


def mask_schedule(module: nn.Module) -> str:
    """The schedule given to :func:`apply_masks` (``"cyclic"`` when nothing is masked).

    Example:
        >>> import torch
        >>> mask_schedule(apply_masks(torch.nn.Conv2d(2, 2, 1), k=2, schedule="block"))
        'block'
    """
    schedules = {layer.mask_schedule for layer in _masked_layers(module)}
    if len(schedules) > 1:
        raise ValueError(f"masked layers of {type(module).__name__} hold schedules {schedules}")
    return schedules.pop() if schedules else "cyclic"


def set_mask_index(module: nn.Module, index: int) -> None:
    """Make every masked layer in ``module`` use mask ``index`` from now on.

    Example:
        >>> import torch
        >>> conv = apply_masks(torch.nn.Conv2d(2, 2, 1), k=3)
        >>> set_mask_index(conv, 2); conv.mask_index
        2
    """
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise ValueError(f"mask index must be an integer, got {index!r}")
    for layer in _masked_layers(module):
        if not 0 <= index < layer.weight_masks.shape[0]:
            raise ValueError(
                f"mask index must be in [0, {layer.weight_masks.shape[0]}), got {index}"
            )
        layer.mask_index = index


@contextlib.contextmanager
def formed_masks(module: nn.Module) -> Iterator[None]:
    """Form the K masked weights of every masked layer once, for a whole forward pass.

    Inside the block each masked layer reads its weight as a slice of ``W * masks`` (one
    ``(K, *W.shape)`` multiply per layer, done on entry), so iterating a cell D times costs one
    masking instead of D. Gradients of all slices reach the shared weight. Outside the block
    layers mask on the fly, which gives the same values, as do layers with a forward pre-hook
    (``torch.nn.utils.prune``, the legacy ``weight_norm``: their weight is set when called).
    Nesting is allowed (inner blocks reuse the outer stack).

    Example:
        >>> import torch
        >>> conv = apply_masks(torch.nn.Linear(4, 4), k=2, types=(torch.nn.Linear,))
        >>> x = torch.randn(3, 4)
        >>> with formed_masks(conv):
        ...     y = conv(x)
        >>> torch.allclose(y, conv(x))
        True
    """
    # a layer whose weight a forward pre-hook sets (torch.nn.utils.prune, the legacy
    # torch.nn.utils.weight_norm / spectral_norm) has its current weight only once called:
    # it masks on the fly (a stack formed here held the previous forward's weight)
    fresh = [layer for layer in _masked_layers(module)
             if layer._mask_stack is None and not layer._forward_pre_hooks]
    try:
        for layer in fresh:
            w = layer.weight  # evaluates weight norm / spectral norm once
            layer._mask_stack = (w.unsqueeze(0) * layer.weight_masks).unbind(0)  # K x (*W)
        yield
    finally:
        for layer in fresh:
            layer._mask_stack = None


def masked_out_per_iter(module: nn.Module, trainable_only: bool = False) -> float:
    """Weights zeroed by the masks in one application of ``module``, averaged over the K masks.

    With ``trainable_only`` only layers whose weight trains count (a frozen weight, e.g. the
    base of a LoRA wrapper, is not among the trainable parameters to subtract from).

    Example:
        >>> import torch
        >>> conv = apply_masks(torch.nn.Conv2d(2, 4, 1, bias=False), k=2, density=0.25)
        >>> masked_out_per_iter(conv)
        6.0
        >>> _ = conv.requires_grad_(False)
        >>> masked_out_per_iter(conv, trainable_only=True)
        0.0
    """
    return float(
        sum(
            (~layer.weight_masks).flatten(1).sum(1).float().mean().item()
            for layer in _masked_layers(module)
            if not trainable_only or _weight_trains(layer)
        )
    )


def _weight_trains(layer: nn.Module) -> bool:
    """Whether the (possibly parametrized, e.g. weight-normed) weight of ``layer`` trains."""
    if parametrize.is_parametrized(layer, "weight"):
        return any(p.requires_grad for p in layer.parametrizations.weight.parameters())
    return layer.weight.requires_grad
