"""The ODE core against independent answers: scipy's solve_ivp (DOP853, float64,
tolerance 1e-13) on the core's own dynamics ``f(z, x) - z`` wrapped as a numpy function, the
convergence order of every fixed-grid method, a counter wrapped around the cell, direct
backprop vs the adjoint, and the validation of settings."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch import nn

from wtmodels.cells import ConvCell
from wtmodels.ode import ODE_METHODS, ODECore, is_fixed_grid, per_sample_rms_norm


class SmoothCell(nn.Module):
    """A smooth cell (tanh, no ReLU kinks), so that tolerances bound the error cleanly."""

    def __init__(self, width: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(width, width, 3, padding=1, dtype=torch.float64)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


class Counted(nn.Module):
    """Counts every call of the wrapped cell."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.calls = cell, 0

    def forward(self, z, x):
        self.calls += 1
        return self.cell(z, x)


CELL = SmoothCell()
X = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def reference(end_time: float, cell=CELL, x=X) -> np.ndarray:
    """z(end_time) of dz/dt = cell(z, x) - z, z(0) = 0, by scipy in float64."""
    def rhs(t, y):
        z = torch.from_numpy(y).reshape(x.shape)
        with torch.no_grad():
            return (cell(z, x) - z).reshape(-1).numpy()
    sol = solve_ivp(rhs, (0.0, end_time), np.zeros(x.numel()), method="DOP853",
                    rtol=1e-13, atol=1e-13)
    assert sol.success
    return sol.y[:, -1].reshape(x.shape)


def error(core: ODECore, end_time: float, x=X) -> float:
    with torch.no_grad():
        z = core(x)
    return float(np.abs(z.numpy() - reference(end_time, core.cell, x)).max())


FIXED_ORDER = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4,
               "explicit_adams": 4, "implicit_adams": 4, "fixed_adams": 4}


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", sorted(FIXED_ORDER))
def test_fixed_grid_methods_converge_at_their_order_with_steps_t_over_d(method):
    # D steps of T / D on [0, T]: the error against scipy must fall as h**order when D doubles
    # (explicit_adams with torchdiffeq's default max_order 12 grew 0.03 -> 2.0 -> 1072)
    assert is_fixed_grid(method)
    order, T = FIXED_ORDER[method], 2.0
    errs = [error(ODECore(CELL, D, T=T, method=method, rtol=1e-12, atol=1e-12), T)
            for D in (8, 16, 32)]
    assert errs[2] < 0.05 * (T / 32) ** order * 100, errs
    for coarse, fine in zip(errs, errs[1:]):
        assert coarse / fine > 2 ** order * 0.7, errs


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams"])
def test_fixed_grid_depth_32_stays_bounded_at_ode_s_end_time(method):
    # ode_s's end time T = 3 with a deep grid: the ODE's solution is bounded by 1 (tanh)
    core = ODECore(CELL, 32, T=3.0, method=method)
    with torch.no_grad():
        assert core(X).abs().max() < 1.0


# torchdiffeq's dopri8 ends ~100x its tolerance off (scipy's DOP853 ~0.05x; the default norm too)
@pytest.mark.parametrize("method, factor", [("dopri5", 5.0), ("dopri8", 200.0),
                                            ("adaptive_heun", 5.0), ("bosh3", 500.0),
                                            ("fehlberg2", 1000.0)])
def test_adaptive_error_scales_with_the_tolerance(method, factor):
    T = 2.0
    for tol in (1e-5, 1e-8):
        err = error(ODECore(CELL, 4, T=T, method=method, rtol=tol, atol=tol), T)
        assert err < factor * tol, (tol, err)


def test_set_depth_integrates_to_t_times_d_prime_over_d():
    core = ODECore(CELL, 4, T=2.0, method="dopri5", rtol=1e-10, atol=1e-10)
    core.set_depth(6)
    assert core.end_time == 3.0
    assert error(core, 3.0) < 1e-8
    core.set_depth(1)
    assert error(core, 0.5) < 1e-8
    core.eval()  # eval mode integrates the same interval
    assert error(core, 0.5) < 1e-8


