"""Review 13 (PEFT): unmerge after the base weight was changed through ``.data``."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from wtmodels.peft import add_lora, merge_lora, unmerge_lora


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
