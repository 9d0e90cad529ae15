"""wt.DEQ (a new user's acceptance pass). Every expected value is a closed form,
never the layer's own output."""

import warnings

import pytest
import torch

import wtmodels as wt

F64 = torch.float64


def diagonal_problem():
    """``z = tanh(a * z + x)`` elementwise: ``J = diag(a (1 - z*^2))``, so Rademacher probes
    give ``||J||_F^2`` exactly, and the rows (different ``x``) converge at different steps."""
    g = torch.Generator().manual_seed(0)
    a = (0.5 * torch.rand(6, generator=g, dtype=F64) + 0.2).requires_grad_()
    x = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    return a, x


def jac_loss_gradients(a, x, z, total):
    """d/d(a, x) of mean((a (1 - tanh(a z + x)^2))^2) at the fixed point ``z``, with ``z``
    held constant, or (``total``) with ``z = z*(a, x)`` (implicit function theorem)."""
    a, x, z = a.detach(), x.detach(), z.detach()
    s = 1 - z ** 2  # tanh(a z* + x) = z*
    dz_da = dz_dx = torch.zeros_like(z)
    if total:
        denom = 1 - a * s
        dz_da, dz_dx = s * z / denom, s / denom
    # J = a s, s = 1 - tanh(a z + x)^2: ds/da = -2 z* s (z + a dz/da), ds/dx = -2 z* s (1 + a dz/dx)
    dJ_da = s + a * (-2 * z * s * (z + a * dz_da))
    dJ_dx = a * (-2 * z * s * (1 + a * dz_dx))
    n = z.numel()
    return (2 * a * s * dJ_da).sum(0) / n, 2 * a * s * dJ_dx / n


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_jac_loss_gradient_closed_form_per_sample_whatever_the_batch(grad):
    # "unroll": the gradient of jac_loss flows through the unrolled iterations (README), so it
    # is the total derivative; but a sample that reached the tolerance before the others sat
    # at a detached copy of its iterate, and its term lost that path: the gradient of a batch
    # was not the sum of its samples' gradients. "ift"/"phantom" treat z* as a constant.
    a, x = diagonal_problem()
    deq = wt.DEQ(grad=grad, f_tol=1e-13, f_max_iter=300)
    z, stats = deq(lambda z: torch.tanh(a * z + x), torch.zeros(3, 6, dtype=F64), jac_reg=True)
    assert len(set(stats.nstep.tolist())) > 1  # the rows stop at different steps
    s = 1 - z.detach() ** 2
    torch.testing.assert_close(stats.jac_loss, (a.detach() * s).square().mean())
    ga, gx = torch.autograd.grad(stats.jac_loss, (a, x))
    ea, ex = jac_loss_gradients(a, x, z, total=grad == "unroll")
    torch.testing.assert_close(ga, ea, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("rows", [[1], [0, 1]])
def test_unroll_jac_loss_of_a_diverging_sample_is_taken_where_it_comes_back(rows):
    # z <- a z + c z^3 + x from 0: row 0 (c = 0) converges to 2; row 1 (c = 1, x = 2) runs
    # away (0, 2, 12, 1742, ...) and comes back from its start (lower absolute residual),
    # z_star = f(0) = 2. The Jacobian term was taken at the iterate that ran away when the
    # sample stopped in the last step (alone, or last to stop): inf, and every gradient NaN.
    # Taken where the sample sits, its start: J = a, as for a sample that stopped earlier.
    c = torch.tensor([[0.0], [1.0]], dtype=F64)[rows]
    x = torch.tensor([[1.0], [2.0]], dtype=F64)[rows]
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    deq = wt.DEQ(grad="unroll", f_tol=1e-10, f_max_iter=50)
    z, stats = deq(lambda z: a * z + c * z ** 3 + x, torch.zeros(len(rows), 1, dtype=F64),
                   jac_reg=True)
    assert stats.diverged.tolist() == [False, True][-len(rows):]
    torch.testing.assert_close(z.detach(), torch.full((len(rows), 1), 2.0, dtype=F64))
    torch.testing.assert_close(stats.jac_loss.detach(), torch.tensor(0.25, dtype=F64))
    (ga,) = torch.autograd.grad(stats.jac_loss, (a,))
    torch.testing.assert_close(ga, torch.tensor(1.0, dtype=F64))  # d(a^2)/da


@pytest.mark.parametrize("budget", [3, 5])
def test_unroll_jac_loss_is_taken_where_the_output_comes_from_when_the_budget_runs_out(budget):
    # z <- a z + z^3 + 2 from 0 runs away (0, 2, 12, 1742, 5.3e9) but is not yet flagged
    # diverged within 3 or 5 steps; its output is f at the lowest-residual iterate, 2
    # (z_star = 11). The Jacobian term was taken at the last iterate: 1.3e5 at budget 3, 3e38
    # (float32) at budget 5 with a NaN gradient. At the output's iterate: J = a + 3 * 2^2.
    a = torch.tensor(0.5, requires_grad=True)
    deq = wt.DEQ(grad="unroll", f_max_iter=budget)
    z, stats = deq(lambda z: a * z + z ** 3 + 2, torch.zeros(1, 1), jac_reg=True)
    assert not stats.diverged.any() and not stats.converged.any()
    torch.testing.assert_close(z.detach(), torch.full((1, 1), 11.0))
    torch.testing.assert_close(stats.jac_loss.detach(), torch.tensor(12.5 ** 2))
    (ga,) = torch.autograd.grad(stats.jac_loss, (a,))
    torch.testing.assert_close(ga, torch.tensor(2 * 12.5))  # the iterate 2 = f(0) has no a


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_z_star_may_be_modified_in_place_when_it_is_f_of_z0(grad):
    # with a budget of 1 (or a warm start that has converged) "unroll" returned f's own
    # output: writing it in place (z_star.mul_(2), a relu_) broke the backward of an f whose
    # last op saves its output (sigmoid, tanh, exp), which "ift" already allowed
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    deq = wt.DEQ(grad=grad, f_max_iter=1, phantom_steps=1, b_max_iter=1)  # (ift: u = dL/dz)
    z, _ = deq(lambda z: torch.sigmoid(0.5 * z + x), torch.zeros(2, 3, dtype=F64))
    z.mul_(2)
    z.sum().backward()
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, 2 * s * (1 - s))  # z_star = sigmoid(x): z0 = 0


