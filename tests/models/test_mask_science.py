"""The science of the static masks and of CapaBoost, checked against independent
computations (hand-written cell formula, numpy sums and ranks, closed-form expectations)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.optim import build_optimizer
from wtmodels.peft import add_lora, count_trainable
from wtmodels.peft.lora import LoRALayer

torch.set_num_threads(1)
X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _masked_convs(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_masks")]


def _hand_cell(cell, z, x, index):
    """The cell's formula with mask ``index`` on both convolutions (written out here)."""
    w1 = cell.conv1.weight * cell.conv1.weight_masks[index]
    w2 = cell.conv2.weight * cell.conv2.weight_masks[index]
    y = F.relu(cell.norm1(F.conv2d(z, w1, padding=1)))
    y = cell.norm2(F.conv2d(y, w2, padding=1))
    return cell.norm3(F.relu(z + x + y))


# ----------------------------------------------------------------------------------------
# static masks


def test_deq_training_forward_is_the_fixed_point_of_the_hand_written_composite():
    # train mode with grad enabled (the path a training step takes: formed masks with a graph,
    # Anderson, IFT); the composite f_2 o f_1 o f_0 is written out from the cell's formula
    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, mask_k=3, f_solver="anderson",
                            f_max_iter=200, f_tol=1e-11).double().train()
    core, seen = model.cores[0], {}
    core.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], z=out))
    model(X).sum().backward()
    x, z = seen["x"].detach(), seen["z"].detach()
    with torch.no_grad():
        fz = z
        for i in range(3):
            fz = _hand_cell(core.cell, fz, x, i)
        shifted = _hand_cell(core.cell, z, x, 1)  # not a fixed point of another order
        for i in (2, 0):
            shifted = _hand_cell(core.cell, shifted, x, i)
    assert core.last_stats["converged"] == 1.0
    rel = ((fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).max()
    assert rel < 1e-10
    assert ((shifted - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).max() > 1e-4
    assert core.cell.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, kw", [
    ("test_wt", {}),
    ("test_untied", {}),
    ("test_deq", {"grad": "ift"}),
    ("test_deq", {"grad": "phantom"}),
    ("test_deq", {"grad": "unroll", "jac": True}),
    ("test_ode", {"ode_method": "rk4", "ode_adjoint": True, "norm": "none"}),
])
def test_weights_no_mask_keeps_get_exactly_zero_gradient_in_every_core(name, kw):
    kw = dict(kw)
    jac = kw.pop("jac", False)
    torch.manual_seed(0)
    model = wt.create_model(name, in_chans=1, depth=3, mask_k=2, mask_density=0.25,
                            **kw).double()
    model.set_jac_reg(jac)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(X).logsumexp(1).mean()
        if jac:
            loss = loss + model.jac_loss()
        loss.backward()
    live_grad = 0.0
    for name_, conv in _masked_convs(model):
        dead = ~conv.weight_masks.any(0)
        # two independent masks at density 1/4: (3/4)^2 of the entries are kept by neither
        assert abs(dead.double().mean().item() - 0.5625) < 0.08, name_
        assert torch.equal(conv.weight.grad[dead], torch.zeros(int(dead.sum()),
                                                               dtype=torch.float64)), name_
        live_grad += conv.weight.grad[~dead].abs().sum().item()
    assert live_grad > 0


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_masks_are_static_through_steps_and_decayed_dead_weights_do_not_matter(optimizer):
    torch.manual_seed(0)
    model = wt.create_model("test_wt", in_chans=1, depth=4, mask_k=3, mask_density=0.25)
    model = model.double()
    masks = {n: c.weight_masks.clone() for n, c in _masked_convs(model)}
    before = {n: c.weight.detach().clone() for n, c in _masked_convs(model)}
    opt = build_optimizer(model, optimizer, lr=0.05, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(X).logsumexp(1).mean().backward()
        opt.step()
    with torch.no_grad():
        out = model(X)
        for n, conv in _masked_convs(model):
            assert conv.weight_masks.dtype == torch.bool
            assert torch.equal(conv.weight_masks, masks[n]), n
            dead = ~conv.weight_masks.any(0)
            # weight decay reaches the dead entries (kernels are decayed) ...
            assert (conv.weight[dead] != before[n][dead]).all(), n
            conv.weight[dead] = 1e3 * torch.randn(int(dead.sum()), dtype=torch.float64)
        # ... but the forward never reads them
        assert torch.equal(model(X), out)
        conv = _masked_convs(model)[0][1]
        live = conv.weight_masks.any(0)
        conv.weight[live] += 0.5  # the check can fail: a live entry does change it
        assert not torch.allclose(model(X), out)
    # a load does not bring masks back from anywhere but the state dict
    other = wt.create_model("test_wt", in_chans=1, depth=4, mask_k=3, mask_density=0.25,
                            mask_seed=9).double()
    assert not torch.equal(_masked_convs(other)[0][1].weight_masks,
                           masks[_masked_convs(model)[0][0]])
    other.load_state_dict(model.state_dict())
    for n, conv in _masked_convs(other):
        assert torch.equal(conv.weight_masks, masks[n])


def test_plain_adam_leaves_dead_weights_bit_identical():
    torch.manual_seed(0)
    model = wt.create_model("test_wt", in_chans=1, depth=3, mask_k=2, mask_density=0.25)
    model = model.double()
    before = {n: c.weight.detach().clone() for n, c in _masked_convs(model)}
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(X).logsumexp(1).mean().backward()
        opt.step()
    for n, conv in _masked_convs(model):
        dead = ~conv.weight_masks.any(0)
        assert torch.equal(conv.weight.detach()[dead], before[n][dead])
        assert not torch.equal(conv.weight.detach()[~dead], before[n][~dead])


def test_with_weight_norm_dead_entries_of_v_still_shape_the_output():
    # README: the mask multiplies g v / ||v||, whose norm includes the masked-out entries of v
    torch.manual_seed(0)
    model = wt.create_model("test_wt", in_chans=1, depth=3, mask_k=2, mask_density=0.25,
                            weight_norm=True).double()
    model(X).logsumexp(1).mean().backward()
    conv = model.cores[0].cell.conv1
    v = conv.parametrizations.weight.original1
    dead = ~conv.weight_masks.any(0)
    assert v.grad[dead].abs().max() > 0
    with torch.no_grad():
        out = model(X)
        g = conv.parametrizations.weight.original0.detach().flatten()
        w = conv.weight.detach()  # g v / ||v|| per output channel, by hand below
        by_hand = g[:, None, None, None] * v / v.flatten(1).norm(dim=1)[:, None, None, None]
        torch.testing.assert_close(w, by_hand, rtol=0, atol=1e-14)
        v[dead] *= 3.0
        assert not torch.allclose(model(X), out)


@pytest.mark.parametrize("kind, density", [("random", 0.3), ("nm", 0.5)])
def test_density_is_exact_in_every_mask_of_every_masked_conv(kind, density):
    model = wt.create_model("test_wt", in_chans=1, stages=2, mask_k=4, mask_density=density,
                            mask_kind=kind)
    convs = _masked_convs(model)
    # width 8: stage 0 convs 8x8x3x3 = 576 entries, stage 1 16x16x3x3 = 2304
    assert sorted(c.weight.numel() for _, c in convs) == [576, 576, 2304, 2304]
    ones = {576: 173, 2304: 691}  # round(0.3 * 576) = round(172.8); round(0.3 * 2304) = 691
    for name, conv in convs:
        m = conv.weight_masks
        if kind == "random":
            assert m.flatten(1).sum(1).tolist() == [ones[conv.weight.numel()]] * 4, name
        else:  # 2:4 along (in, kh, kw)
            assert (m.flatten(2).unflatten(2, (-1, 4)).sum(3) == 2).all(), name
        flat = m.flatten(1)
        assert len({tuple(r.tolist()) for r in flat}) == 4, name  # pairwise distinct
    # two same-shaped convs of one cell hold different masks (their own seeds)
    assert not torch.equal(convs[0][1].weight_masks, convs[1][1].weight_masks)
    plain = wt.create_model("test_wt", in_chans=1, stages=2)
    assert count_trainable(model) == count_trainable(plain)


# ----------------------------------------------------------------------------------------
# CapaBoost


@pytest.mark.parametrize("out, inn, ks, r, d, kind", [
    (40, 48, 1, 3, 2, "random"),   # bound d r = 6
    (64, 8, 1, 4, 4, "random"),    # capped by in = 8
    (8, 64, 1, 4, 4, "bernoulli"),  # capped by out = 8
    (16, 1, 3, 4, 4, "random"),    # a 1-channel 3x3 conv: in k k = 9 caps it (the stem)
    (32, 32, 3, 8, 4, "nm"),       # 2:4 masks, bound 32
])
def test_capaboost_update_is_the_numpy_sum_and_reaches_its_rank_bound(out, inn, ks, r, d, kind):
    rng = np.random.default_rng(0)
    base = (nn.Linear(inn, out) if ks == 1 else nn.Conv2d(inn, out, ks)).double()
    layer = LoRALayer.wrap(base, rank=r, copies=d, density=0.5, kind=kind, seed=3)
    a = rng.standard_normal(tuple(layer.lora_A.shape))
    b = rng.standard_normal(tuple(layer.lora_B.shape))
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(a))
        layer.lora_B.copy_(torch.from_numpy(b))
    ma, mb = layer.mask_A.numpy(), layer.mask_B.numpy()
    dw = sum((mb[i] * b) @ (ma[i] * a).reshape(r, -1) for i in range(d))
    np.testing.assert_allclose(layer.delta_weight().detach().numpy().reshape(out, -1), dw,
                               rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(dw) == min(d * r, out, inn * ks * ks)
    assert np.linalg.matrix_rank(b @ a.reshape(r, -1)) == r  # plain LoRA: rank r


def test_capaboost_update_mean_and_size_closed_forms():
    # over the masks, E[dW] = d p^2 B A (README: 0.5x one unmasked copy at d=2, 1x at d=4)
    base = nn.Linear(8, 4).double()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    for d, p in ((2, 0.5), (4, 0.25)):
        total = torch.zeros(4, 8, dtype=torch.float64)
        for seed in range(400):
            layer = LoRALayer.wrap(base, rank=2, copies=d, density=p, seed=seed)
            with torch.no_grad():
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
                total += layer.delta_weight()
        want = d * p * p * (b @ a)
        assert ((total / 400 - want).norm() / want.norm()) < 0.15, (d, p)
    # but one draw's norm is larger than the mean's: for factors unrelated to the masks,
    # E||dW||^2 / E||BA||^2 = d p^2 + d (d - 1) p^4 (each copy p^2, cross terms p^4)
    base = nn.Linear(288, 32).double()
    for d, p in ((2, 0.5), (4, 0.5), (4, 0.25)):
        num = den = 0.0
        for seed in range(6):
            layer = LoRALayer.wrap(base, rank=4, copies=d, density=p, seed=seed)
            with torch.no_grad():
                layer.lora_A.normal_(generator=gen)
                layer.lora_B.normal_(generator=gen)
                num += layer.delta_weight().square().sum().item()
                den += (layer.lora_B @ layer.lora_A).square().sum().item()
        ratio = math.sqrt(num / den)
        assert abs(ratio - math.sqrt(d * p * p + d * (d - 1) * p ** 4)) < 0.06, (d, p, ratio)
        assert ratio > 1.25 * d * p * p  # the mean's d p^2 understates the size


def test_capaboost_counts_lora_parameters_and_a_share_of_them_never_trains():
    def build(**kw):
        torch.manual_seed(0)
        model = wt.create_model("test_wt", in_chans=1, stages=1).double()
        return model, add_lora(model, rank=4, seed=0, **kw)

    plain, _ = build()
    model, layers = build(copies=2, density=0.5)
    # stem conv 1->8 (3x3), cell conv1 / conv2 8->8 (3x3): r (in k k + out) each
    by_hand = 4 * (9 + 8) + 2 * 4 * (72 + 8)
    assert count_trainable(plain) == count_trainable(model) == by_hand
    # masks distinct across copies, across the A / B factors and across same-shaped layers
    cell = {n: la for n, la in model.named_modules() if isinstance(la, LoRALayer)}
    c1, c2 = cell["cores.0.cell.conv1"], cell["cores.0.cell.conv2"]
    assert not torch.equal(c1.mask_A[0], c1.mask_A[1])
    assert not torch.equal(c1.mask_A, c2.mask_A) and not torch.equal(c1.mask_B, c2.mask_B)
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.1)
    model(X).logsumexp(1).mean().backward()
    dead_total = live_total = 0
    for layer in layers:
        for factor, masks in ((layer.lora_A, layer.mask_A), (layer.lora_B, layer.mask_B)):
            dead = ~masks.any(0)  # kept by no copy: zero gradient, never read
            assert torch.equal(factor.grad[dead], torch.zeros_like(factor.grad[dead]))
            dead_total += int(dead.sum())
            live_total += int((~dead).sum())
    # at d = 2, p = 1/2 about (1 - p)^d = 1/4 of LoRA's parameters are dead weight
    assert abs(dead_total / (dead_total + live_total) - 0.25) < 0.04
    with torch.no_grad():
        out = model(X)
        for layer in layers:
            layer.lora_A[~layer.mask_A.any(0)] = 1e3
            layer.lora_B[~layer.mask_B.any(0)] = -1e3
        assert torch.equal(model(X), out)


