"""Tests of bottleneck adapters with CapaBoost masked copies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wtmodels.peft import AdapterLayer, add_adapters, add_lora, count_trainable, peft_layers


def _randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.peft_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _explicit(layer, h):
    """The definition: h + sum_i (M_U^i * U) act((M_D^i * D) h + b_D) + b_U, channels last."""
    d, u = layer.adapter_down.detach(), layer.adapter_up.detach()
    out = h + layer.adapter_up_bias.detach()
    for i in range(layer.copies):
        z = F.relu(h @ (layer.mask_down[i] * d).T + layer.adapter_down_bias.detach())
        out = out + z @ (layer.mask_up[i] * u).T
    return out


def test_linear_adapter_equals_sum_of_masked_copies():
    base = nn.Linear(6, 10).double()
    layer = AdapterLayer(base, bottleneck=3, copies=4, density=0.5, seed=1)
    _randomise(layer)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _explicit(layer, base(x)))


def test_conv_adapter_equals_sum_of_masked_copies_per_pixel():
    base = nn.Conv2d(3, 8, 3, padding=1).double()
    layer = AdapterLayer(base, bottleneck=2, copies=3, density=0.5, seed=2)
    _randomise(layer)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    h = base(x).movedim(1, -1)  # (N, H, W, C)
    torch.testing.assert_close(layer(x), _explicit(layer, h).movedim(-1, 1))


def test_adapter_starts_as_identity_and_masks_are_distinct_exact():
    base = nn.Linear(8, 8)
    layer = AdapterLayer(base, bottleneck=4, copies=4, density=0.25, seed=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.mask_down.flatten(1).sum(1).tolist() == [8] * 4
    assert len({tuple(m.flatten().tolist()) for m in layer.mask_up}) == 4


@pytest.mark.parametrize("copies,density", [(1, 1.0), (2, 0.5), (4, 0.3)])
def test_adapter_parameters_do_not_depend_on_copies(copies, density):
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3))
    add_adapters(net, bottleneck=2, copies=copies, density=density)
    assert count_trainable(net) == 2 * (2 * 6 + 2 + 6 * 2 + 6)


def test_adapter_gradients_reach_adapter_only():
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 2, 4, 4))
    layers = add_adapters(net, bottleneck=2, copies=2, density=0.5)
    _randomise(layers[0])
    net(torch.randn(2, 2, 4, 4)).sum().backward()
    adapter = {id(p) for p in layers[0].peft_parameters()}
    for name, p in net.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in adapter), name


def test_lora_and_adapters_together_keep_both_trainable():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    add_lora(net, rank=1, targets="0")
    add_adapters(net, bottleneck=1, targets="2")
    assert len(peft_layers(net)) == 2
    assert count_trainable(net) == (1 * 2 * 9 + 4 * 1) + (4 + 1 + 4 + 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bottleneck=0), "bottleneck"),
        (dict(bottleneck=2, copies=-1), "copies"),
        (dict(bottleneck=2, density=2.0), "density"),
        (dict(bottleneck=2, kind="blocky"), "valid kinds"),
        (dict(bottleneck=2, activation="swish"), "valid activations: relu, gelu, silu, tanh"),
        (dict(bottleneck=2, targets=nn.Linear), "no module matched"),
    ],
)
def test_adapter_bad_arguments(kwargs, match):
    net = nn.Sequential(nn.Conv2d(2, 4, 3))
    with pytest.raises(ValueError, match=match):
        add_adapters(net, **kwargs)
    assert not peft_layers(net)
