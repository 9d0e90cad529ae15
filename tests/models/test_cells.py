"""Tests of the weight-tied cell and its variational dropout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wtmodels.cells import ConvCell, VariationalDropout2d, make_norm, reset_dropout


def test_cell_matches_its_formula():
    torch.manual_seed(0)
    cell = ConvCell(8, norm_groups=4)
    z, x = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    y = F.relu(F.group_norm(F.conv2d(z, cell.conv1.weight, padding=1), 4,
                            cell.norm1.weight, cell.norm1.bias))
    y = F.group_norm(F.conv2d(y, cell.conv2.weight, padding=1), 4, cell.norm2.weight,
                     cell.norm2.bias)
    expected = F.group_norm(F.relu(z + x + y), 4, cell.norm3.weight, cell.norm3.bias)
    assert torch.allclose(cell(z, x), expected, atol=1e-6)


def test_weight_and_spectral_norm_are_parametrizations():
    cell = ConvCell(4, norm_groups=2, weight_norm=True, spectral_norm=True)
    names = {n for n, _ in cell.named_parameters()}
    assert "conv1.parametrizations.weight.original0" in names  # weight-norm magnitude g
    assert "conv1.parametrizations.weight.original1" in names  # direction v
    cell.eval()
    w = cell.conv1.weight.reshape(4, -1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-2)


def test_variational_dropout_one_mask_per_sample_per_forward():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.5).train()
    x = torch.ones(64, 4, 3, 3)
    reset_dropout(drop, x)
    a, b = drop(x), drop(x)
    assert torch.equal(a, b)  # shared across iterations of one forward
    assert set(a.unique().tolist()) == {0.0, 2.0}  # inverted-dropout scaling 1 / (1 - p)
    assert not torch.equal(a[0], a[1])  # per sample
    assert abs(a.mean().item() - 1.0) < 0.1  # unbiased
    reset_dropout(drop, x)
    assert not torch.equal(drop(x), a)  # fresh for the next forward
    drop.eval()
    assert torch.equal(drop(x), x)


def test_dropout_without_reset_raises():
    drop = VariationalDropout2d(0.2).train()
    with pytest.raises(RuntimeError, match="reset_dropout"):
        drop(torch.ones(1, 2, 2, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm_groups"):
        ConvCell(6, norm_groups=4)
    with pytest.raises(ValueError, match="group, layer, none"):
        make_norm("batch", 8)
    with pytest.raises(ValueError, match="width"):
        ConvCell(0)
    with pytest.raises(ValueError, match="dropout"):
        ConvCell(8, dropout=1.0)
    assert isinstance(make_norm("none", 3), nn.Identity)