def test_module_type_keeps_weight_and_capaboost_masks_bool():
    # nn.Module.type(dtype) converts every tensor, buffers included: the masks became float64
    # (same values) and model_summary / masked_out_per_iter raised TypeError on `~mask`
    from wtmodels.models import model_summary

    model = wt.create_model("test_wt", in_chans=1, stages=1, mask_k=2, mask_density=0.5)
    masks = {n: b.clone() for n, b in model.named_buffers() if "mask" in n}
    model.type(torch.float64)
    assert model.stem[0].weight.dtype == torch.float64
    for n, b in model.named_buffers():
        if "mask" in n:
            assert b.dtype == torch.bool and torch.equal(b, masks[n]), n
    # 2 masked 8x8x3x3 convs keep 288 of their 576 entries
    summary = model_summary(model, (1, 8, 8))
    plain = model_summary(wt.create_model("test_wt", in_chans=1, stages=1), (1, 8, 8))
    assert plain["nonzero_params_per_iter"] - summary["nonzero_params_per_iter"] == 2 * 288
    lora = LoRALayer.wrap(nn.Linear(8, 8), rank=4, copies=2, density=0.5).type(torch.float64)
    assert lora.mask_A.dtype == lora.mask_B.dtype == torch.bool
    assert lora.lora_A.dtype == torch.float64


