"""An audit of every name, default, shape, flag and file in ../shared/DESIGN.md.

Each check calls the contract as DESIGN.md spells it (keywords and example values verbatim) and
compares against an independent oracle: numpy linear algebra for fixed points and gradients,
hand-computed traces and parameter / FLOP counts, a functional re-implementation of a masked
forward pass, binomial bounds for Bernoulli masks, and integer counts for accuracies.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wtmodels as wt

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


# ---------------------------------------------------------------- names and defaults


def test_fresh_process_public_names_write_no_files_and_parse_no_argv(tmp_path):
    """`import wtmodels as wt` in a fresh process (odd argv, empty cwd): every name DESIGN uses
    is there, the calls of the contract run, and nothing is written to the cwd."""
    code = (
        "import sys; sys.argv = ['x', '--epochs', 'nope', '-h']\n"
        "import torch; torch.set_num_threads(1)\n"
        "import wtmodels as wt\n"
        "for n in ('solve', 'list_solvers', 'DEQ', 'make_masks', 'create_model',"
        " 'list_models'):\n"
        "    assert callable(getattr(wt, n)), n\n"
        "z, s = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), method='anderson',"
        " max_iter=50, tol=1e-4, stop_mode='rel')\n"
        "m = wt.make_masks((4, 4), k=4, density=0.5, kind='random', seed=0)\n"
        "net = wt.create_model('wt_s', num_classes=10, in_chans=1, depth=8, width=32,"
        " mask_k=8, mask_density=0.5)\n"
        "print(round(float(z[0, 0]), 3), tuple(m.shape), tuple(net(torch.zeros(1, 1, 8, 8))"
        ".shape))\n"
    )
    out = _run(["-c", code], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "2.0 (4, 4, 4) (1, 10)"
    assert list(tmp_path.iterdir()) == []


def test_signature_defaults_are_the_documented_ones():
    # wt.solve(f, z0, method="anderson", max_iter=50, tol=1e-4, stop_mode="rel", **opts)
    params = list(inspect.signature(wt.solve).parameters)
    assert params[:2] == ["f", "z0"]
    assert {n: _default(wt.solve, n) for n in ("method", "max_iter", "tol", "stop_mode")} == {
        "method": "anderson", "max_iter": 50, "tol": 1e-4, "stop_mode": "rel"}
    # the DEQ line's values are its defaults
    want = {"f_solver": "anderson", "f_max_iter": 30, "f_tol": 1e-4, "b_solver": "anderson",
            "b_max_iter": 30, "b_tol": 1e-6, "grad": "ift"}
    deq = wt.DEQ()
    assert {k: getattr(deq, k) for k in want} == want
    # make_masks(shape, k=4, density=0.5, kind="random", seed=0)
    assert {n: _default(wt.make_masks, n) for n in ("k", "density", "kind", "seed")} == {
        "k": 4, "density": 0.5, "kind": "random", "seed": 0}
    assert torch.equal(wt.make_masks((6, 5)),
                       wt.make_masks((6, 5), k=4, density=0.5, kind="random", seed=0))


def test_list_solvers_and_list_models_hold_the_documented_names():
    solvers = wt.list_solvers()
    assert {"fixed_point", "anderson", "broyden"} <= set(solvers)
    assert all(isinstance(s, str) for s in solvers)
    models = wt.list_models()
    assert "wt_s" in models and all(isinstance(m, str) for m in models)
    for prefix in ("wt_", "deq_", "ode_", "untied_"):  # every family is reachable
        assert any(m.startswith(prefix) for m in models), prefix
    # every family registers a test_* variant
    cores = {wt.get_config(m).core for m in models if m.startswith("test_")}
    assert cores >= {"unrolled", "deq", "ode", "untied"}


# ---------------------------------------------------------------- solvers


def _linear(b=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    a = 0.6 * a / torch.linalg.matrix_norm(a, ord=2)
    c = torch.randn(b, n, generator=g, dtype=F64)
    exact = np.linalg.solve(np.eye(n) - a.numpy(), c.numpy().T).T
    return (lambda z: z @ a.T + c), exact


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_solve_as_written_against_numpy(method, stop_mode):
    f, exact = _linear()
    z, stats = wt.solve(f, torch.zeros(3, 4, dtype=F64), method=method, max_iter=50,
                        tol=1e-4, stop_mode=stop_mode)
    assert isinstance(z, torch.Tensor) and z.shape == (3, 4) and z.dtype == F64
    for name in ("nstep", "abs_lowest", "rel_lowest", "converged"):
        assert getattr(stats, name).shape == (3,), name
    n_iter = stats.abs_trace.shape[1]
    assert stats.abs_trace.shape == stats.rel_trace.shape == (3, n_iter)
    assert stats.converged.dtype == torch.bool and bool(stats.converged.all())
    # the stats describe the returned iterate: recompute its residuals independently
    fz = f(z)
    r = (fz - z).norm(dim=1)
    assert torch.allclose(stats.abs_lowest, r, rtol=1e-6, atol=1e-12)
    assert torch.allclose(stats.rel_lowest, r / (fz.norm(dim=1) + 1e-8), rtol=1e-6, atol=1e-12)
    bound = (stats.rel_lowest if stop_mode == "rel" else stats.abs_lowest)
    assert bool((bound <= 1e-4).all())
    # a contraction of modulus 0.6: error <= residual / (1 - 0.6)
    err = np.abs(z.numpy() - exact).max()
    assert err <= float(stats.abs_lowest.max()) / 0.4 + 1e-12


def test_fixed_point_traces_match_the_geometric_hand_values():
    # z_{t+1} = z_t / 2 + b from 0: residual_t = ||b|| / 2^t, rel_t = 1 / (2^{t+1} - 1)
    b = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    _, s = wt.solve(lambda z: 0.5 * z + b, torch.zeros(2, 2, dtype=F64), method="fixed_point",
                    max_iter=5, tol=1e-12, stop_mode="abs")
    t = torch.arange(5, dtype=F64)
    want_abs = torch.tensor([math.sqrt(5.0), 5.0], dtype=F64)[:, None] * 0.5 ** t
    want_rel = (1.0 / (2.0 ** (t + 1) - 1)).expand(2, 5)
    assert torch.allclose(s.abs_trace.to(F64), want_abs, rtol=1e-6)
    assert torch.allclose(s.rel_trace.to(F64), want_rel, rtol=1e-6)
    assert s.nstep.tolist() == [5, 5] and s.converged.tolist() == [False, False]


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_solve_any_shape_and_stops_per_sample(method):
    # (B, C, H, W) with per-sample contraction 0.1 and 0.9: fixed points 1/0.9 and 10
    a = torch.tensor([0.1, 0.9], dtype=F64).view(2, 1, 1, 1)
    z, s = wt.solve(lambda z: a * z + 1.0, torch.zeros(2, 3, 2, 2, dtype=F64), method=method,
                    max_iter=300, tol=1e-8, stop_mode="abs")
    assert z.shape == (2, 3, 2, 2) and s.nstep.shape == (2,)
    assert torch.allclose(z[0], torch.full((3, 2, 2), 1 / 0.9, dtype=F64), atol=1e-6)
    assert torch.allclose(z[1], torch.full((3, 2, 2), 10.0, dtype=F64), atol=1e-6)
    if method == "fixed_point":  # the fast sample stops first: 0.1^t * ||1|| * ... < 1e-8
        assert int(s.nstep[0]) < int(s.nstep[1])
        assert s.abs_trace.shape[1] == int(s.nstep.max())


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_solve_each_sample_as_if_alone(method):
    # stop per sample: a batch with a diverging sample gives every sample what it gets alone
    g = torch.Generator().manual_seed(0)
    w = 0.25 * torch.randn(3, 5, 5, generator=g, dtype=F64)
    w[2] *= 12
    x = torch.randn(3, 5, generator=g, dtype=F64)

    def f(z, rows=slice(None)):
        return torch.einsum("bij,bj->bi", w[rows], z) + x[rows]

    zb, sb = wt.solve(f, torch.zeros(3, 5, dtype=F64), method=method, max_iter=40, tol=1e-10)
    for i in range(3):
        zi, si = wt.solve(lambda z, i=i: f(z, slice(i, i + 1)), torch.zeros(1, 5, dtype=F64),
                          method=method, max_iter=40, tol=1e-10)
        assert torch.allclose(zb[i], zi[0], rtol=1e-12, atol=1e-12)
        assert int(sb.nstep[i]) == int(si.nstep[0])
        assert bool(sb.converged[i]) == bool(si.converged[0])


@pytest.mark.parametrize("bad, words", [
    ({"method": "nope"}, ["anderson", "broyden", "fixed_point"]),
    ({"stop_mode": "nope"}, ["abs", "rel"]),
    ({"no_such_option": 1}, ["no_such_option"]),
    ({"max_iter": 0}, ["max_iter"]),
    ({"tol": -1.0}, ["tol"]),
])
def test_solve_bad_arguments_raise_value_error_naming_the_choices(bad, words):
    with pytest.raises(ValueError) as e:
        wt.solve(lambda z: 0.5 * z, torch.zeros(2, 2), **bad)
    assert all(w in str(e.value) for w in words)


def test_solver_options_are_used_not_ignored():
    # damped fixed point z <- (1 - tau) z + tau (z / 2 + b): error ratio 1 - tau / 2 = 0.75
    b = torch.ones(2, 3, dtype=F64)
    _, s = wt.solve(lambda z: 0.5 * z + b, torch.zeros(2, 3, dtype=F64), method="fixed_point",
                    max_iter=6, tol=1e-12, stop_mode="abs", tau=0.5)
    ratios = s.abs_trace[:, 1:] / s.abs_trace[:, :-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.75), rtol=1e-9)
    deq = wt.DEQ(f_solver="fixed_point", f_max_iter=6, f_tol=1e-12, stop_mode="abs",
                 f_opts={"tau": 0.5})
    _, s = deq(lambda z: 0.5 * z + b, torch.zeros(2, 3, dtype=F64))
    ratios = s.abs_trace[:, 1:] / s.abs_trace[:, :-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.75), rtol=1e-9)
    deq = wt.DEQ(f_solver="fixed_point", f_max_iter=50, f_tol=1e-12, eval_f_max_iter=3).eval()
    with torch.no_grad():
        _, s = deq(lambda z: 0.5 * z + b, torch.zeros(2, 3, dtype=F64))
    assert s.nstep.tolist() == [3, 3]


# ---------------------------------------------------------------- DEQ


def _linear_deq_problem():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(0.2 * torch.randn(4, 4, generator=g, dtype=F64))
    u = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=F64))
    x = torch.randn(3, 4, generator=g, dtype=F64)
    c = torch.randn(3, 4, generator=g, dtype=F64)
    return w, u, x, c


@pytest.mark.parametrize("grad", ["ift", "unroll", "phantom"])
def test_deq_as_written_gradients_against_closed_forms(grad):
    w, u, x, c = _linear_deq_problem()
    deq = wt.DEQ(f_solver="anderson", f_max_iter=30, f_tol=1e-4, b_solver="anderson",
                 b_max_iter=30, b_tol=1e-6, grad=grad)
    deq.f_tol, deq.b_tol, deq.f_max_iter, deq.b_max_iter = 1e-11, 1e-11, 200, 200
    z_star, stats = deq(lambda z: z @ w.T + x @ u.T, torch.zeros(3, 4, dtype=F64))
    assert type(stats).__name__ == "SolverStats" and stats.nstep.shape == (3,)
    (z_star * c).sum().backward()
    assert w.grad is not None and u.grad is not None  # every parameter f closes over
    W, U, X, C = (t.detach().numpy() for t in (w, u, x, c))
    zs = np.linalg.solve(np.eye(4) - W, (X @ U.T).T).T
    assert np.abs(z_star.detach().numpy() - zs).max() < 1e-8
    if grad == "phantom":  # 5 plain steps (tau 1) from z*: sum_{j<5} W^j
        powers = [np.linalg.matrix_power(W, j) for j in range(5)]
        gu = sum((C @ p).T @ X for p in powers)
        gw = sum((C @ p).T @ zs for p in powers)
    else:  # (I - W)^{-T} c
        g = np.linalg.solve((np.eye(4) - W).T, C.T).T
        gu, gw = g.T @ X, g.T @ zs
    assert np.abs(u.grad.numpy() - gu).max() < 1e-7
    assert np.abs(w.grad.numpy() - gw).max() < 1e-7


def test_deq_ift_gradients_reach_conv_and_norm_and_match_finite_differences():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    norm = torch.nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    c = torch.randn(2, 4, 4, 4, dtype=F64)

    def f(z):
        return torch.tanh(norm(conv(z)) + x)

    def make():
        return wt.DEQ(f_solver="anderson", f_max_iter=150, f_tol=1e-12, b_solver="anderson",
                      b_max_iter=150, b_tol=1e-12, grad="ift", stop_mode="abs")

    def loss() -> float:
        with torch.no_grad():
            return float((make()(f, torch.zeros_like(x))[0] * c).sum())

    z, stats = make()(f, torch.zeros_like(x))
    assert bool(stats.converged.all())
    (z * c).sum().backward()
    params = [conv.weight, conv.bias, norm.weight, norm.bias]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    for p, idx in ((conv.weight, (0, 1, 1, 1)), (norm.bias, (2,))):
        with torch.no_grad():
            p[idx] += 1e-6
        up = loss()
        with torch.no_grad():
            p[idx] -= 2e-6
        down = loss()
        with torch.no_grad():
            p[idx] += 1e-6
        assert abs((up - down) / 2e-6 - float(p.grad[idx])) < 1e-6


def test_deq_phantom_steps_and_tau_against_the_closed_form():
    # 3 damped steps from z*: z <- M z + tau U x, M = (1 - tau) I + tau W:
    # dL/dU = sum_{j<3} tau (c M^j)^T x
    w, u, x, c = _linear_deq_problem()
    deq = wt.DEQ(grad="phantom", phantom_steps=3, tau=0.5, f_tol=1e-11, f_max_iter=200)
    z, _ = deq(lambda z: z @ w.T + x @ u.T, torch.zeros(3, 4, dtype=F64))
    (z * c).sum().backward()
    W, X, C = w.detach().numpy(), x.numpy(), c.numpy()
    m = 0.5 * np.eye(4) + 0.5 * W
    gu = sum(0.5 * (C @ np.linalg.matrix_power(m, j)).T @ X for j in range(3))
    assert np.abs(u.grad.numpy() - gu).max() < 1e-9


@pytest.mark.parametrize("bad, words", [
    ({"grad": "nope"}, ["ift", "phantom", "unroll"]),
    ({"f_solver": "nope"}, ["anderson", "broyden", "fixed_point"]),
    ({"b_solver": "nope"}, ["anderson", "broyden", "fixed_point"]),
    ({"gradient": "ift"}, ["grad", "f_solver"]),
])
def test_deq_bad_settings_raise_value_error_naming_the_choices(bad, words):
    with pytest.raises(ValueError) as e:
        wt.DEQ(**bad)
    assert all(w in str(e.value) for w in words)


# ---------------------------------------------------------------- masks


def test_make_masks_as_written_random_exact_counts_distinct_and_seeded():
    masks = wt.make_masks((16, 9), k=4, density=0.5, kind="random", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (4, 16, 9)
    assert masks.sum(dim=(1, 2)).tolist() == [72] * 4  # 0.5 * 144
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 4
    again = wt.make_masks((16, 9), k=4, density=0.5, kind="random", seed=0)
    other = wt.make_masks((16, 9), k=4, density=0.5, kind="random", seed=1)
    assert torch.equal(masks, again) and not torch.equal(masks, other)


def test_make_masks_bernoulli_rate_within_a_binomial_bound():
    masks = wt.make_masks((64, 64), k=4, density=0.3, kind="bernoulli", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (4, 64, 64)
    n = masks.numel()
    sd = math.sqrt(0.3 * 0.7 / n)
    assert abs(masks.float().mean().item() - 0.3) < 5 * sd


@pytest.mark.parametrize("shape, density, n_per_group", [
    ((6, 8), 0.5, 2),           # default 2:4 at density 0.5
    ((4, 2, 2, 2), 0.25, 1),    # conv (out, in, kh, kw): flattened input dim 8 -> 1:4
    ((4, 8), 0.75, 3),
])
def test_make_masks_nm_along_the_flattened_input_dimension(shape, density, n_per_group):
    masks = wt.make_masks(shape, k=3, density=density, kind="nm", seed=0)
    assert masks.dtype == torch.bool and masks.shape == (3, *shape)
    rows = masks.reshape(3, shape[0], -1)  # (k, out, in * kh * kw)
    groups = rows.reshape(3, shape[0], -1, 4).sum(-1)  # M = 4 consecutive entries
    assert groups.unique().tolist() == [n_per_group]


def test_make_masks_bad_kind_and_density_raise_value_error_naming_the_choices():
    with pytest.raises(ValueError) as e:
        wt.make_masks((4, 8), kind="nope")
    assert all(k in str(e.value) for k in ("random", "bernoulli", "nm"))
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match="density"):
            wt.make_masks((4, 8), density=density)


# ---------------------------------------------------------------- models


def test_create_model_as_written_forward_masks_and_seed():
    model = wt.create_model("wt_s", num_classes=10, in_chans=1, depth=8, width=32,
                            mask_k=8, mask_density=0.5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    masks = {k: v for k, v in model.state_dict().items() if k.endswith("_masks")}
    assert masks and all(v.dtype == torch.bool and v.shape[0] == 8 for v in masks.values())
    # random kind: exactly half of each mask's entries
    for v in masks.values():
        per = v[0].numel()
        assert v.reshape(8, -1).sum(1).tolist() == [per // 2] * 8
    # mask_seed defaults to 0: a second build holds the same masks; another seed other masks
    again = wt.create_model("wt_s", num_classes=10, in_chans=1, depth=8, width=32,
                            mask_k=8, mask_density=0.5, mask_seed=0)
    other = wt.create_model("wt_s", num_classes=10, in_chans=1, depth=8, width=32,
                            mask_k=8, mask_density=0.5, mask_seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in masks.items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in masks.items())
    # masks are restored by load_state_dict
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in masks.items())


def test_masked_unrolled_forward_matches_a_functional_oracle():
    # iteration t uses mask t mod k on both convolutions of the shared cell, z_0 = 0
    model = wt.create_model("test_wt", in_chans=1, mask_k=2, depth=3, norm="none").eval()
    sd = model.state_dict()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    h = F.relu(F.conv2d(x, sd["stem.0.weight"], padding=1))
    w1, w2 = sd["cores.0.cell.conv1.weight"], sd["cores.0.cell.conv2.weight"]
    m1, m2 = sd["cores.0.cell.conv1.weight_masks"], sd["cores.0.cell.conv2.weight_masks"]
    assert not torch.equal(m1[0], m1[1])
    z = torch.zeros_like(h)
    for t in range(3):
        y = F.relu(F.conv2d(z, w1 * m1[t % 2], padding=1))
        z = F.relu(z + h + F.conv2d(y, w2 * m2[t % 2], padding=1))
    logits = z.mean((2, 3)) @ sd["head.weight"].T + sd["head.bias"]
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)


def test_masked_deq_core_solves_the_k_periodic_composite_by_a_functional_oracle():
    # with K masks the DEQ core's fixed point is that of f_1 o f_0 (one step = K cells)
    torch.manual_seed(0)
    model = wt.create_model("test_deq", in_chans=1, mask_k=2, f_max_iter=100, f_tol=1e-6,
                            f_solver="broyden").eval()
    sd = model.state_dict()
    x = torch.randn(2, 1, 8, 8)
    seen = {}
    model.cores[0].register_forward_hook(lambda mod, args, out: seen.setdefault("z", out))
    with torch.no_grad():
        model(x)
    assert model.core_stats()["converged"] == 1.0

    def gn(t, name):
        return F.group_norm(t, 4, sd[name + ".weight"], sd[name + ".bias"])

    h = F.relu(gn(F.conv2d(x, sd["stem.0.weight"], padding=1), "stem.1"))
    c = "cores.0.cell."

    def cell(z, t):
        y = F.relu(gn(F.conv2d(z, sd[c + "conv1.weight"] * sd[c + "conv1.weight_masks"][t],
                               padding=1), c + "norm1"))
        y = gn(F.conv2d(y, sd[c + "conv2.weight"] * sd[c + "conv2.weight_masks"][t],
                        padding=1), c + "norm2")
        return gn(F.relu(z + h + y), c + "norm3")

    z = seen["z"]
    composite = cell(cell(z, 0), 1)
    rel = (composite - z).flatten(1).norm(dim=1) / composite.flatten(1).norm(dim=1)
    assert bool((rel < 1e-5).all())
    other = cell(cell(z, 1), 0)  # the other order is not at its fixed point
    assert bool(((other - z).flatten(1).norm(dim=1) > 1e-2).all())


def test_ode_core_with_euler_steps_of_one_is_the_unrolled_masked_network():
    # dz/dt = f_t(z, x) - z, Euler step T / depth = 1: z <- f_t(z, x), as the unrolled network
    # (whose forward the functional oracle above checks)
    torch.manual_seed(0)
    ode = wt.create_model("test_ode", in_chans=1, mask_k=2, depth=3, ode_method="euler",
                          ode_T=3.0).eval()
    tied = wt.create_model("test_wt", in_chans=1, mask_k=2, depth=3).eval()
    tied.load_state_dict(ode.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ode(x), tied(x), atol=1e-5)
    assert ode.core_stats()["nfe"] == 3.0


def test_untied_core_with_copies_of_the_tied_cell_computes_the_tied_network():
    torch.manual_seed(0)
    tied = wt.create_model("test_wt", in_chans=1, mask_k=2, depth=3).eval()
    untied = wt.create_model("test_untied", in_chans=1, mask_k=2, depth=3).eval()
    sd = tied.state_dict()
    mapped = {}
    for key, value in sd.items():
        if key.startswith("cores.0.cell."):
            for i in range(3):
                mapped[key.replace("cores.0.cell.", f"cores.0.cells.{i}.")] = value
        else:
            mapped[key] = value
    untied.load_state_dict(mapped)  # strict: the same layout, three cells
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(untied(x), tied(x), atol=1e-5)


def test_parameter_counts_by_hand_tied_masks_free_untied_d_copies():
    # test_wt, in_chans=1, width 8, GroupNorm: stem 1*8*9 + 2*8 = 88; cell 2 * 8*8*9 + 3 * 2*8
    # = 1200; head 8*10 + 10 = 90
    def count(name, **kw):
        return sum(p.numel() for p in wt.create_model(name, in_chans=1, **kw).parameters())
    assert count("test_wt") == 88 + 1200 + 90
    assert count("test_wt", mask_k=2) == 88 + 1200 + 90  # distinct masks: zero extra params
    assert count("test_untied", depth=3) == 88 + 3 * 1200 + 90


@pytest.mark.parametrize("name", ["test_wt", "test_deq", "test_ode", "test_untied"])
def test_every_family_builds_with_the_documented_keywords(name):
    model = wt.create_model(name, num_classes=7, in_chans=1, depth=2, width=8, mask_k=2,
                            mask_density=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert any(v.dtype == torch.bool for v in model.state_dict().values())


@pytest.mark.parametrize("name, kw, words", [
    ("nope", {}, ["wt_s", "deq_s", "ode_s", "untied_s"]),
    ("wt_s", {"mask_density": 2.0}, ["mask_density"]),
    ("wt_s", {"no_such_field": 1}, ["no_such_field", "mask_k"]),
    ("wt_s", {"mask_kind": "nope"}, ["random", "bernoulli", "nm"]),
])
def test_create_model_bad_arguments_raise_value_error_naming_the_choices(name, kw, words):
    with pytest.raises(ValueError) as e:
        wt.create_model(name, **kw)
    assert all(w in str(e.value) for w in words)


# ---------------------------------------------------------------- CapaBoost, data


@pytest.mark.parametrize("copies, rank", [(1, 2), (4, 8), (16, 16)])
def test_capaboost_lora_rank_grows_with_copies_at_equal_parameters(copies, rank):
    # the update is sum_i (M_B^i * B)(M_A^i * A): rank <= min(d r, 16), parameters 2 * 16 * 2
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).double()
    wt.add_lora(net, rank=2, copies=copies, density=0.5, seed=0, targets=torch.nn.Linear)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_()
        eye = torch.eye(16, dtype=F64)
        delta = (net(eye) - net[0].base(eye)).T  # (out, in)
        a, b = net[0].lora_A, net[0].lora_B
        ma, mb = net[0].mask_A, net[0].mask_B
        oracle = sum((b * mb[i]) @ (a * ma[i]) for i in range(copies))
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 64
    assert ma.shape == (copies, 2, 16) and ma.dtype == torch.bool
    assert torch.allclose(delta, oracle, atol=1e-12)
    assert int(torch.linalg.matrix_rank(delta)) == rank


def _idx(path: Path, array: np.ndarray) -> None:
    code = {1: 0x0801, 3: 0x0803}[array.ndim]
    header = code.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files_in_the_real_format(tmp_path):
    # one bright pixel per image at a known place, labels 0..n-1 mod 10
    def images(n):
        a = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            a[i, i % 28, (3 * i) % 28] = 255
        return a
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte", images(12))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", images(5))
    _idx(raw / "t10k-labels-idx1-ubyte", (np.arange(5) + 3) % 10)
    train, test, info = wt.get_datasets("mnist", data_dir=tmp_path, augment=False)
    assert (len(train), len(test)) == (12, 5)
    assert info["num_classes"] == 10 and info["in_chans"] == 1 and info["image_size"] == 28
    for ds, n, off in ((train, 12, 0), (test, 5, 3)):
        for i in range(n):
            img, label = ds[i]
            assert img.shape == (1, 28, 28) and label == (i + off) % 10
            flat = int(img.flatten().argmax())
            assert divmod(flat, 28) == (i % 28, (3 * i) % 28)


# ---------------------------------------------------------------- command line

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
               "images_per_s", "peak_mem_mb"}
SOLVER_KEYS = {"nstep", "rel_residual", "rel_residual_max", "converged"}


# 40 test images in batches of 16, 16, 8: a mean of batch means would differ from the mean
# over samples; f_tol 0.03 lets some test solves converge and not others
TRAIN_ARGS = ["--model", "test_deq", "--dataset", "digits", "--epochs", "1", "--threads", "1",
              "--train-size", "64", "--test-size", "40", "--test-batch-size", "16",
              "--f-tol", "0.03", "--progress", "none", "--width", "8", "--mask-k", "2",
              "--mask-density", "0.5"]


@pytest.fixture(scope="module")
def deq_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    res = _run(["-m", "wtmodels.train", *TRAIN_ARGS, "--out", "runs/a"], cwd=base, timeout=180)
    assert res.returncode == 0, res.stderr
    return base / "runs" / "a"


def test_train_cli_run_directory_files_and_metrics(deq_run):
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (deq_run / name).is_file(), name
    cfg = json.loads((deq_run / "config.json").read_text())
    assert json.dumps(cfg).count('"seed": 0') >= 1  # --seed defaults to 0
    rows = [json.loads(line) for line in (deq_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    row = rows[0]
    assert METRIC_KEYS | SOLVER_KEYS <= set(row), sorted(METRIC_KEYS | SOLVER_KEYS - set(row))
    # accuracies are counts over the 64 / 40 images
    assert abs(row["train_acc"] * 64 - round(row["train_acc"] * 64)) < 1e-6
    assert abs(row["test_acc"] * 40 - round(row["test_acc"] * 40)) < 1e-6
    assert 0.0 <= row["converged"] <= 1.0
    assert 1 <= row["nstep"] <= wt.get_config("test_deq").f_max_iter
    assert 0.0 <= row["rel_residual"] <= row["rel_residual_max"]
    assert math.isclose(row["images_per_s"], 64 / row["epoch_time_s"], rel_tol=0.05)
    # the model flags reach the model: hand counts (see test_parameter_counts_by_hand), masks
    # of density 0.5 remove half of the 2 * 576 cell weights per iteration
    mc = cfg["model_config"]
    assert (mc["width"], mc["mask_k"], mc["mask_density"], mc["mask_seed"]) == (8, 2, 0.5, 0)
    info = json.loads((deq_run / "model_info.json").read_text())
    assert info["params"] == 88 + 1200 + 90
    assert info["nonzero_params_per_iter"] == 88 + 1200 + 90 - 576
    # checkpoint masks are the ones a fresh build with the same arguments makes
    ckpt = torch.load(deq_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    fresh = wt.create_model("test_deq", in_chans=1, width=8, mask_k=2,
                            mask_density=0.5).state_dict()
    masks = [k for k, v in fresh.items() if v.dtype == torch.bool]
    assert masks and all(torch.equal(ckpt["model"][k], fresh[k]) for k in masks)


def test_train_cli_test_metrics_are_per_sample_over_the_test_set(deq_run):
    """Re-evaluate the checkpoint one image at a time: test_acc is the share correct, the
    solver metrics the per-sample mean (max) over the 40 test solves."""
    cfg = json.loads((deq_run / "config.json").read_text())
    row = json.loads((deq_run / "metrics.jsonl").read_text().splitlines()[-1])
    model = wt.create_model("test_deq", **cfg["model_config"])
    model.load_state_dict(torch.load(deq_run / "checkpoint.pt", map_location="cpu",
                                     weights_only=False)["model"])
    model.eval()
    _, test, _ = wt.get_datasets("digits", train_size=64, test_size=40,
                                 seed=cfg["train"]["data_seed"], augment=False)
    correct, per = 0, []
    with torch.no_grad():
        for i in range(len(test)):
            image, label = test[i]
            correct += int(model(image[None]).argmax(1).item() == label)
            per.append(model.core_stats())
    assert len(test) == 40
    assert row["test_acc"] == pytest.approx(correct / 40, abs=1e-9)
    for key in ("nstep", "rel_residual", "converged"):
        assert row[key] == pytest.approx(np.mean([s[key] for s in per]), rel=1e-4, abs=1e-6)
    assert row["rel_residual_max"] == pytest.approx(max(s["rel_residual_max"] for s in per),
                                                    rel=1e-4)


def test_train_cli_seed_is_used(deq_run):
    from wtmodels import train

    other = deq_run.parent / "seed1"
    assert train.main([*TRAIN_ARGS, "--out", str(other), "--seed", "1"]) == 0
    assert json.loads((other / "config.json").read_text())["train"]["seed"] == 1
    a = torch.load(deq_run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(other / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert not torch.equal(a["stem.0.weight"], b["stem.0.weight"])
    masks = [k for k, v in a.items() if v.dtype == torch.bool]  # masks follow mask_seed only
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)


def test_train_cli_resume_of_a_finished_run_trains_nothing(deq_run):
    from wtmodels import train

    before = (deq_run / "metrics.jsonl").read_text()
    assert train.main([*TRAIN_ARGS, "--out", str(deq_run), "--seed", "0", "--resume"]) == 0
    assert (deq_run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args, words", [
    (["--model", "nope", "--dataset", "digits"], ["wt_s", "test_wt"]),
    (["--model", "test_wt", "--dataset", "nope"], ["digits", "mnist"]),
    (["--model", "test_wt", "--dataset", "digits", "--grad", "nope"], ["ift", "phantom"]),
])
def test_train_cli_bad_names_one_stderr_line_exit_2(tmp_path, args, words, capsys):
    # in-process (main returns the exit status); deq_run and the sweep test run the command
    # line in a separate process
    from wtmodels import train

    assert train.main([*args, "--epochs", "1", "--out", str(tmp_path / "r"),
                       "--threads", "1"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


RESULT_COLUMNS = ["run_id", "model", "dataset", "depth", "width", "mask_k", "mask_density",
                  "seed", "test_acc", "best_test_acc", "epoch_time_s", "images_per_s",
                  "peak_mem_mb", "params", "git_sha", "torch_version", "device"]


def test_sweep_cli_results_csv_columns_and_values(tmp_path):
    out = tmp_path / "results" / "quick"  # --out relative, as DESIGN spells it
    res = _run(["-m", "benchmarks.run", "quick", "--out", "results/quick", "--smoke",
                "--seeds", "0", "--jobs", "1", "--threads", "1", "--only", "wt_d2", "--no-plots",
                "--no-extrapolation"], cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    row = rows[0]
    assert set(RESULT_COLUMNS) <= set(row), sorted(set(RESULT_COLUMNS) - set(row))
    run_dir = out / "runs" / row["run_id"] if (out / "runs").is_dir() else out / row["run_id"]
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.json").is_file()
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert float(row["test_acc"]) == pytest.approx(epochs[-1]["test_acc"])
    assert float(row["best_test_acc"]) == pytest.approx(max(e["test_acc"] for e in epochs))
    assert row["dataset"] == "digits" and row["seed"] == "0" and row["mask_k"] == "0"
    auto_device = "cuda:0" if torch.cuda.is_available() else "cpu"  # the sweep's default
    assert int(row["depth"]) == 2 and row["device"] == auto_device
    assert row["torch_version"] == torch.__version__ and row["git_sha"]
    # smoke size of wt_s: width 8 on 1-channel digits, hand count as above
    assert int(row["width"]) == 8 and int(row["params"]) == 88 + 1200 + 90


@pytest.mark.parametrize("args, words", [
    (["nope", "--out", "o"], ["quick"]),
    (["quick", "--out", "o", "--jobs", "0"], ["jobs"]),
])
def test_sweep_cli_bad_input_one_stderr_line_exit_2(tmp_path, args, words):
    res = _run(["-m", "benchmarks.run", *args], cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "o").exists()