def test_float32_within_its_tolerance_of_the_float64_reference():
    cell32 = SmoothCell().float()
    core = ODECore(cell32, 3, T=2.0, method="dopri5", rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        z = core(X.float())
    assert z.dtype == torch.float32
    assert np.abs(z.double().numpy() - reference(2.0)).max() < 1e-4


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", ODE_METHODS)
def test_nfe_equals_a_counter_around_the_cell(method):
    counted = Counted(CELL)
    core = ODECore(counted, 3, T=1.0, method=method, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        core(X)
    assert counted.calls > 0
    assert core.last_stats == {"nfe": float(counted.calls), "cell_evals": float(counted.calls)}


@pytest.mark.parametrize("method, rel", [("dopri5", 1e-7), ("dopri8", 1e-6)])
def test_adjoint_gradients_of_input_and_parameters_match_direct_backprop(method, rel):
    weights = torch.randn(X.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for adjoint in (False, True):
        x = X.clone().requires_grad_()
        z = ODECore(CELL, 3, T=2.0, method=method, rtol=1e-11, atol=1e-11, adjoint=adjoint)(x)
        grads.append(torch.autograd.grad((z * weights).sum(), [x, *CELL.parameters()]))
    for direct, adj in zip(*grads):
        assert (direct - adj).abs().max() <= rel * direct.abs().max()


def test_fixed_grid_adjoint_differs_from_backprop_by_the_discretisation_error():
    # the adjoint integrates the continuous adjoint ODE on the same grid: O(h**4) for rk4
    weights = torch.randn(X.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gaps = []
    for depth in (8, 16):
        grads = []
        for adjoint in (False, True):
            x = X.clone().requires_grad_()
            z = ODECore(CELL, depth, T=2.0, method="rk4", adjoint=adjoint)(x)
            grads.append(torch.autograd.grad((z * weights).sum(), [x, *CELL.parameters()]))
        gaps.append(max(float((a - b).norm() / a.norm()) for a, b in zip(*grads)))
    assert gaps[1] < 1e-4 and gaps[0] / gaps[1] > 16 * 0.6, gaps


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_empty_batch_with_the_adjoint(method):
    cell = ConvCell(4, norm="none")
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    z = ODECore(cell, 2, method=method, adjoint=True)(x)
    assert z.shape == x.shape
    z.sum().backward()  # raised "setStorage: sizes [] ..." inside torchdiffeq
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name, value", [("T", -1.0), ("T", 0.0), ("T", math.nan),
                                         ("T", math.inf), ("rtol", 0.0), ("atol", -1e-3),
                                         ("rtol", math.nan), ("adjoint", "no")])
def test_settings_changed_after_construction_are_checked_on_the_next_call(name, value):
    core = ODECore(ConvCell(4, norm="none"), 2, method="dopri5")
    setattr(core, name, value)  # T = -1 integrated backwards in time without a word
    with pytest.raises(ValueError, match=f"ode_{name}"):
        core(torch.randn(1, 4, 3, 3))


def test_bad_method_and_tolerances_name_the_valid_choices():
    with pytest.raises(ValueError, match="dopri5.*rk4|rk4.*dopri5"):
        ODECore(CELL, 2, method="RK4")
    core = ODECore(CELL, 2)
    core.method = "leapfrog"
    with pytest.raises(ValueError, match="valid methods"):
        core(X)
    for value in (0, -1.0, math.inf, math.nan, "1e-3", True):
        with pytest.raises(ValueError, match="ode_rtol.*> 0"):
            ODECore(CELL, 2, rtol=value)


def test_per_sample_norm_of_a_float16_error_does_not_overflow():
    # 300**2 overflows float16 (max 65504): the norm was inf, every step was rejected and
    # dopri5 ended in torchdiffeq's "underflow in dt" (fp16 autocast on CUDA, ode_m)
    big = torch.full((2, 4), 300.0, dtype=torch.float16)
    big[1] = 100.0
    assert float(per_sample_rms_norm(big)) == 300.0
    assert float(per_sample_rms_norm(torch.tensor([3e4, 4e4], dtype=torch.bfloat16))) == \
        pytest.approx(math.sqrt((3e4 ** 2 + 4e4 ** 2) / 2), rel=1e-2)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_float16_adaptive_integration_is_close_to_float64(method):
    torch.manual_seed(0)
    cell = ConvCell(8, norm="none")
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        z64 = ODECore(cell.double(), 2, T=3.0, method=method, rtol=1e-8, atol=1e-8)(x.double())
        z16 = ODECore(cell.half(), 2, T=3.0, method=method, rtol=1e-2, atol=1e-2)(x.half())
    assert z16.dtype == torch.float16
    assert (z16.double() - z64).abs().max() < 0.05 * z64.abs().max()
