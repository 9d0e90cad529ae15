"""The solvers and the DEQ layer: cases a new user hit (see each test's comment)."""

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

import wtmodels as wt
from wtmodels.solvers import anderson

F64 = torch.float64
SOLVERS = ["fixed_point", "anderson", "broyden"]


def preactivation_cell(inplace: bool):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, dtype=F64)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    pre = nn.Sequential(nn.ReLU(inplace=inplace), conv)
    return conv, (lambda z: torch.tanh(pre(z) + x)), torch.zeros_like(x)


def test_ift_jac_reg_and_spectral_radius_accept_an_f_that_writes_its_argument_in_place():
    # a pre-activation cell starting with nn.ReLU(inplace=True) works with the solvers and
    # with grad="phantom"/"unroll", but the default grad="ift", jac_reg and spectral_radius
    # called it on a leaf that requires grad: "a leaf Variable that requires grad is being
    # used in an in-place operation"
    results = []
    for inplace in (False, True):
        conv, f, z0 = preactivation_cell(inplace)
        deq = wt.DEQ(f_tol=1e-10, b_tol=1e-10, f_max_iter=100, b_max_iter=100)
        torch.manual_seed(1)
        z, stats = deq(f, z0, jac_reg=True)
        (z.square().sum() + stats.jac_loss).backward()
        torch.manual_seed(2)
        radius = deq.spectral_radius(f, z.detach())
        results.append((z.detach(), conv.weight.grad.clone(), stats.jac_loss.detach(), radius))
        # a second call (the module now copies z up front) gives the same gradient
        conv.zero_grad()
        torch.manual_seed(1)
        z, stats = deq(f, z0, jac_reg=True)
        (z.square().sum() + stats.jac_loss).backward()
        torch.testing.assert_close(conv.weight.grad, results[-1][1])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_an_f_that_modifies_a_parameter_in_place_still_raises_autograds_error():
    # the fallback copies z only: any other in-place use of a leaf is the user's to fix
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def f(z):
        w.mul_(1.0)
        return w * z + 1.0

    with pytest.raises(RuntimeError, match="leaf Variable"):
        wt.DEQ()(f, torch.zeros(2, 3, dtype=F64))


def test_a_registered_solver_returning_another_dtype_is_refused(monkeypatch):
    # a custom solver that returned float64 for a float32 z0 passed the result check; DEQ then
    # fed it to f, which failed with "expected m1 and m2 to have the same dtype"
    def to64(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
        return anderson(lambda z: f(z.float()).double(), z0.double(), max_iter=max_iter,
                        tol=tol, stop_mode=stop_mode)

    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # registry kept clean
    wt.register_solver("test_review7_to64", to64, overwrite=True)
    W = torch.eye(3) * 0.5
    with pytest.raises(ValueError, match="dtype of z0"):
        wt.solve(lambda z: z @ W + 1.0, torch.zeros(2, 3), method="test_review7_to64")
    with pytest.raises(ValueError, match="dtype of z0"):
        wt.DEQ(f_solver="test_review7_to64")(lambda z: z @ W + 1.0, torch.zeros(2, 3))


@pytest.mark.parametrize("method", SOLVERS)
def test_nonlinear_problem_against_scipy_root_and_batch_independence(method):
    # per sample z = tanh(W_b z + c_b) + 0.1 sin(z), a different W per sample; each sample
    # solved alone gives the same iterate and the same number of steps as in the batch
    g = torch.Generator().manual_seed(3)
    B, D = 4, 6
    W = torch.randn(B, D, D, generator=g, dtype=F64) * 0.25
    c = torch.randn(B, D, generator=g, dtype=F64)

    def f(z, W=W, c=c):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + c) + 0.1 * torch.sin(z)

    z, stats = wt.solve(f, torch.zeros(B, D, dtype=F64), method=method, tol=1e-12,
                        max_iter=300)
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.rel_lowest <= 1e-12).all() and (stats.nstep <= 300).all()
    for i in range(B):
        def residual(v, i=i):
            t = torch.from_numpy(v)[None]
            return (f(t, W[i:i + 1], c[i:i + 1])[0] - t[0]).numpy()

        root = scipy.optimize.root(residual, np.zeros(D), tol=1e-14).x
        np.testing.assert_allclose(z[i].numpy(), root, atol=1e-9)
        zi, si = wt.solve(lambda t, i=i: f(t, W[i:i + 1], c[i:i + 1]),
                          torch.zeros(1, D, dtype=F64), method=method, tol=1e-12, max_iter=300)
        assert int(si.nstep[0]) == int(stats.nstep[i])
        torch.testing.assert_close(zi[0], z[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", SOLVERS)
def test_solvers_find_the_fixed_point_of_an_f_that_writes_its_argument_in_place(method):
    # nn.ReLU(inplace=True) first rectified the solver's own iterate: the iterates could never
    # take the negative values of the fixed point, and the solve stalled at rel residual 0.72
    # for its whole budget (not converged) where the same cell without inplace took 6 steps
    out = []
    for inplace in (False, True):
        _, f, z0 = preactivation_cell(inplace)
        z, stats = wt.solve(f, z0, method=method, tol=1e-8, max_iter=100)
        assert stats.converged.all() and int(stats.nstep.max()) < 40
        out.append((z, stats.nstep))
    torch.testing.assert_close(out[1][0], out[0][0])
    assert out[1][1].tolist() == out[0][1].tolist()
    # a written start: each solve re-evaluates f on a copy of what f wrote (the relu of z0)
    _, f, z0 = preactivation_cell(True)
    z_neg = -torch.ones_like(z0)
    z, stats = wt.solve(f, z_neg, method=method, tol=1e-8, max_iter=100)
    assert stats.converged.all() and (z_neg == -1).all()
    torch.testing.assert_close(z, out[0][0])


@pytest.mark.parametrize("grad", ["unroll", "phantom"])
def test_unroll_and_damped_phantom_steps_with_an_f_that_writes_its_argument_in_place(grad):
    results = []
    for inplace in (False, True):
        conv, f, z0 = preactivation_cell(inplace)
        deq = wt.DEQ(grad=grad, f_tol=1e-10, f_max_iter=100, tau=0.5, phantom_steps=3)
        for _ in range(2):  # the second call hands f copies from the start
            conv.zero_grad()
            z, stats = deq(f, z0)
            z.square().sum().backward()
            assert stats.converged.all()
            results.append((z.detach(), conv.weight.grad.clone()))
    for want, got in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
