"""An unknown keyword to ``add_lora``, ``add_adapters``,
``get_datasets`` or ``build_loaders`` raised Python's ``TypeError``, which names no valid
keyword; like ``make_masks``, ``DEQ``, ``solve`` and ``create_model`` they now raise a
``ValueError`` listing the keywords they take."""

from __future__ import annotations

import pytest
from torch import nn

import wtmodels as wt
from wtmodels.data import build_loaders, get_datasets


def _net():
    return nn.Sequential(nn.Conv2d(1, 2, 3))


@pytest.mark.parametrize(("call", "bad", "valid"), [
    (lambda: wt.add_lora(_net(), rank=1, rnak=2), "rnak", "'rank'"),
    (lambda: wt.add_adapters(_net(), bottleneck=1, botleneck=2), "botleneck", "'bottleneck'"),
    (lambda: get_datasets("digits", trian_size=5), "trian_size", "'train_size'"),
    (lambda: build_loaders([], [], 8, sed=1), "sed", "'seed'"),
])
def test_unknown_keyword_is_a_value_error_naming_the_valid_ones(call, bad, valid):
    with pytest.raises(ValueError, match=rf"unknown keyword\(s\) \['{bad}'\]; valid: .*{valid}"):
        call()


def test_a_model_is_left_untouched_by_an_unknown_keyword():
    net = _net()
    with pytest.raises(ValueError):
        wt.add_lora(net, rank=1, target=nn.Conv2d)  # "targets"
    assert isinstance(net[0], nn.Conv2d) and all(p.requires_grad for p in net.parameters())
