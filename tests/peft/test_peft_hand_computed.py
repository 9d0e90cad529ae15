"""CapaBoost / LoRA / adapters against hand-computed answers."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.peft import AdapterLayer, LoRALayer, add_lora, count_trainable, merge_lora


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv1d(4, 4, 1), nn.Linear(4, 2))


@pytest.mark.parametrize("targets, expected", [
    ([nn.Linear, "cnov"], "candidate layers: 0, 2"),
    # README: a pattern naming only layers of other types says so (it did only when no other
    # target selected anything)
    ([nn.Linear, "1"], "1 (Conv1d)"),
    (["0", "1"], "1 (Conv1d)"),
])
def test_an_unused_pattern_beside_other_targets_names_the_candidates(targets, expected):
    net = _net()
    before = [type(m) for m in net]
    with pytest.raises(ValueError, match=r"match no layer") as err:
        add_lora(net, rank=1, targets=targets)
    assert expected in str(err.value)
    assert [type(m) for m in net] == before  # nothing touched


def _hand_delta(layer, scale):
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    ma, mb = layer.mask_A, layer.mask_B
    total = 0
    for i in range(layer.copies):
        total = total + (mb[i] * b) @ (ma[i] * a).flatten(1)
    return scale * total.view(layer.weight_shape)


@pytest.mark.parametrize("impl", ["factorized", "dense"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_update_is_the_hand_sum_over_masked_copies(impl, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode=padding_mode).double()
    layer = LoRALayer.wrap(conv, rank=2, copies=3, density=0.5, seed=5, alpha=3.0, impl=impl)
    nn.init.normal_(layer.lora_B)
    delta = _hand_delta(layer, scale=1.5)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    padded = x if padding_mode == "zeros" else F.pad(x, (1, 1, 1, 1), mode=padding_mode)
    expected = F.conv2d(padded, conv.weight + delta, conv.bias, stride=2,
                        padding=1 if padding_mode == "zeros" else 0)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    # every copy keeps exactly half of A's 54 and B's 10 entries, and the copies differ
    assert layer.mask_A.flatten(1).sum(1).tolist() == [27] * 3
    assert layer.mask_B.flatten(1).sum(1).tolist() == [5] * 3
    assert len({tuple(m.flatten().tolist()) for m in layer.mask_A}) == 3


def test_density_one_is_d_times_plain_lora_and_rank_r():
    torch.manual_seed(0)
    layer = LoRALayer.wrap(nn.Linear(16, 8), rank=2, copies=4)
    nn.init.normal_(layer.lora_B)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    assert layer.mask_A is None and layer.mask_B is None
    assert torch.allclose(layer.delta_weight(), 4 * b @ a, atol=1e-6)
    assert int(torch.linalg.matrix_rank(layer.delta_weight().detach())) == 2
    masked = LoRALayer.wrap(nn.Linear(16, 8), rank=2, copies=4, density=0.5)
    nn.init.normal_(masked.lora_B)
    assert int(torch.linalg.matrix_rank(masked.delta_weight().detach())) == 8  # min(d r, out)


def test_entries_no_copy_keeps_never_train_and_masks_stay():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRALayer.wrap(base, rank=3, copies=2, density=0.5, seed=1)
    nn.init.normal_(layer.lora_B)
    for p in base.parameters():
        p.requires_grad_(False)
    masks = layer.mask_A.clone(), layer.mask_B.clone()
    opt = torch.optim.SGD(layer.peft_parameters(), lr=0.1)
    layer(torch.randn(6, 12)).square().sum().backward()
    dead_a, dead_b = ~masks[0].any(0), ~masks[1].any(0)
    assert dead_a.any() and dead_b.any()  # (1 - 0.5)**2: about a quarter of the entries
    assert (layer.lora_A.grad[dead_a] == 0).all() and (layer.lora_A.grad[~dead_a] != 0).all()
    assert (layer.lora_B.grad[dead_b] == 0).all() and (layer.lora_B.grad[~dead_b] != 0).all()
    assert base.weight.grad is None
    opt.step()
    assert torch.equal(layer.mask_A, masks[0]) and torch.equal(layer.mask_B, masks[1])


@pytest.mark.parametrize("impl", ["factorized", "dense"])
def test_factor_gradients_match_finite_differences(impl):
    torch.manual_seed(0)
    layer = LoRALayer.wrap(nn.Conv2d(2, 3, 3, padding=1).double(), rank=2, copies=2,
                           density=0.5, impl=impl)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a_, b_: torch.func.functional_call(
        layer, {"lora_A": a_, "lora_B": b_}, (x,)), (a, b))


def test_parameter_count_is_rank_r_lora_closed_form_for_every_copies_and_density():
    def fresh():
        return wt.create_model("wt_s", num_classes=10, in_chans=1)

    model = fresh()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    head = sum(p.numel() for p in model.head.parameters())
    r = 4
    expected = sum(r * m.weight[0].numel() + r * m.out_channels for m in convs) + head
    for copies, density in ((1, 1.0), (2, 0.5), (4, 0.5), (3, 0.25)):
        model = fresh()
        add_lora(model, rank=r, copies=copies, density=density, train_head=True)
        assert count_trainable(model) == expected


def test_model_starts_equal_to_base_and_state_dict_carries_masks_and_merge():
    torch.manual_seed(0)
    model = wt.create_model("wt_s", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 14, 14)
    y0 = model(x)
    layers = add_lora(model, rank=2, copies=2, density=0.5, seed=0)
    assert torch.equal(model(x), y0)  # B = 0
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.05)
    y1 = model(x)
    merge_lora(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = wt.create_model("wt_s", num_classes=10, in_chans=1).eval()
    add_lora(other, rank=2, copies=2, density=0.5, seed=99)  # other masks until loaded
    other.load_state_dict(torch.load(buf))
    assert all(layer.merged for layer in other.modules() if isinstance(layer, LoRALayer))
    assert torch.allclose(other(x), y1, atol=1e-5)
    wt.peft.unmerge_lora(other)  # loaded: the update is recomputed and subtracted
    for layer in (m for m in other.modules() if isinstance(m, LoRALayer)):
        nn.init.zeros_(layer.lora_B)
    assert torch.allclose(other(x), y0, atol=1e-5)

def test_adapter_is_the_hand_formula():
    torch.manual_seed(0)
    base = nn.Linear(5, 6).double()
    layer = AdapterLayer(base, bottleneck=2, copies=3, density=0.5, activation="tanh", seed=3)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # U = 0, b_U = 0
    for p in layer.peft_parameters():
        nn.init.normal_(p)
    h = base(x)
    d, u = layer.adapter_down, layer.adapter_up
    expected = h + layer.adapter_up_bias + sum(
        torch.tanh(h @ (layer.mask_down[i] * d).T + layer.adapter_down_bias)
        @ (layer.mask_up[i] * u).T for i in range(3))
    assert torch.allclose(layer(x), expected, atol=1e-12)


def test_attention_out_proj_is_no_candidate_and_is_named_when_targeted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 1)
            self.fc = nn.Linear(4, 2)

    with pytest.raises(ValueError) as err:
        add_lora(Net(), rank=1, targets=["att*"])
    message = str(err.value)
    assert "candidate layers: fc;" in message  # never att.out_proj, which is never wrapped
    assert "att.out_proj: an nn.MultiheadAttention's out_proj is never wrapped" in message
