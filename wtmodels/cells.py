"""Weight-tied cells ``f(z, x)``: one residual conv block applied at every iteration of a core.

The cell follows MDEQ's residual block: conv-norm-relu-(dropout)-conv-norm, add the input
injection ``x`` and the residual ``z``, then relu-norm. Cells hold no mask or iteration logic;
masks attach to their convolutions post-hoc (:func:`wtmodels.masks.apply_masks`) and the cores
(:mod:`wtmodels.cores`) decide how often and with which mask the cell runs.

Example:
    >>> import torch
    >>> cell = ConvCell(width=16)
    >>> x = torch.randn(2, 16, 8, 8)
    >>> cell(torch.zeros_like(x), x).shape
    torch.Size([2, 16, 8, 8])
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

NORMS = ("group", "layer", "none")


def _is_int(value) -> bool:
    """An integer (numpy's included), not a bool or a float such as 8.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``(B, C, H, W)`` features that works with any batch size.

    Args:
        kind: ``"group"`` (GroupNorm with ``groups`` groups), ``"layer"`` (GroupNorm with one
            group) or ``"none"`` (identity).
        channels: number of channels C.
        groups: groups of ``"group"``; must divide ``channels``.

    Returns:
        The module.

    Example:
        >>> norm = make_norm("group", 32, groups=8)
        >>> type(norm).__name__, norm.num_groups, norm.num_channels
        ('GroupNorm', 8, 32)
    """
    if kind == "group":
        if not _is_int(groups) or groups < 1 or channels % groups:
            raise ValueError(f"norm_groups={groups} must be >= 1 and divide width {channels}")
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid norms: {', '.join(NORMS)}")


class VariationalDropout2d(nn.Module):
    """Dropout whose mask is drawn once per forward pass and shared by every iteration.

    The core calls :func:`reset_dropout` at the start of each forward pass; every later call
    of the cell in that pass multiplies by the same per-sample mask ``(B, C, H, W)`` (scaled by
    ``1 / (1 - p)``), so the iterated map stays one fixed function, as a fixed-point solver
    needs. Identity in eval mode or with ``p = 0``.

    Example:
        >>> import torch
        >>> drop = VariationalDropout2d(0.5).train()
        >>> x = torch.ones(2, 3, 4, 4)
        >>> reset_dropout(drop, x)
        >>> torch.equal(drop(x), drop(x))
        True
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if (isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p)
                or not 0.0 <= p < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: torch.Tensor | None = None

    def reset(self, like: torch.Tensor) -> None:
        """Draw a new mask shaped like ``like`` (training mode only; cleared otherwise)."""
        if self.training and self.p > 0:
            keep = torch.empty_like(like).bernoulli_(1.0 - self.p)  # (B, C, H, W)
            self.mask = keep / (1.0 - self.p)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            raise RuntimeError(
                "variational dropout needs reset_dropout(cell, z) at the start of each forward"
            )
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def reset_dropout(module: nn.Module, like: torch.Tensor) -> None:
    """Draw fresh variational-dropout masks for every :class:`VariationalDropout2d` in ``module``.

    Example:
        >>> import torch
        >>> reset_dropout(ConvCell(8, dropout=0.1), torch.zeros(1, 8, 4, 4))
    """
    for sub in module.modules():
        if isinstance(sub, VariationalDropout2d):
            sub.reset(like)


class ConvCell(nn.Module):
    """Residual conv cell with input injection (MDEQ-style), ``(B, C, H, W) -> (B, C, H, W)``.

    ``f(z, x) = norm3(relu(z + x + norm2(conv2(drop(relu(norm1(conv1(z))))))))``

    Args:
        width: channels C of ``z`` and ``x``.
        norm: ``"group"``, ``"layer"`` or ``"none"`` (see :func:`make_norm`).
        norm_groups: GroupNorm groups.
        dropout: variational dropout rate after the first conv (0 = off).
        weight_norm: weight-normalise both convs (``torch.nn.utils.parametrizations``).
        spectral_norm: spectrally normalise both convs (``torch.nn.utils.parametrizations``).
        kernel_size: odd conv kernel size.

    Example:
        >>> import torch
        >>> cell = ConvCell(8, norm_groups=4, weight_norm=True)
        >>> z = x = torch.randn(1, 8, 5, 5)
        >>> cell(z, x).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(
        self,
        width: int,
        norm: str = "group",
        norm_groups: int = 8,
        dropout: float = 0.0,
        weight_norm: bool = False,
        spectral_norm: bool = False,
        kernel_size: int = 3,
    ):
        super().__init__()
        if not _is_int(width) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        for name, value in (("weight_norm", weight_norm), ("spectral_norm", spectral_norm)):
            if not isinstance(value, bool):  # bool("no") is True
                raise ValueError(f"{name} must be true or false, got {value!r}")
        width, kernel_size = int(width), int(kernel_size)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(width, width, kernel_size, padding=pad, bias=False)
        self.norm1 = make_norm(norm, width, norm_groups)
        self.drop = VariationalDropout2d(dropout)
        self.conv2 = nn.Conv2d(width, width, kernel_size, padding=pad, bias=False)
        self.norm2 = make_norm(norm, width, norm_groups)
        self.norm3 = make_norm(norm, width, norm_groups)
        for conv in (self.conv1, self.conv2):
            if weight_norm:
                parametrizations.weight_norm(conv)
            if spectral_norm:
                parametrizations.spectral_norm(conv)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(z)))  # (B, C, H, W)
        y = self.norm2(self.conv2(self.drop(y)))
        return self.norm3(F.relu(z + x + y))
