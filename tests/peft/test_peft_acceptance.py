"""Acceptance checks of wtmodels.peft found by using it as a new user would (CPU, seconds)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks import capaboost, peft_speed
from wtmodels.peft import add_adapters, add_lora, merge_lora, unmerge_lora


class _Checkpointed(nn.Module):
    """A conv called three times per checkpointed segment, two segments (a weight-tied body)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.use_checkpoint = False

    def body(self, h):
        for _ in range(3):
            h = torch.tanh(self.conv(h))
        return h

    def forward(self, x):
        h = x
        for _ in range(2):
            h = (checkpoint(self.body, h, use_reentrant=False) if self.use_checkpoint
                 else self.body(h))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("wrapper", ["factorized", "dense", "adapter"])
def test_non_reentrant_activation_checkpointing_gives_the_plain_gradients(wrapper):
    torch.manual_seed(0)
    ref = _Checkpointed().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = []
    for use_checkpoint in (False, True):
        model = copy.deepcopy(ref)
        model.use_checkpoint = use_checkpoint
        torch.manual_seed(1)  # the same factors both times
        if wrapper == "adapter":
            layer = add_adapters(model, bottleneck=2, copies=2, density=0.5)[0]
            nn.init.normal_(layer.adapter_up)
            param = layer.adapter_down
        else:
            layer = add_lora(model, rank=2, copies=2, density=0.5, impl=wrapper)[0]
            nn.init.normal_(layer.lora_B)
            param = layer.lora_A
        model(x).sum().backward()  # raised CheckpointError before the fix
        grads.append(param.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan])
def test_non_finite_alpha_refused(alpha):
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        add_lora(net, rank=2, alpha=alpha, targets=nn.Linear)
    assert isinstance(net[0], nn.Linear)


@pytest.mark.parametrize("add", [
    lambda net: add_lora(net, rank=2, targets=nn.Linear),
    lambda net: add_adapters(net, bottleneck=2, targets=nn.Linear),
])
def test_lazy_layer_refused_with_a_value_error(add):
    net = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match="run one forward pass"):
        add(net)
    net(torch.randn(1, 3))  # once materialised it works
    add(net)


@pytest.mark.parametrize("seeds,match", [("", "at least one"), ("0,0", "distinct")])
def test_capaboost_cli_empty_or_repeated_seeds_exit_2(tmp_path, capsys, seeds, match):
    out = tmp_path / "x"
    assert capaboost.main(["--out", str(out), "--smoke", "--seeds", seeds]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err
    assert not out.exists()


def test_speed_cli_empty_cases_exit_2(capsys, tmp_path):
    assert peft_speed.main(["--out", str(tmp_path), "--cases", ","]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid cases: wt_s, capaboost_model" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_unmerge_gives_the_pre_merge_weight_tensors_back_bit_for_bit(dtype, weight_norm):
    # W + delta - delta is W only up to rounding (0.4% in bfloat16), and weight norm's right
    # inverse returned (g, v) = (|W|, W): v rescaled, a negative g flipped
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    if weight_norm:
        conv = nn.utils.parametrizations.weight_norm(conv)
        with torch.no_grad():  # a trained g: not |v|, one negative
            conv.parametrizations.weight.original0.mul_(1.7)[0] *= -1
    net = nn.Sequential(conv).to(dtype)
    layers = add_lora(net, rank=2, copies=2, density=0.5)
    nn.init.normal_(layers[0].lora_B, std=0.05)
    before = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    for _ in range(3):  # e.g. a merged evaluation after every epoch
        merge_lora(net)
        unmerge_lora(net)
    for k, v in net.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k


def test_unmerge_keeps_a_change_made_to_the_base_while_merged():
    net = nn.Sequential(nn.Linear(4, 3).double())
    layer = add_lora(net, rank=2, targets=nn.Linear)[0]
    nn.init.normal_(layer.lora_B)
    weight = layer.base.weight.detach().clone()
    merge_lora(net)
    with torch.no_grad():
        layer.base.weight.add_(1.0)  # e.g. an optimizer step on an unfrozen base
    unmerge_lora(net)
    torch.testing.assert_close(layer.base.weight, weight + 1.0, rtol=1e-12, atol=1e-12)
