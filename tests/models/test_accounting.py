"""Accounting: model_summary against hand counts from the layer shapes.

FLOPs as torch's FlopCounterMode defines them: 2 x MACs of convolutions and matmuls (a k x k conv
``cin -> cout`` on an ``H x W`` output: ``2 * cin * cout * k * k * H * W``; conv biases, norms,
activations, additions and pooling count 0; a linear layer ``2 * in * out``).
"""

from __future__ import annotations

from torch import nn

import wtmodels as wt
from wtmodels.masks import apply_masks
from wtmodels.models import model_summary
from wtmodels.peft import add_lora


def test_summary_of_a_module_without_cores():
    # model_summary on any nn.Module (its docstring's "else 3 channels" default): it raised
    # AttributeError ('Sequential' object has no attribute 'core_stats' / 'cores')
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    params = 3 * 4 * 9 + 4 + 4 * 2 + 2  # 122
    flops = 2 * 3 * 4 * 9 * 30 * 30 + 2 * 4 * 2  # 3x32x32 in, 30x30 conv out
    assert model_summary(model) == {"params": params, "nonzero_params_per_iter": float(params),
                                    "cell_evals": 0.0, "flops_per_image": float(flops)}


def test_weights_zeroed_by_masks_outside_the_cores_are_not_nonzero():
    conv = apply_masks(nn.Conv2d(4, 6, 1, bias=False), k=2, density=0.25)  # 24 weights, 6 kept
    info = model_summary(nn.Sequential(conv, nn.Flatten()), (4, 5, 5))
    assert info["params"] == 24 and info["nonzero_params_per_iter"] == 6.0
    model = wt.create_model("test_wt", in_chans=1)  # 1378 parameters, stem conv 72 weights
    apply_masks(model.stem, k=2, density=0.5, types=(nn.Conv2d,))
    assert model_summary(model, (1, 8, 8))["nonzero_params_per_iter"] == 1378 - 36


def test_two_stage_untied_weight_norm_masks_on_an_odd_image():
    model = wt.create_model("test_untied", in_chans=2, num_classes=5, depth=3, width=4, stages=2,
                            norm_groups=2, weight_norm=True, mask_k=3, mask_density=0.25)
    info = model_summary(model, (2, 7, 9))
    # widths 4, 8; weight norm: v (full) + g (one per output channel); GroupNorm 2 per channel
    stem, trans, head = 2 * 4 * 9 + 8, 4 * 8 * 9 + 16, 8 * 5 + 5
    cell0, cell1 = 2 * (16 * 9 + 4) + 3 * 8, 2 * (64 * 9 + 8) + 3 * 16
    assert info["params"] == stem + trans + head + 3 * (cell0 + cell1) == 5037
    assert info["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept0, kept1 = cell0 - 2 * 108, cell1 - 2 * 432  # density 0.25 zeroes 3/4 of each conv
    assert info["nonzero_params_per_iter"] == stem + trans + head + kept0 + kept1 == 885
    assert info["cell_evals"] == 6
    conv = lambda cin, cout, hw: 2 * cin * cout * 9 * hw  # noqa: E731
    flops = (conv(2, 4, 63) + 3 * 2 * conv(4, 4, 63)  # stem, stage 0 at 7x9
             + conv(4, 8, 20) + 3 * 2 * conv(8, 8, 20)  # stride 2: 4x5, stage 1
             + 2 * 8 * 5)
    assert info["flops_per_image"] == flops == 267_776


def test_cell_evals_ode_fixed_steps_and_deq_count_cell_calls():
    ode = wt.create_model("test_ode", in_chans=1, ode_method="midpoint", depth=3, stages=2)
    assert model_summary(ode, (1, 8, 8))["cell_evals"] == 2 * 3 * 2  # 2 evals x 3 steps x 2
    deq = wt.create_model("test_deq", in_chans=1, mask_k=2, stages=2)
    calls = [0]
    for core in deq.cores:
        core.cell.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    info = model_summary(deq, (1, 8, 8))
    steps = sum(core.last_stats["nstep"] for core in deq.cores)
    # K = 2 applications per solver step, plus one K-fold application at the fixed point
    assert info["cell_evals"] == calls[0] == 2 * (steps + 2)


def test_nonzero_params_per_iter_of_a_masked_model_under_lora():
    # the frozen masked cell weights are not trainable parameters: their masks subtract nothing
    # (the count was -63808 for wt_s with K = 4 masks at density 0.25 under LoRA)
    for weight_norm in (False, True):
        model = wt.create_model("test_wt", in_chans=1, mask_k=2, mask_density=0.25,
                                weight_norm=weight_norm)
        add_lora(model, rank=2, copies=2, density=0.5, train_head=True)
        info = model_summary(model, (1, 8, 8))
        assert info["nonzero_params_per_iter"] == info["params"] > 0
