"""The ODE core, as a researcher comparing Neural ODEs with weight-tied nets:
hand-written Runge-Kutta loops on a nonlinear masked cell (which mask at which stage), the
multistep methods restarting at each mask change, torchdiffeq called directly, scipy's
solve_ivp with variational dropout held fixed, gradients against finite differences, options a
method never reads, and what the adjoint backward pass counts."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch import nn
from torchdiffeq import odeint

from tests.models.test_ode_vs_scipy import Counted
from wtmodels.cells import ConvCell
from wtmodels.masks import apply_masks, mask_index
from wtmodels.ode import ODECore

torch.set_num_threads(1)
DT = torch.float64
N = 4
X = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)``: nonlinear, so that different 4-stage RK methods differ."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N, N, bias=False)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def _cell(k=0, schedule="cyclic", seed=0):
    torch.manual_seed(seed)
    cell = TanhCell()
    with torch.no_grad():
        cell.lin.weight.mul_(3.0)  # strong enough coupling for visible method differences
    if k:
        cell = apply_masks(cell, k=k, density=0.5, schedule=schedule, types=(nn.Linear,))
    return cell.double()


def _rhs(cell, i):
    """dz/dt with mask ``i`` written out by hand: ``tanh((W * M_i) z + x) - z``."""
    W = cell.lin.weight.detach()
    if i is not None:
        W = W * cell.lin.weight_masks[i]
    return lambda z: torch.tanh(z @ W.T + X) - z


def _euler(f, z, h):
    return z + h * f(z)


def _midpoint(f, z, h):
    return z + h * f(z + h / 2 * f(z))


def _heun3(f, z, h):
    k1 = f(z)
    k2 = f(z + h / 3 * k1)
    k3 = f(z + 2 * h / 3 * k2)
    return z + h * (k1 + 3 * k3) / 4


def _rk38(f, z, h):  # Kutta's 3/8 rule
    k1 = f(z)
    k2 = f(z + h * k1 / 3)
    k3 = f(z + h * (k2 - k1 / 3))
    k4 = f(z + h * (k1 - k2 + k3))
    return z + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8


def _rk4_classical(f, z, h):
    k1 = f(z)
    k2 = f(z + h / 2 * k1)
    k3 = f(z + h / 2 * k2)
    k4 = f(z + h * k3)
    return z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6


def _loop(step, cell, k, schedule, steps, h):
    z = torch.zeros_like(X)
    for t in range(steps):
        z = step(_rhs(cell, mask_index(t, steps, k, schedule) if k else None), z, h)
    return z


@pytest.mark.parametrize("method, step, evals", [("euler", _euler, 1), ("midpoint", _midpoint, 2),
                                                 ("heun3", _heun3, 3), ("rk4", _rk38, 4)])
@pytest.mark.parametrize("schedule", ["cyclic", "block"])
def test_fixed_grid_steps_are_hand_written_rk_with_the_segments_mask_at_every_stage(
        method, step, evals, schedule):
    # every stage of step t, including the one at the segment's end time, uses mask
    # mask_index(t); set_depth(6) of a depth-4 core takes 6 steps of T / 4
    cell, T = _cell(k=3, schedule=schedule), 2.0
    core = ODECore(cell, 4, T=T, method=method)
    for steps in (4, 6):
        core.set_depth(steps)
        with torch.no_grad():
            z = core(X)
        assert (z - _loop(step, cell, 3, schedule, steps, T / 4)).abs().max() < 1e-13
        assert core.last_stats["nfe"] == evals * steps


def test_rk4_is_kuttas_three_eighths_rule_not_the_classical_rk4():
    # torchdiffeq's "rk4" is the 3/8 rule; both are 4th order, a nonlinear cell tells them apart
    cell = _cell()
    with torch.no_grad():
        z = ODECore(cell, 3, T=3.0, method="rk4")(X)
    assert (z - _loop(_rk38, cell, 0, "cyclic", 3, 1.0)).abs().max() < 1e-14
    assert (z - _loop(_rk4_classical, cell, 0, "cyclic", 3, 1.0)).abs().max() > 1e-5


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
def test_multistep_methods_restart_with_rk4_at_every_mask_change(method):
    # a segment with a new mask is a new integration (the history of f under another mask
    # would be wrong): with one step per segment (cyclic, K = D) each step is torchdiffeq's
    # RK4 start-up step (3/8 rule, 4 evaluations) and the tolerances are never read
    cell, T, D = _cell(k=4), 2.0, 4
    ref = _loop(_rk38, cell, 4, "cyclic", D, T / D)
    for tol in (1e-2, 1e-10):
        core = ODECore(cell, D, T=T, method=method, rtol=tol, atol=tol)
        with torch.no_grad():
            z = core(X)
        assert (z - ref).abs().max() < 1e-13
        assert core.last_stats["nfe"] == 4 * D


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun", "dopri8"])
def test_one_sample_without_masks_is_torchdiffeq_called_directly(method):
    # with B = 1 the per-sample error norm is torchdiffeq's own RMS norm: the core is a plain
    # odeint call over [0, T] whatever the depth (the depth only cuts mask segments)
    cell, x = _cell(), X[:1]
    calls = [0]

    def func(t, z):
        calls[0] += 1
        return cell(z, x) - z

    with torch.no_grad():
        ref = odeint(func, torch.zeros_like(x), torch.tensor([0.0, 2.0], dtype=DT),
                     method=method, rtol=1e-4, atol=1e-5)[-1]
        for depth in (1, 5):
            core = ODECore(cell, depth, T=2.0, method=method, rtol=1e-4, atol=1e-5)
            assert torch.equal(core(x), ref)
            assert core.last_stats["nfe"] == calls[0]


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "heun2", "explicit_adams"])
def test_tolerances_given_to_a_fixed_grid_method_change_nothing(method):
    # documented (fields_without_effect): a fixed-grid method takes D steps of T / D
    cell = _cell(k=2)
    with torch.no_grad():
        a = ODECore(cell, 5, T=2.0, method=method, rtol=1e-1, atol=1e-1)(X)
        b = ODECore(cell, 5, T=2.0, method=method, rtol=1e-12, atol=1e-12)(X)
    assert torch.equal(a, b)


def _solve_ivp(func, shape, T):
    sol = solve_ivp(lambda t, y: func(torch.from_numpy(y).reshape(shape)).reshape(-1).numpy(),
                    (0.0, T), np.zeros(int(np.prod(shape))), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(shape))


def test_variational_dropout_is_one_fixed_mask_for_the_whole_adaptive_integration():
    # train mode: the dropout mask drawn at the start of the forward pass stays for every
    # evaluation, so dopri5 integrates one smooth ODE (scipy with that mask agrees); eval mode
    # integrates the cell without dropout
    torch.manual_seed(0)
    cell = ConvCell(4, norm="none", dropout=0.5).double()
    x = torch.randn(2, 4, 3, 3, dtype=DT)
    core = ODECore(cell, 2, T=1.5, method="dopri5", rtol=1e-10, atol=1e-10)
    for train in (True, False):
        core.train(train)
        with torch.no_grad():
            z = core(x)  # the mask stays on the dropout module after the pass
            ref = _solve_ivp(lambda y: cell(y, x) - y, x.shape, 1.5)
        assert (z - ref).abs().max() < 1e-6  # ReLU kinks: 2e-8 measured
    core.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert (core(x) - z).abs().max() > 1e-3  # a fresh mask per forward pass


def test_fixed_grid_backprop_with_masks_is_the_derivative_of_the_discrete_map():
    # direct backprop through rk4 steps = finite differences of the same steps (float64)
    cell = _cell(k=3)
    core = ODECore(cell, 3, T=1.5, method="rk4")
    x = X.clone().requires_grad_(True)
    (core(x) ** 2).sum().backward()
    w, eps = cell.lin.weight, 1e-6
    with torch.no_grad():
        for i, j in [(0, 1), (2, 2), (3, 0)]:
            w[i, j] += eps
            up = (core(X) ** 2).sum()
            w[i, j] -= 2 * eps
            down = (core(X) ** 2).sum()
            w[i, j] += eps
            assert abs(w.grad[i, j] - (up - down) / (2 * eps)) < 1e-8


def test_adjoint_with_masks_on_a_nonlinear_cell_matches_finite_differences():
    cell = _cell(k=2)
    core = ODECore(cell, 4, T=2.0, method="dopri5", rtol=1e-11, atol=1e-11, adjoint=True)
    x = X.clone().requires_grad_(True)
    (core(x) ** 2).sum().backward()
    w, eps = cell.lin.weight, 1e-6
    with torch.no_grad():
        for i, j in [(0, 0), (1, 3), (3, 2)]:
            w[i, j] += eps
            up = (core(X) ** 2).sum()
            w[i, j] -= 2 * eps
            down = (core(X) ** 2).sum()
            w[i, j] += eps
            assert abs(w.grad[i, j] - (up - down) / (2 * eps)) < 1e-7
        xp, xm = X.clone(), X.clone()
        xp[1, 2] += eps
        xm[1, 2] -= eps
        fd = ((core(xp) ** 2).sum() - (core(xm) ** 2).sum()) / (2 * eps)
        assert abs(x.grad[1, 2] - fd) < 1e-7


def test_nfe_counts_the_forward_pass_only_not_the_adjoint_backward():
    counted = Counted(_cell(k=2))
    core = ODECore(counted, 2, T=1.0, method="dopri5", rtol=1e-6, atol=1e-6, adjoint=True)
    core(X.clone().requires_grad_(True)).sum().backward()
    forward_calls = core.last_stats["nfe"]
    assert 0 < forward_calls < counted.calls  # the backward re-evaluates f, uncounted
    assert core.last_stats == {"nfe": forward_calls, "cell_evals": forward_calls}


@pytest.mark.parametrize("method", ["RK4", "Dopri5", "scipy_solver", "", None])
def test_unknown_methods_name_the_valid_ones(method):
    with pytest.raises(ValueError, match="valid methods: .*dopri5.*rk4"):
        ODECore(_cell(), 2, method=method)
