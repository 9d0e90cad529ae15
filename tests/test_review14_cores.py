"""Review 14: cells, cores, masks and models checked against independent answers."""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

import wtmodels as wt
from wtmodels.masks import apply_masks, mask_count, remove_masks


def _conv_reference(conv: torch.nn.Conv2d, weight: torch.Tensor, x: torch.Tensor):
    return torch.nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding)


def test_weight_norm_removable_from_masked_model():
    # torch's documented way to fold weight norm into the weight after training crashed on a
    # masked model (AttributeError: 'MaskedParametrizedConv2d' has no attribute 'weight')
    torch.manual_seed(0)
    model = wt.create_model("test_wt", in_chans=1, mask_k=2, weight_norm=True).eval()
    x = torch.randn(2, 1, 6, 6)
    before = model(x)
    convs = (model.cores[0].cell.conv1, model.cores[0].cell.conv2)
    folded = []
    for conv in convs:
        g = conv.parametrizations.weight.original0.detach()
        v = conv.parametrizations.weight.original1.detach()
        folded.append(g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))  # weight norm by hand
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    for conv, w in zip(convs, folded):
        assert not parametrize.is_parametrized(conv)
        assert isinstance(conv, torch.nn.Conv2d) and mask_count(conv) == 2
        assert isinstance(conv.weight, torch.nn.Parameter)
        torch.testing.assert_close(conv.weight.detach(), w)
        xin = torch.randn(1, 8, 5, 5)
        conv.mask_index = 1
        torch.testing.assert_close(conv(xin), _conv_reference(conv, w * conv.weight_masks[1], xin))
    torch.testing.assert_close(model(x), before)
    assert sorted(model.state_dict()) == sorted(
        k.replace("parametrizations.weight.original0", "weight")
        for k in wt.create_model("test_wt", in_chans=1, mask_k=2).state_dict())


def test_remove_masks_then_weight_norm_either_order():
    torch.manual_seed(0)
    for masks_first in (True, False):
        conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        if masks_first:
            apply_masks(conv, k=2)
            torch.nn.utils.parametrizations.weight_norm(conv)
        else:
            torch.nn.utils.parametrizations.weight_norm(conv)
            apply_masks(conv, k=2)
        g = conv.parametrizations.weight.original0.detach().clone()
        v = conv.parametrizations.weight.original1.detach().clone()
        dense = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        remove_masks(conv)
        assert mask_count(conv) == 0 and not hasattr(conv, "weight_masks")
        xin = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(conv(xin), _conv_reference(conv, dense, xin))
        parametrize.remove_parametrizations(conv, "weight")
        assert type(conv) is torch.nn.Conv2d
        torch.testing.assert_close(conv(xin), _conv_reference(conv, dense, xin))
