"""The solvers and wt.DEQ with a cell ``f`` that writes its argument in place (a pre-activation
cell starting with ``nn.ReLU(inplace=True)``, or ``z.mul_(...)``): the fixed point, the step
counts and the gradients (``ift`` with the Jacobian regulariser and the spectral radius,
``unroll``, damped ``phantom`` steps) are those of the same cell written out of place, also under
``torch.inference_mode()``; an ``f`` writing a parameter in place still gets autograd's error."""

import pytest
import torch
from torch import nn

import wtmodels as wt

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


@pytest.mark.parametrize("method", SOLVERS)
def test_an_f_that_writes_its_argument_in_place_under_inference_mode(method):
    # inference tensors have no version counter, so the in-place write of a cell starting
    # with nn.ReLU(inplace=True) went unseen: every iterate was rectified, the fixed point
    # (with negative entries) could never be reached, and an eval pass under
    # torch.inference_mode() silently got a wrong z (off by ~1.5, 200 steps, not converged)
    torch.manual_seed(0)
    W = torch.randn(4, 4, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.tensor([-1.0, -2.0, 0.5, -0.7], dtype=torch.float64)
    relu = torch.nn.ReLU(inplace=True)
    with torch.inference_mode():
        z, stats = wt.solve(lambda z: relu(z) @ W.T + b, torch.zeros(2, 4, dtype=torch.float64),
                            method=method, tol=1e-12, max_iter=200)
    # the known answer: plain iteration of the out-of-place map, in float64
    zs = torch.zeros(4, dtype=torch.float64)
    for _ in range(200):
        zs = torch.relu(zs) @ W.T + b
    assert (zs < 0).any()  # the fixed point has negative entries
    assert stats.converged.all()
    torch.testing.assert_close(z, zs.expand(2, 4), atol=1e-10, rtol=0)

    # one that returns its argument written in place read residual 0 at z0 (a convergence
    # never reached, z = z0); with a copy it is an ordinary f: z = 0.5 z + 1 -> 2
    with torch.inference_mode():
        z, stats = wt.solve(lambda z: z.mul_(0.5).add_(1.0),
                            torch.zeros(3, 2, dtype=torch.float64), method=method, tol=1e-12,
                            max_iter=200)
    assert stats.converged.all() and (stats.nstep > 1).all()
    torch.testing.assert_close(z, torch.full((3, 2), 2.0, dtype=torch.float64), atol=1e-10,
                               rtol=0)
