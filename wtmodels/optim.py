"""Optimizers and the warm-up + cosine learning-rate schedule of the trainer.

Weight decay applies to matrices and convolution kernels only (parameters with 2+ dimensions),
never to biases, normalisation scales or weight-norm magnitudes. The schedule is stepped once
per training step.

Example:
    >>> import torch
    >>> from wtmodels.optim import build_optimizer, build_scheduler
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    >>> [len(g["params"]) for g in opt.param_groups], [g["weight_decay"] for g in opt.param_groups]
    ([1, 1], [0.0001, 0.0])
    >>> sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    >>> [round(sched.get_last_lr()[0], 4)]
    [0.05]
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")


def _weight_norm_scales(model: nn.Module) -> set[int]:
    """``id``s of the weight-norm magnitudes ``g`` of ``model`` (``parametrizations.weight_norm``:
    ``original0``; the legacy ``nn.utils.weight_norm``: ``<name>_g``). They are per-channel
    scales of shape ``(C_out, 1, ...)``, so 2+-dimensional, but no kernels."""
    from torch.nn.utils.weight_norm import WeightNorm

    scales = set()
    for module in model.modules():
        for plist in getattr(module, "parametrizations", {}).values():
            if any(type(p).__name__ == "_WeightNorm" for p in plist):
                scales.add(id(plist.original0))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                scales.add(id(getattr(module, hook.name + "_g")))
    return scales


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: tensors with 2+ dims get ``weight_decay``, the rest (biases, norm scales,
    weight-norm magnitudes) none.

    Example:
        >>> groups = parameter_groups(torch.nn.Conv2d(1, 2, 3), 0.1)
        >>> [tuple(p.shape) for p in groups[0]["params"]], groups[1]["weight_decay"]
        ([(2, 1, 3, 3)], 0.0)
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> groups = parameter_groups(weight_norm(torch.nn.Conv2d(1, 2, 3)), 0.1)
        >>> [tuple(p.shape) for g in groups for p in g["params"]]  # v decayed; g and bias not
        [(2, 1, 3, 3), (2,), (2, 1, 1, 1)]
    """
    scales = _weight_norm_scales(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in scales else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam (L2 weight decay) or AdamW (decoupled weight decay).

    Args:
        model: the module whose trainable parameters are optimised.
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: decay of 2+-dimensional parameters.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.

    Returns:
        The optimizer.

    Example:
        >>> type(build_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1e-3)).__name__
        'AdamW'
    """
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                  cosine: bool = True) -> float:
    """Learning-rate factor of ``step`` (0-based): linear warm-up ``(step+1)/warmup_steps``,
    then a cosine from 1 down to ``min_ratio`` at ``total_steps`` (or 1 for ``cosine=False``).

    Example:
        >>> [round(warmup_cosine(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 0.0, cosine: bool = True):
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` of :func:`warmup_cosine`.

    Args:
        optimizer: the optimizer (its ``lr`` is the peak).
        total_steps: training steps of the whole run.
        warmup_steps: linear warm-up steps.
        min_lr: final learning rate of the cosine.
        cosine: ``False`` for a constant rate after the warm-up.

    Returns:
        The scheduler; call ``scheduler.step()`` after each optimizer step.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
        >>> s = build_scheduler(opt, total_steps=4)
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(round(s.get_last_lr()[0], 3)); opt.step(); s.step()
        >>> lrs
        [1.0, 0.854, 0.5, 0.146]
    """
    peak = optimizer.param_groups[0]["lr"]
    min_ratio = min_lr / peak if peak > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, min_ratio, cosine))