def per_sample_tanh(scale, B=1000, D=16):
    """``z -> tanh(W_b z + c_b)`` per sample with ``||W_b||_2 = scale`` (< 1: a contraction,
    so is its adjoint ``u -> J^T u + g``), ``W`` requiring grad."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(B, D, D, generator=g)
    W = (scale * W / torch.linalg.matrix_norm(W, 2)[:, None, None]).requires_grad_()
    c = torch.randn(B, D, generator=g)
    return W, lambda z: torch.tanh(torch.einsum("bij,bj->bi", W, z) + c)


@pytest.mark.parametrize("b_solver", ["fixed_point", "anderson", "broyden"])
def test_adjoint_after_bf16_forward_is_not_flagged_diverged_at_bf16_floor(b_solver):
    # every sample's adjoint is a contraction (||J|| <= 0.3): none diverges; its vector-Jacobian
    # products carry the bf16 forward's rounding, whose bumps at b_tol=1e-6 were flagged (1 and
    # 5 of 1000 samples for anderson / broyden) with the "spectral radius >= 1" warning
    W, f = per_sample_tanh(0.3)
    deq = wt.DEQ(f_solver="anderson", f_max_iter=40, f_tol=1e-4, b_solver=b_solver,
                 b_max_iter=40, b_tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = deq(f, torch.zeros(1000, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        z.float().pow(2).sum().backward()
    assert int(deq.last_backward_stats.diverged.sum()) == 0
    assert torch.isfinite(W.grad).all()


def test_adjoint_runaway_after_bf16_forward_is_still_flagged():
    # f(z) = A z + b with A = -1.5 I: z* = b / 2.5, J = -1.5; plain iteration of the adjoint
    # u -> -1.5 u + g runs away (relative residual 2.5 / 1.5, far above bf16's floor)
    A = (-1.5 * torch.eye(4)).requires_grad_()
    b = torch.ones(4)
    deq = wt.DEQ(f_solver="anderson", f_max_iter=20, f_tol=1e-2, b_solver="fixed_point",
                 b_max_iter=30, b_tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = deq(lambda z: z @ A.T + b, torch.zeros(8, 4))
    assert torch.allclose(z.float(), torch.full((8, 4), 0.4), atol=1e-2)
    with pytest.warns(RuntimeWarning, match="backward"):
        z.float().sum().backward()
    assert bool(deq.last_backward_stats.diverged.all())


def test_unroll_under_bf16_autocast_is_not_flagged_diverged_at_bf16_floor():
    # the unrolled forward's own bookkeeping follows the solvers' bf16 rounding level too
    # (2 of these 1000 contractive samples were flagged)
    _, f = per_sample_tanh(0.8, D=64)
    deq = wt.DEQ(f_max_iter=60, f_tol=1e-6, grad="unroll")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = deq(f, torch.zeros(1000, 64))
    assert int(stats.diverged.sum()) == 0
