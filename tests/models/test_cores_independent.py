"""Cells, cores, masks and models checked against independent answers."""

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
    assert type(convs[0]).__name__ == "ParametrizedMaskedConv2d"  # a printed model shows masks
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


def test_block_schedule_refuses_an_iteration_past_depth():
    import pytest

    from wtmodels.masks import mask_index

    assert [mask_index(t, 5, 3, "block") for t in range(5)] == [0, 0, 1, 1, 2]
    assert mask_index(7, 5, 3, "cyclic") == 1
    with pytest.raises(ValueError, match="t must be < depth=5"):
        mask_index(5, 5, 3, "block")  # was mask 2, silently


def _manual_cell(cell, z, x, i):
    """The cell by hand from its parameters: convs with W * mask i, group norms."""
    import torch.nn.functional as F

    def gn(norm, v):
        return F.group_norm(v, norm.num_groups, norm.weight, norm.bias, norm.eps)

    w1 = cell.conv1.weight * cell.conv1.weight_masks[i]
    w2 = cell.conv2.weight * cell.conv2.weight_masks[i]
    y = F.relu(gn(cell.norm1, F.conv2d(z, w1, padding=1)))
    y = gn(cell.norm2, F.conv2d(y, w2, padding=1))
    return gn(cell.norm3, F.relu(z + x + y))


def test_unrolled_and_untied_cores_are_the_hand_loop_with_the_documented_masks():
    torch.manual_seed(0)
    cases = {("cyclic", 5, 3): [0, 1, 2, 0, 1], ("block", 5, 3): [0, 0, 1, 1, 2],
             ("block", 6, 2): [0, 0, 0, 1, 1, 1], ("cyclic", 3, 5): [0, 1, 2]}
    for (schedule, depth, k), order in cases.items():
        tied = wt.create_model("test_wt", in_chans=1, depth=depth, mask_k=k,
                               mask_schedule=schedule).double()
        cell = tied.cores[0].cell
        with torch.no_grad():
            for norm in (cell.norm1, cell.norm2, cell.norm3):
                norm.weight.normal_(), norm.bias.normal_()
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        z = torch.zeros_like(x)
        for i in order:
            z = _manual_cell(cell, z, x, i)
        out = tied.cores[0](x)
        torch.testing.assert_close(out, z, rtol=1e-12, atol=1e-12)
        untied = wt.create_model("test_untied", in_chans=1, depth=depth, mask_k=k,
                                 mask_schedule=schedule, mask_seed=3).double()
        for c in untied.cores[0].cells:  # copies of the tied cell, its masks included
            c.load_state_dict(cell.state_dict())
        torch.testing.assert_close(untied.cores[0](x), z, rtol=1e-12, atol=1e-12)
        unused = ~torch.stack([cell.conv1.weight_masks[i] for i in order]).any(0)
        with torch.no_grad():
            cell.conv1.weight[unused] += 100.0  # weights no used mask keeps
        torch.testing.assert_close(tied.cores[0](x), z, rtol=1e-12, atol=1e-12)


def test_cell_and_core_constructors_refuse_bad_types_with_value_errors():
    import pytest

    from wtmodels.cells import ConvCell, VariationalDropout2d, make_norm
    from wtmodels.cores import UntiedCore

    bad = [
        (lambda: ConvCell(8.0), "width must be an integer >= 1"),
        (lambda: ConvCell(True), "width must be an integer >= 1"),  # was a 1-channel cell
        (lambda: ConvCell(8, kernel_size=3.0), "kernel_size must be an odd integer"),
        (lambda: ConvCell(8, norm_groups=2.0), "norm_groups"),
        (lambda: make_norm("group", 8, groups=2.5), "norm_groups"),
        (lambda: ConvCell(8, weight_norm="no"), "weight_norm must be true or false"),
        (lambda: ConvCell(8, spectral_norm=1), "spectral_norm must be true or false"),
        (lambda: ConvCell(8, dropout="0.1"), r"dropout must be a number in \[0, 1\)"),
        (lambda: VariationalDropout2d(True), r"dropout must be a number in \[0, 1\)"),
        (lambda: UntiedCore(ConvCell(8)), "a list of cells"),
        (lambda: UntiedCore([ConvCell(8), "cell"]), "a list of cells"),
    ]
    for build, message in bad:
        with pytest.raises(ValueError, match=message):
            build()
    assert ConvCell(8, norm_groups=2).norm1.num_groups == 2  # the valid forms still build
    assert UntiedCore((ConvCell(8), ConvCell(8))).depth == 2
    assert UntiedCore(torch.nn.ModuleList([ConvCell(8)])).depth == 1


def test_weight_set_by_a_forward_pre_hook_is_current_in_every_core():
    # torch.nn.utils.prune (and the legacy torch.nn.utils.weight_norm / spectral_norm) set
    # `weight` in a forward pre-hook; the cores formed the masked weights before the hook ran,
    # so every forward used the weight of the previous one (stale after an optimizer step)
    import torch.nn.functional as F
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    for name in ("test_wt", "test_deq", "test_ode"):
        model = wt.create_model(name, in_chans=1, depth=3, mask_k=2, norm="none",
                                f_max_iter=3, ode_method="euler", ode_T=3.0).double()
        core = model.cores[0]
        cell = core.cell
        if name == "test_deq":
            core.set_pretrain(True)  # the unrolled warm-up: a closed form to compare with
        for conv in (cell.conv1, cell.conv2):
            prune.l1_unstructured(conv, "weight", amount=0.5)
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        core(x)
        with torch.no_grad():  # an optimizer step, as it were
            for conv in (cell.conv1, cell.conv2):
                conv.weight_orig.add_(torch.randn_like(conv.weight_orig))
        w1 = cell.conv1.weight_orig * cell.conv1.weight_mask
        w2 = cell.conv2.weight_orig * cell.conv2.weight_mask
        z = torch.zeros_like(x)
        for i in (0, 1, 0):  # cyclic, depth 3, K = 2; norm "none"
            y = F.conv2d(F.relu(F.conv2d(z, w1 * cell.conv1.weight_masks[i], padding=1)),
                         w2 * cell.conv2.weight_masks[i], padding=1)
            z = F.relu(z + x + y)
        torch.testing.assert_close(core(x), z, rtol=1e-12, atol=1e-12)
