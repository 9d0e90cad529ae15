"""Accounting of a model: parameters, non-zero weights per iteration, cell evaluations, FLOPs.

Example:
    >>> import wtmodels as wt
    >>> model = wt.create_model("test_wt", in_chans=1, mask_k=2, mask_density=0.5)
    >>> info = model_summary(model, input_shape=(1, 8, 8))
    >>> info["nonzero_params_per_iter"] < info["params"]
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wtmodels.masks import masked_out_per_iter


def count_params(module: nn.Module) -> int:
    """Trainable parameters of ``module`` (mask buffers are not parameters).

    Example:
        >>> count_params(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``
    wrappers (any nesting); ``model`` itself when not wrapped.

    Example:
        >>> inner = torch.nn.Linear(3, 2)
        >>> unwrap_model(torch.nn.DataParallel(inner)) is inner
        True
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def nonzero_params_per_iter(model: nn.Module) -> float:
    """Trainable weights that one iteration of every core uses, masked-out weights excluded.

    Counts every parameter outside the cores (stem, transitions, head) plus, per stage, the
    parameters of one cell; weights zeroed by masks, in the cell or outside the cores, are
    subtracted (averaged over the K masks; exact for ``"random"`` and ``"nm"`` masks). For a
    tied core that is the whole cell; for an untied core one of its D cells. A module without
    ``cores`` (any ``nn.Module``) counts its trainable parameters minus the weights its masks
    zero. Masks of frozen weights (e.g. a masked cell under LoRA) subtract nothing: those
    weights are not counted in the first place.

    Example:
        >>> import wtmodels as wt
        >>> tied = wt.create_model("test_wt", in_chans=1)
        >>> untied = wt.create_model("test_untied", in_chans=1)
        >>> nonzero_params_per_iter(tied) == nonzero_params_per_iter(untied)
        True
    """
    model = unwrap_model(model)  # a DataParallel wrapper hides the cores
    cores = list(getattr(model, "cores", ()))  # any module: no cores, every layer runs once
    total = count_params(model) - masked_out_per_iter(model, trainable_only=True)
    for core in cores:
        total -= count_params(core) - masked_out_per_iter(core, trainable_only=True)
        cell = core.cells[0] if hasattr(core, "cells") else core.cell
        total += count_params(cell) - masked_out_per_iter(cell, trainable_only=True)
    return float(total)


def model_summary(
    model: nn.Module, input_shape: tuple[int, int, int] | None = None
) -> dict[str, int | float]:
    """Size and cost of a model on one image of ``input_shape`` ``(C, H, W)`` (default: the
    model's ``config.in_chans`` channels, else 3, at 32 x 32).

    Runs one forward pass in eval mode under ``torch.no_grad`` and
    ``torch.utils.flop_counter.FlopCounterMode`` on a random image drawn from a private
    generator (the global random state is untouched); every submodule's train/eval mode is
    restored. A model inside ``nn.DataParallel`` / ``DistributedDataParallel`` /
    ``torch.compile`` is unwrapped first (:func:`unwrap_model`).

    Returns:
        ``params`` (trainable, an int), ``nonzero_params_per_iter``
        (:func:`nonzero_params_per_iter`), ``cell_evals`` (cell applications in that forward;
        for DEQ and adaptive ODE cores it depends on the input; 0 for a module without
        ``core_stats``), ``flops_per_image`` (FLOPs
        counted by torch: dense convolutions and matmuls, masked weights count as dense; a
        DEQ's include its solver's matmuls, e.g. Anderson's ``bmm``).

    Example:
        >>> import wtmodels as wt
        >>> info = model_summary(wt.create_model("test_wt", in_chans=1), (1, 8, 8))
        >>> sorted(info)
        ['cell_evals', 'flops_per_image', 'nonzero_params_per_iter', 'params']
    """
    model = unwrap_model(model)
    if input_shape is None:
        input_shape = (getattr(getattr(model, "config", None), "in_chans", 3), 32, 32)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, *input_shape, generator=generator).to(param.device, param.dtype)
    # each submodule's own mode (a frozen part kept in eval mode stays so), not model.train()
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    # the Jacobian regulariser (if switched on) differentiates inside the forward, which the
    # FLOP counter cannot follow; the summary is of the plain forward
    jac_cores = [c for c in getattr(model, "cores", ()) if getattr(c, "jac_reg", False)]
    try:
        for core in jac_cores:
            core.set_jac_reg(False)
        counter = FlopCounterMode(display=False)
        # inference_mode(False): called under torch.inference_mode, the counter's module tracker
        # failed on weight-normed convs (it hooks the parametrization's parameters, which have
        # no autograd node there: "'ParametrizedConv2d' object has no attribute 'weight'")
        with torch.inference_mode(False), torch.no_grad(), counter:
            model(image)
    finally:
        for module, training in modes:
            module.training = training
        for core in jac_cores:
            core.set_jac_reg(True)
    stats = model.core_stats() if hasattr(model, "core_stats") else {}
    return {
        "params": int(count_params(model)),  # a count: "1378" in results.csv, not "1378.0"
        "nonzero_params_per_iter": nonzero_params_per_iter(model),
        "cell_evals": float(stats.get("cell_evals", 0.0)),
        "flops_per_image": float(counter.get_total_flops()),
    }
