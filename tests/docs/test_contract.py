"""The public contract of ../shared/DESIGN.md, called exactly as it is written there.

Each test runs one block of the contract verbatim (same names, keywords and example arguments),
then with other arguments an acceptance tester would pick, and checks the documented behaviour
against closed forms (linear fixed points solved by torch.linalg.solve, finite differences).
"""

from __future__ import annotations

import math

import pytest
import torch

import wtmodels as wt

F64 = torch.float64


def _linear_map(b: int, n: int, seed: int = 0):
    """f(z) = z A^T + c with ||A|| < 1 and its exact fixed point (I - A)^{-1} c."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    a = 0.5 * a / torch.linalg.matrix_norm(a, ord=2)
    c = torch.randn(b, n, generator=g, dtype=F64)
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - a, c.T).T
    return (lambda z: z @ a.T + c), exact


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_solve_as_written_returns_the_fixed_point_and_per_sample_stats(method, stop_mode):
    assert {"fixed_point", "anderson", "broyden"} <= set(wt.list_solvers())
    f, exact = _linear_map(5, 7)
    z, stats = wt.solve(f, torch.zeros(5, 7, dtype=F64), method=method, max_iter=50, tol=1e-4,
                        stop_mode=stop_mode)
    assert z.shape == (5, 7) and z.dtype == F64
    for name in ("nstep", "abs_lowest", "rel_lowest", "converged"):
        assert getattr(stats, name).shape == (5,), name
    assert stats.converged.dtype == torch.bool and bool(stats.converged.all())
    n_iter = stats.abs_trace.shape[1]
    assert stats.abs_trace.shape == stats.rel_trace.shape == (5, n_iter)
    assert int(stats.nstep.max()) == n_iter
    # the stats describe the returned iterate: abs = ||f(z) - z||, rel = abs / ||f(z)||
    fz = f(z)
    absr = (fz - z).norm(dim=1)
    torch.testing.assert_close(stats.abs_lowest.double(), absr, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(stats.rel_lowest.double(), absr / (fz.norm(dim=1) + 1e-8),
                               rtol=1e-6, atol=1e-12)
    # residual <= tol of a contraction with factor 1/2 puts z within 2 * residual of z*
    err = (z - exact).norm(dim=1)
    assert bool((err <= 2 * absr + 1e-12).all())


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (1, 5), (4,)])
def test_solve_any_batched_shape_stops_per_sample(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0  # sample 0 starts at its fixed point z* = 0: one evaluation, then it stops
    f = lambda z: 0.8 * torch.tanh(z) + x  # noqa: E731
    z, stats = wt.solve(f, torch.zeros(shape), method="fixed_point", max_iter=200, tol=1e-6)
    assert z.shape == shape and stats.nstep.shape == (shape[0],)
    assert int(stats.nstep[0]) == 1 and bool(stats.converged.all())
    if shape[0] > 1:
        assert int(stats.nstep[1:].min()) > 1


def test_solve_bad_names_and_values_name_the_choices():
    f = lambda z: 0.5 * z  # noqa: E731
    z0 = torch.ones(2, 3)
    with pytest.raises(ValueError, match="anderson.*broyden.*fixed_point"):
        wt.solve(f, z0, method="newton")
    with pytest.raises(ValueError, match="abs.*rel"):
        wt.solve(f, z0, stop_mode="max")
    with pytest.raises(ValueError, match="max_iter"):
        wt.solve(f, z0, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        wt.solve(f, z0, tol=-1.0)


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_deq_as_written_gradients_reach_everything_f_closes_over(grad):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.mul_(0.1)
    scale = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))
    x = torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True)
    f = lambda z: scale * torch.tanh(conv(z)) + x  # noqa: E731
    deq = wt.DEQ(f_solver="anderson", f_max_iter=30, f_tol=1e-4, b_solver="anderson",
                 b_max_iter=30, b_tol=1e-6, grad=grad)
    z_star, stats = deq(f, torch.zeros_like(x))
    assert z_star.shape == x.shape and stats.nstep.shape == (2,)
    z_star.square().sum().backward()
    for name, t in [("weight", conv.weight), ("bias", conv.bias), ("scale", scale), ("x", x)]:
        assert t.grad is not None and bool(t.grad.abs().sum() > 0), name

    # d/d scale of sum(z*^2) by a central difference of tightly solved fixed points
    def loss(s):
        with torch.no_grad():
            g = lambda z: s * torch.tanh(conv(z)) + x  # noqa: E731
            z, _ = wt.solve(g, torch.zeros_like(x), max_iter=200, tol=1e-13, stop_mode="abs")
        return float(z.square().sum())

    h = 1e-5
    fd = (loss(0.7 + h) - loss(0.7 - h)) / (2 * h)
    # ift / unroll are exact up to the solver tolerances; phantom is a damped approximation
    assert scale.grad.item() == pytest.approx(fd, rel=1e-2 if grad == "phantom" else 2e-3)


def test_deq_bad_names_name_the_choices():
    with pytest.raises(ValueError, match="ift.*phantom.*unroll"):
        wt.DEQ(grad="adjoint")
    with pytest.raises(ValueError, match="anderson"):
        wt.DEQ(f_solver="newton")
    with pytest.raises(ValueError, match="anderson"):
        wt.DEQ(b_solver="newton")


@pytest.mark.parametrize("shape", [(16, 32), (8, 4, 3, 3), (5, 7)])
@pytest.mark.parametrize("k,density", [(4, 0.5), (3, 0.1), (1, 0.9)])
def test_make_masks_random_exact_count_reproducible_distinct(shape, k, density):
    masks = wt.make_masks(shape, k=k, density=density, kind="random", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (k, *shape)
    counts = masks.reshape(k, -1).sum(1)
    assert bool((counts == round(density * math.prod(shape))).all())
    assert torch.equal(masks, wt.make_masks(shape, k=k, density=density, kind="random", seed=0))
    assert len({tuple(m.flatten().tolist()) for m in masks}) == k
    other = wt.make_masks(shape, k=k, density=density, kind="random", seed=1)
    assert not torch.equal(masks, other)


@pytest.mark.parametrize("shape", [(16, 32), (6, 2, 3, 2), (4, 12)])
@pytest.mark.parametrize("density,n", [(0.5, 2), (0.25, 1), (0.75, 3)])
def test_make_masks_nm_along_the_flattened_input_dimension(shape, density, n):
    # (6, 2, 3, 2): 12 inputs per row, the middle group of 4 straddles the two channels
    masks = wt.make_masks(shape, k=3, density=density, kind="nm", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (3, *shape)
    groups = masks.reshape(3, shape[0], -1, 4).sum(-1)
    assert bool((groups == n).all())
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 3


def test_make_masks_bernoulli_density_and_bad_values():
    masks = wt.make_masks((128, 128), k=2, density=0.3, kind="bernoulli", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (2, 128, 128)
    share = masks.float().mean(dim=(1, 2))  # 16384 draws: sd of the share is 0.0036
    assert bool(((share - 0.3).abs() < 0.02).all()) and not torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="random.*bernoulli.*nm"):
        wt.make_masks((4, 8), kind="gaussian")
    with pytest.raises(ValueError, match="density"):
        wt.make_masks((4, 8), density=1.5)
    with pytest.raises(ValueError, match="k"):
        wt.make_masks((4, 8), k=0)


def test_create_model_as_written():
    model = wt.create_model("wt_s", num_classes=10, in_chans=1, depth=8, width=32,
                            mask_k=8, mask_density=0.5)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    masks = {n: b for n, b in model.named_buffers() if b.dtype == torch.bool}
    assert masks and set(masks) <= set(model.state_dict())
    for name, b in masks.items():
        assert b.shape[0] == 8, name
        per_mask = b.reshape(8, -1)
        assert bool((per_mask.sum(1) == per_mask.shape[1] // 2).all()), name
        assert len({tuple(m.tolist()) for m in per_mask}) == 8, name


@pytest.mark.parametrize("family", ["wt", "deq", "ode", "untied"])
def test_every_family_prefix_with_masks_and_its_test_variant(family):
    names = wt.list_models()
    assert any(n.startswith(family + "_") for n in names) and f"test_{family}" in names
    kw = dict(num_classes=7, in_chans=3, depth=2, width=8, mask_k=3, mask_density=0.25)
    model = wt.create_model(f"{family}_s", **kw)
    out = model(torch.randn(2, 3, 12, 12))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    masks = {n: b for n, b in model.named_buffers() if b.dtype == torch.bool}
    assert masks
    for b in masks.values():
        assert b.shape[0] == 3 and bool((b.reshape(3, -1).float().mean(1) == 0.25).all())
    # mask_seed defaults to 0: a second build holds the same masks; another seed other masks,
    # and loading the state_dict brings the first build's masks back bit for bit
    again = dict(wt.create_model(f"{family}_s", **kw).named_buffers())
    assert all(torch.equal(b, again[n]) for n, b in masks.items())
    other = wt.create_model(f"{family}_s", mask_seed=1, **kw)
    assert any(not torch.equal(b, dict(other.named_buffers())[n]) for n, b in masks.items())
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(b, dict(other.named_buffers())[n]) for n, b in masks.items())


def test_create_model_bad_names_name_the_choices():
    with pytest.raises(ValueError, match="wt_s"):
        wt.create_model("wt_xl")
    with pytest.raises(ValueError, match="random, bernoulli, nm"):
        wt.create_model("wt_s", mask_k=2, mask_kind="gaussian")
    with pytest.raises(ValueError, match="mask_density"):
        wt.create_model("wt_s", mask_k=2, mask_density=0.0)


def test_params_is_an_integer_count_in_the_summary_and_its_json():
    # it was a float: results.csv read "1378.0" and int(row["params"]) raised
    import json

    from wtmodels.accounting import count_params, model_summary

    model = wt.create_model("test_wt", in_chans=1)
    info = model_summary(model, (1, 8, 8))
    assert type(info["params"]) is int and info["params"] == count_params(model)
    assert json.dumps(info["params"]) == str(count_params(model))  # no ".0"
