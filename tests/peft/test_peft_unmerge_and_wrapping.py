"""Unmerge after the base weight was changed through ``.data``; wrapped
layers of a transformer encoder in eval mode."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from wtmodels.peft import add_adapters, add_lora, merge_lora, unmerge_lora


def _data_add(weight):
    weight.data.add_(1.0)  # old-style in-place edit (e.g. an EMA update): no version bump


def _data_copy(weight):
    weight.data.copy_(weight.detach() + 1.0)


def _vector_to_parameters(weight):
    vector_to_parameters(parameters_to_vector([weight]) + 1.0, [weight])  # assigns .data


@pytest.mark.parametrize("edit", [_data_add, _data_copy, _vector_to_parameters])
def test_unmerge_keeps_a_change_made_through_data_while_merged(edit):
    # README: unmerge gives the pre-merge weight back bit for bit "unless the base weight
    # changed since (loaded, moved, edited in place): then it subtracts the update
    # recomputed from the factors". Known answer: (W + dW + 1) - dW = W + 1.
    net = nn.Sequential(nn.Linear(4, 3).double())
    layer = add_lora(net, rank=2, copies=2, density=0.5, targets=nn.Linear)[0]
    nn.init.normal_(layer.lora_B)
    weight = layer.base.weight.detach().clone()
    merge_lora(net)
    with torch.no_grad():
        edit(layer.base.weight)
    unmerge_lora(net)
    torch.testing.assert_close(layer.base.weight, weight + 1.0, rtol=1e-12, atol=1e-12)


def test_unmerge_still_restores_bit_for_bit_when_the_weight_is_untouched():
    net = nn.Sequential(nn.Linear(5, 4))
    layer = add_lora(net, rank=2, copies=2, density=0.5, targets=nn.Linear)[0]
    nn.init.normal_(layer.lora_B)
    weight = layer.base.weight.detach().clone()
    merge_lora(net)
    net.double().float()  # moved and back: the same bits
    unmerge_lora(net)
    assert torch.equal(layer.base.weight, weight)


def _hand_lora_weight(layer):
    """W + scale * sum_i (M_B^i * B)(M_A^i * A), by hand from the masks."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    delta = sum((layer.mask_B[i] * b) @ (layer.mask_A[i] * a) for i in range(layer.copies))
    return layer.base.weight.detach() + layer.scale * delta


@pytest.mark.parametrize("add", ["lora", "adapters"])
def test_transformer_encoder_layer_inside_a_model_runs_its_update_in_eval(add):
    # torch's eval fast path of nn.TransformerEncoderLayer reads linear1 / linear2 .weight
    # directly: with the layer inside a bigger model it raised AttributeError (the wrapper has
    # no .weight) instead of running the wrapped layers.
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    oracle = copy.deepcopy(net[0]).eval()  # plain torch layer, fused fast path
    x = torch.randn(3, 5, 8)
    if add == "adapters":
        add_adapters(net, bottleneck=2, targets=nn.Linear)
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), oracle(x), rtol=1e-5, atol=1e-5)  # U = 0
        return
    layers = add_lora(net, rank=2, copies=2, density=0.5, targets=nn.Linear)
    for layer in layers:
        nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        oracle.linear1.weight.copy_(_hand_lora_weight(layers[0]))
        oracle.linear2.weight.copy_(_hand_lora_weight(layers[1]))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), oracle(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # oracle
def test_transformer_encoder_stack_with_a_padding_mask_runs_in_eval():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    net = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True))
    oracle = copy.deepcopy(net[0]).eval()
    add_adapters(net, bottleneck=2, targets=nn.Linear)  # U = 0: equal to the base model
    net.eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        got, want = net[0](x, src_key_padding_mask=mask), oracle(x, src_key_padding_mask=mask)
    keep = ~mask  # the fused path leaves padded positions at 0
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
