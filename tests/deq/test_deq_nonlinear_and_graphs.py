"""wt.DEQ: known answers on a new nonlinear map, graphs with several uses,
the regulariser and radius against dense Jacobians, and an f with nothing to differentiate."""

import pytest
import torch
from torch import nn

import wtmodels as wt

F64 = torch.float64
GRADS = ["ift", "phantom", "unroll"]


def problem(seed=0, B=3, D=5, Dx=4):
    """z* = tanh(W z* + U x + b), float64, contractive (||W||_2 = 0.6)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()
    U = torch.randn(D, Dx, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(D, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(B, Dx, generator=g, dtype=F64, requires_grad=True)
    return W, U, b, x, (lambda z: torch.tanh(z @ W.T + x @ U.T + b))


def tight(**kw):
    return wt.DEQ(**{"f_tol": 1e-13, "b_tol": 1e-13, "f_max_iter": 300, "b_max_iter": 300, **kw})


def exact_grads(W, U, b, x, z, w):
    """d sum(w * z*) / d(W, U, b, x) by a dense solve of (I - J)^T v = w per sample."""
    W, U, x = W.detach(), U.detach(), x.detach()
    s = 1 - z ** 2  # tanh' at the fixed point
    a = torch.stack([torch.linalg.solve((torch.eye(len(W), dtype=F64) - s[i, :, None] * W).T,
                                        w[i]) * s[i] for i in range(len(z))])  # dL/d(preact)
    return a.T @ z, a.T @ x, a.sum(0), a @ U


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_exact_implicit_gradient_for_every_input_and_none_for_z0(grad):
    W, U, b, x, f = problem()
    z0 = torch.randn(3, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 5, dtype=F64)
    z, stats = tight(grad=grad)(f, z0)
    assert stats.converged.all()
    (z * w).sum().backward()
    for p, e in zip((W, U, b, x), exact_grads(W, U, b, x, z.detach(), w)):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-10)
    assert z0.grad is None  # documented: no gradient flows to the initial guess


def test_several_uses_two_solves_in_one_graph_and_retain_graph_match_unroll():
    W, U, b, x, f = problem(1)
    zeros = torch.zeros(3, 5, dtype=F64)

    def loss(deq):
        z1, _ = deq(f, zeros)
        z2, _ = deq(lambda z: torch.tanh(z @ W.T + z1), zeros)  # a second solve fed by the first
        return z1.sum() + (z1 ** 2).sum() + z1[0].sin().sum() + (z2 ** 2).sum()

    ref = torch.autograd.grad(loss(tight(grad="unroll")), [W, U, b, x])
    ift = loss(tight())
    first = torch.autograd.grad(ift, [W, U, b, x], retain_graph=True)
    second = torch.autograd.grad(ift, [W, U, b, x])
    for r, g1, g2 in zip(ref, first, second):
        torch.testing.assert_close(g1, r, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_regulariser_is_unbiased_and_radius_matches_eigvals_at_the_fixed_point():
    torch.manual_seed(0)
    W, U, b, x, f = problem(2)
    deq = tight(jac_reg_samples=4000)
    z, stats = deq(f, torch.zeros(3, 5, dtype=F64), jac_reg=True)
    s = 1 - z.detach() ** 2
    J = s[:, :, None] * W.detach()  # (B, D, D) df/dz at z*
    exact = J.square().sum((1, 2)).mean() / 5
    assert abs(stats.jac_loss.item() - exact.item()) < 0.03 * exact.item()
    radius = deq.spectral_radius(f, z, n_iter=200)
    expected = torch.linalg.eigvals(J).abs().max(1).values
    torch.testing.assert_close(radius, expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("grad", GRADS)
def test_a_frozen_f_under_autograd_gives_no_graph_and_runs_no_adjoint_solve(grad):
    # a frozen DEQ backbone under a trainable head: "ift" returned a z_star that required
    # grad, and every backward of the head ran the whole adjoint solve for nothing
    torch.manual_seed(0)
    cell = nn.Linear(4, 4).requires_grad_(False)
    head = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    deq = wt.DEQ(grad=grad)
    z, _ = deq(lambda z: torch.tanh(0.3 * cell(z) + x), torch.zeros(3, 4))
    assert not z.requires_grad
    head(z).sum().backward()
    assert deq.last_backward_stats is None and head.weight.grad is not None
    # with an input that requires grad, the adjoint solve still runs and reaches it
    x.requires_grad_()
    z, _ = deq(lambda z: torch.tanh(0.3 * cell(z) + x), torch.zeros(3, 4))
    z.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (deq.last_backward_stats is not None) == (grad == "ift")


@pytest.mark.parametrize("grad", GRADS)
def test_z_star_is_never_a_tensor_f_closes_over(grad):
    # "ift" with an f of constants returned f's output itself: writing z_star wrote it
    c = torch.ones(2, 3)
    z, _ = wt.DEQ(grad=grad)(lambda z: c, torch.zeros(2, 3))
    z.add_(1.0)
    assert (c == 1).all()
