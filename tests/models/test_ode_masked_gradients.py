"""The ODE core against closed forms: gradients (direct and adjoint) of a masked
linear cell after ``set_depth`` equal autograd through the product of matrix exponentials;
fixed-grid methods keep their order when masked runs of segments are integrated together; the
adjoint under bf16 autocast stays within bf16 precision of float32 backprop."""

import warnings

import pytest
import torch

from tests.models.test_ode_closed_forms import N, _LinCell  # f(z, x) = W z + x, N = 4
from wtmodels.masks import apply_masks, mask_index
from wtmodels.ode import ODECore

DT = torch.float64
I_N = torch.eye(N, dtype=DT)
X = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))
C = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(2))



def _masked_cell(k, schedule, seed=0):
    torch.manual_seed(seed)
    cell = apply_masks(_LinCell(), k=k, density=0.5, schedule=schedule, types=(torch.nn.Linear,))
    return cell.double()


def _closed_form(W, masks, x, depth, k, schedule, h):
    """``z`` after ``depth`` segments of length ``h``, segment t with ``W * masks[mask_index(t)]``:
    ``z <- e^{hB} z + B^{-1} (e^{hB} - I) x``, ``B = W_t - I`` (differentiable in W and x)."""
    z = torch.zeros_like(x)
    for t in range(depth):
        B = W * masks[mask_index(t, depth, k, schedule)] - I_N
        E = torch.linalg.matrix_exp(h * B)
        z = z @ E.T + x @ torch.linalg.solve(B, E - I_N).T
    return z


@pytest.mark.parametrize("schedule", ["cyclic", "block"])
@pytest.mark.parametrize("test_depth", [3, 7])
@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_after_set_depth_are_those_of_the_matrix_exponential_product(
        schedule, test_depth, adjoint):
    depth, k, T = 5, 3, 2.0
    cell = _masked_cell(k, schedule)
    core = ODECore(cell, depth=depth, T=T, method="dopri5", rtol=1e-11, atol=1e-11,
                   adjoint=adjoint)
    core.set_depth(test_depth)
    x = X.clone().requires_grad_()
    gx, gw = torch.autograd.grad((core(x) * C).sum(), [x, cell.lin.weight])

    x_ref = X.clone().requires_grad_()
    w_ref = cell.lin.weight.detach().clone().requires_grad_()
    z_ref = _closed_form(w_ref, cell.lin.weight_masks, x_ref, test_depth, k, schedule, T / depth)
    rx, rw = torch.autograd.grad((z_ref * C).sum(), [x_ref, w_ref])
    assert (gx - rx).abs().max() < 1e-8 * rx.abs().max()
    assert (gw - rw).abs().max() < 1e-8 * rw.abs().max()
    # a weight no mask keeps gets exactly zero gradient
    kept = cell.lin.weight_masks.any(0)
    assert torch.all(gw[~kept] == 0)


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_grid_order_holds_across_mask_changes(method, order):
    # block schedule, K = 2: the mask changes at T / 2 whatever the depth, so doubling the depth
    # halves the step in both runs; the error against the two-exponential product must shrink
    # by 2**order (euler 2, midpoint 4, rk4 16)
    k, T = 2, 2.0
    cell = _masked_cell(k, "block", seed=3)
    W, masks = cell.lin.weight.detach(), cell.lin.weight_masks
    exact = _closed_form(W, masks, X, k, k, "block", T / k)  # one segment per mask
    errors = []
    for depth in (8, 16, 32):
        with torch.no_grad():
            z = ODECore(cell, depth=depth, T=T, method=method)(X)
        errors.append((z - exact).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    for ratio in ratios:
        assert 0.75 * 2 ** order < ratio < 1.3 * 2 ** order, (errors, ratios)


class _SmoothConvCell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_adjoint_under_bf16_autocast_is_within_bf16_precision_of_float32(method):
    def grads(adjoint, autocast):
        torch.manual_seed(0)
        cell = _SmoothConvCell()
        core = ODECore(cell, depth=4, T=2.0, method=method, rtol=1e-5, atol=1e-5,
                       adjoint=adjoint)
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = core(x)
        assert z.dtype == torch.float32  # the state stays float32 under autocast
        (z * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in cell.parameters()] + [x.grad.flatten()])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = grads(False, False)
        got = grads(True, True)
    assert torch.isfinite(got).all()
    # bf16 has 8 significant bits (2**-8 = 0.4%); rk4's adjoint adds its discretisation error
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()