def _by_hand(cell, indices, x):
    """The cell applied with masks ``indices`` in turn, written out from the README formula."""
    z = torch.zeros_like(x)
    for i in indices:
        w1 = cell.conv1.weight * cell.conv1.weight_masks[i]
        w2 = cell.conv2.weight * cell.conv2.weight_masks[i]
        y = F.relu(cell.norm1(F.conv2d(z, w1, padding=1)))
        y = cell.norm2(F.conv2d(y, w2, padding=1))
        z = cell.norm3(F.relu(z + x + y))
    return z


@pytest.mark.parametrize("schedule, depth, k, indices", [
    ("cyclic", 5, 3, [0, 1, 2, 0, 1]),
    ("block", 6, 3, [0, 0, 1, 1, 2, 2]),
    ("block", 5, 2, [0, 0, 0, 1, 1]),
])
def test_mask_schedule_by_hand_in_every_core(schedule, depth, k, indices):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    kw = dict(depth=depth, mask_k=k, mask_schedule=schedule)
    tied = wt.create_model("test_wt", **kw).double().cores[0]
    want = _by_hand(tied.cell, indices, x)
    assert torch.equal(tied(x), want)
    ode = wt.create_model("test_ode", ode_method="euler", ode_T=float(depth), **kw).double()
    ode = ode.cores[0]
    ode.cell.load_state_dict(tied.cell.state_dict())
    torch.testing.assert_close(ode(x), want, rtol=0, atol=1e-12)
    untied = wt.create_model("test_untied", **kw).double().cores[0]
    for cell in untied.cells:
        cell.load_state_dict(tied.cell.state_dict())
    assert torch.equal(untied(x), want)
    # the DEQ composite f_{K-1} o ... o f_0, one solver step from z0 = 0 (schedule unused)
    deq = wt.create_model("test_deq", f_solver="fixed_point", f_max_iter=1, f_tol=1e-30,
                          **kw).double().eval().cores[0]
    deq.cell.load_state_dict(tied.cell.state_dict())
    with torch.no_grad():
        assert torch.equal(deq(x), _by_hand(tied.cell, list(range(k)), x))
