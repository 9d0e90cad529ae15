"""Masks on the linear layers of torch's transformer encoder take effect in eval mode
(its fused eval path reads linear1 / linear2's weights directly and skipped the masks)."""

import copy
import io

import pytest
import torch
from torch import nn

from wtmodels.masks import apply_masks


def hand_masked_copy(net: nn.Module) -> nn.Module:
    """A plain copy of ``net`` whose masked linear weights are multiplied by mask 0 by hand."""
    plain = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    state = {}
    for name, value in net.state_dict().items():
        if name.endswith("weight_masks"):
            continue
        masks = net.state_dict().get(name + "_masks")
        state[name] = value * masks[0] if masks is not None else value
    plain.load_state_dict({k.removeprefix("0."): v for k, v in state.items()})
    return plain


def test_masked_encoder_layer_eval_equals_hand_masked_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0))
    apply_masks(net, k=2, density=0.5, types=(nn.Linear,))
    reference = hand_masked_copy(net).eval()
    x = torch.randn(3, 5, 16)
    net.eval()
    with torch.no_grad():  # the fused path's conditions: eval, no grad, batch_first
        out, expected = net(x), reference(x)
    assert torch.allclose(out, expected, atol=1e-5)  # 0.65 apart before: masks skipped


@pytest.mark.parametrize("padding_mask", [False, True])
def test_masked_encoder_stack_eval_equals_train_mode(padding_mask):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    apply_masks(net, k=2, density=0.5, types=(nn.Linear,))
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool) if padding_mask else None
    expected = net.train()(x, src_key_padding_mask=mask).detach()  # dropout 0: same function
    net.eval()
    with torch.no_grad():
        out = net(x, src_key_padding_mask=mask)
    assert torch.allclose(out, expected, atol=1e-5)  # 1.25 apart before


def test_masked_encoder_layer_survives_save_and_deepcopy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0))
    apply_masks(net, k=2, density=0.5, types=(nn.Linear,))
    x = torch.randn(2, 4, 16)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        outs = [m.eval()(x) for m in (net, loaded, copy.deepcopy(net))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
