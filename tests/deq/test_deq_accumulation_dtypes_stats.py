"""wt.DEQ: gradient accumulation, mixed dtypes and shapes, stats in train / eval,
an adjoint solve that stops short, checkpointed and nested cells, batched gradients. Every
expected value is a closed form or a dense solve, never the layer's own output."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import wtmodels as wt

F64 = torch.float64
GRADS = ["ift", "phantom", "unroll"]


def tight(**kw):
    return wt.DEQ(**{"f_tol": 1e-13, "b_tol": 1e-13, "f_max_iter": 300, "b_max_iter": 300, **kw})


def linear(seed=0, B=3, D=4):
    """``z = A z + Bm x`` with ||A||_2 = 0.7: ``z* = (I - A)^-1 Bm x``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    A = (0.7 * A / torch.linalg.matrix_norm(A, ord=2)).requires_grad_()
    Bm = torch.randn(D, D, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(B, D, generator=g, dtype=F64, requires_grad=True)
    return A, Bm, x, (lambda z: z @ A.T + x @ Bm.T)


def exact_linear(A, Bm, x, w):
    """z* and d sum(w * z*) / d(A, Bm, x) in closed form."""
    A, Bm, x = A.detach(), Bm.detach(), x.detach()
    I = torch.eye(len(A), dtype=F64)
    z = torch.linalg.solve(I - A, (x @ Bm.T).T).T
    u = torch.linalg.solve((I - A).T, w.T).T  # adjoint, (B, D)
    return z, (u.T @ z, u.T @ x, u @ Bm)


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_retained_graph_two_losses_and_two_calls_accumulate_the_exact_gradient(grad):
    A, Bm, x, f = linear()
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    z0 = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    deq = tight(grad=grad)
    # one z_star, two losses, two backward calls (the first retains the graph) ...
    z, _ = deq(f, z0)
    (z * w1).sum().backward(retain_graph=True)
    (z * w2).sum().backward()
    # ... then the same loss's backward twice, then two more forward calls, accumulated
    z, _ = deq(f, z0)
    loss = (z * w1).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    for _ in range(2):
        z, _ = deq(f, z0)
        (z * w2).sum().backward()
    _, expected = exact_linear(A, Bm, x, 3 * w1 + 3 * w2)
    for p, e in zip((A, Bm, x), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-10)
    assert z0.grad is None


def test_phantom_sends_no_gradient_to_z0_either():
    _, _, _, f = linear()
    z0 = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    z, _ = tight(grad="phantom")(f, z0)
    z.sum().backward()
    assert z0.grad is None  # README: differentiable with respect to what f closes over, not z0


@pytest.mark.parametrize("grad", GRADS)
def test_float64_parameters_with_a_float32_z0_give_z0s_dtype_and_exact_gradients(grad):
    # f = a z + c with a = 0.5: z* = 2c; ift / unroll: dz*/dc = 2, dz*/da = z* / (1 - a) = 4c;
    # phantom (5 plain steps from z*, held constant): dc: 1 + a + ... + a^4, da: z* times that
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    c = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    z, stats = tight(grad=grad, f_tol=1e-6)(lambda z: a * z + c, torch.zeros(3, 2))
    assert z.dtype == torch.float32 and stats.converged.all()
    torch.testing.assert_close(z, torch.tensor([[2.0, 4.0]] * 3), rtol=1e-5, atol=1e-5)
    z.sum().backward()
    s = 1.9375 if grad == "phantom" else 2.0
    torch.testing.assert_close(c.grad, torch.full((2,), 3 * s, dtype=F64), rtol=1e-4, atol=0)
    torch.testing.assert_close(a.grad, torch.tensor(3 * 6.0 * s, dtype=F64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("shape", [(1,), (2,), (1, 3)])
def test_batch_of_one_and_per_sample_scalars(grad, shape):
    # z = a z + x with a = 0.5: z* = 2x, dz*/dx = 2 (phantom: 1 + ... + a^4), dz*/da = 4x
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x = torch.arange(1.0, 1.0 + torch.Size(shape).numel(), dtype=F64).reshape(shape)
    x.requires_grad_()
    deq = tight(grad=grad)
    z, stats = deq(lambda z: a * z + x, torch.zeros(shape, dtype=F64))
    assert stats.nstep.shape == stats.converged.shape == (shape[0],) and stats.converged.all()
    torch.testing.assert_close(z, 2 * x.detach(), rtol=1e-10, atol=1e-12)
    z.sum().backward()
    s = 1.9375 if grad == "phantom" else 2.0
    torch.testing.assert_close(x.grad, torch.full(shape, s, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(a.grad, 2 * s * x.detach().sum(), rtol=1e-9, atol=0)
    radius = deq.spectral_radius(lambda z: a * z + x, z.detach())
    torch.testing.assert_close(radius, torch.full((shape[0],), 0.5, dtype=F64))


def dense_conv_gradient(conv, x, z, w):
    """d sum(w * z*) / d conv.weight for z* = tanh(conv(z*) + x), by dense per-sample solves
    (Jacobians from torch.autograd.functional.jacobian, independent of the DEQ)."""
    grads = torch.zeros_like(conv.weight)
    for b in range(len(z)):
        cell = lambda zb, b=b: torch.tanh(conv(zb[None]) + x[b:b + 1])[0]  # noqa: E731
        zb = z[b].detach().contiguous()
        n = zb.numel()
        J = torch.autograd.functional.jacobian(cell, zb).reshape(n, n)
        u = torch.linalg.solve((torch.eye(n, dtype=F64) - J).T, w[b].reshape(n))
        out = cell(zb)
        grads += torch.autograd.grad(out, conv.weight, u.reshape(zb.shape))[0]
    return grads


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_channels_last_conv_cell_gives_the_exact_implicit_gradient(grad):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(2, 2, 3, 3, dtype=F64).to(memory_format=torch.channels_last)
    w = torch.randn(2, 2, 3, 3, dtype=F64)
    z0 = torch.zeros_like(x)  # channels_last too
    z, stats = tight(grad=grad)(lambda z: torch.tanh(conv(z) + x), z0)
    assert stats.converged.all() and z.shape == x.shape
    (z * w).sum().backward()
    torch.testing.assert_close(conv.weight.grad, dense_conv_gradient(conv, x, z, w),
                               rtol=1e-8, atol=1e-10)


class Wrapped(nn.Module):
    def __init__(self, grad):
        super().__init__()
        self.deq = wt.DEQ(grad=grad, f_solver="fixed_point", f_max_iter=4, eval_f_max_iter=9,
                          f_tol=1e-30, stop_mode="abs")
        self.a = nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, b):
        return self.deq(lambda z: self.a * z + b, torch.zeros_like(b))


@pytest.mark.parametrize("grad", GRADS)
def test_train_and_eval_budgets_and_stats_match_plain_iteration_in_closed_form(grad):
    # plain iteration of z <- z / 2 + b from 0: z_k = 2b(1 - 2^-k), residual |b| 2^-k; the
    # solver's best of n evaluations is z_{n-1}, the output f there (z_n), or the phantom
    # steps' result from it (z_{n+4}); n is 4 in training, 9 after the parent's .eval()
    model = Wrapped(grad)
    b = torch.tensor([[1.0], [-4.0]], dtype=F64)
    for training, n in ((True, 4), (False, 9), (True, 4)):
        model.train(training)
        for grad_on in (True, False):
            with torch.set_grad_enabled(grad_on):
                z, stats = model(b)
            k = n + 4 if grad == "phantom" else n
            torch.testing.assert_close(z, 2 * b * (1 - 0.5 ** k), rtol=1e-14, atol=0)
            assert stats.n_iter == n and stats.nstep.tolist() == [n, n]
            assert not stats.converged.any() and not stats.diverged.any()
            trace = b.abs() * 0.5 ** torch.arange(n, dtype=F64)
            torch.testing.assert_close(torch.as_tensor(stats.abs_trace, dtype=F64), trace)
            assert z.requires_grad == grad_on


def test_an_adjoint_solve_stopped_short_is_in_the_backward_stats_and_not_warned():
    # u <- 0.95 u + 1 by plain iteration, 3 evaluations: the best iterate is u_2 = 1 + .95 +
    # .95^2 (not the exact 1 / 0.05 = 20), residual .95^3 / (u_2 + .95^3); neither converged
    # nor diverged, so no warning, but deq.last_backward_stats says so
    x = torch.ones(2, 1, dtype=F64, requires_grad=True)
    deq = wt.DEQ(f_tol=1e-13, f_max_iter=300, b_solver="fixed_point", b_max_iter=3,
                 b_tol=1e-10)
    z, stats = deq(lambda z: 0.95 * z + x, torch.zeros(2, 1, dtype=F64))
    assert stats.converged.all() and deq.last_backward_stats is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z.sum().backward()
    back = deq.last_backward_stats
    u2 = 1 + 0.95 + 0.95 ** 2
    assert back.nstep.tolist() == [3, 3]
    assert not back.converged.any() and not back.diverged.any()
    torch.testing.assert_close(torch.as_tensor(back.rel_lowest, dtype=F64),
                               torch.full((2,), 0.95 ** 3 / (u2 + 0.95 ** 3), dtype=F64))
    torch.testing.assert_close(x.grad, torch.full((2, 1), u2, dtype=F64))


def test_a_loss_on_one_sample_solves_the_others_adjoint_at_zero_without_warning():
    A, Bm, x, f = linear(2)
    deq = tight()
    z, _ = deq(f, torch.zeros(3, 4, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z[0].sum().backward()
    w = torch.zeros(3, 4, dtype=F64)
    w[0] = 1
    _, expected = exact_linear(A, Bm, x, w)
    for p, e in zip((A, Bm, x), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    assert deq.last_backward_stats.converged.all()


@pytest.mark.parametrize("grad", GRADS)
def test_a_checkpointed_deq_gives_the_exact_gradient(grad):
    A, Bm, x, f = linear(3)
    deq = tight(grad=grad)
    z = checkpoint(lambda x: deq(lambda z: z @ A.T + x @ Bm.T, torch.zeros(3, 4, dtype=F64))[0],
                   x, use_reentrant=False)
    w = torch.randn(3, 4, dtype=F64)
    (z * w).sum().backward()
    if grad != "phantom":
        _, expected = exact_linear(A, Bm, x, w)
        for p, e in zip((A, Bm, x), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-10)
    else:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (A, Bm, x))


def test_a_cell_under_reentrant_checkpoint_is_not_taken_for_a_frozen_one():
    # ift took f = checkpoint(cell, z, use_reentrant=True) for a frozen f (its graph reaches
    # only z; the parameters' backward runs inside the checkpoint node): z_star came back
    # without a graph and the cell got no gradient, silently. Now the backward either gives
    # the exact gradient or raises (reentrant checkpoint refuses autograd.grad)
    A, Bm, x, _ = linear(4)
    cell = lambda z: z @ A.T + x @ Bm.T  # noqa: E731
    deq = tight()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's use_reentrant advice
        z, _ = deq(lambda z: checkpoint(cell, z, use_reentrant=True), torch.zeros(3, 4, dtype=F64))
        assert z.requires_grad
        with pytest.raises(RuntimeError, match="use_reentrant"):
            z.sum().backward()
    z, _ = deq(lambda z: checkpoint(cell, z, use_reentrant=False), torch.zeros(3, 4, dtype=F64))
    z.sum().backward()
    _, expected = exact_linear(A, Bm, x, torch.ones(3, 4, dtype=F64))
    for p, e in zip((A, Bm, x), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-10)


def test_nested_deqs_give_the_exact_gradient():
    # inner: y = y / 2 + 0.3 z + x -> y* = 0.6 z + 2 x; outer: z = y*(z) -> z* = 5 x
    x = torch.tensor([[1.0], [2.0]], dtype=F64, requires_grad=True)
    inner, outer = tight(), tight()

    def f(z):
        return inner(lambda y: 0.5 * y + 0.3 * z + x, torch.zeros_like(z))[0]

    z, stats = outer(f, torch.zeros(2, 1, dtype=F64))
    assert stats.converged.all()
    torch.testing.assert_close(z, 5 * x.detach())
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 1), 5.0, dtype=F64))


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_a_full_jacobian_is_exact_or_batched_gradients_are_refused_clearly(grad):
    A = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=F64)
    exact = torch.linalg.inv(torch.eye(2, dtype=F64) - A)  # dz*/dc
    deq = tight(grad=grad)

    def fn(c):
        return deq(lambda z: z @ A.T + c, torch.zeros(1, 2, dtype=F64))[0]

    c = torch.ones(1, 2, dtype=F64)
    J = torch.autograd.functional.jacobian(fn, c).reshape(2, 2)
    torch.testing.assert_close(J, exact, rtol=1e-10, atol=1e-12)
    if grad == "ift":  # was: "Batching rule not implemented for aten::detach"
        with pytest.raises(RuntimeError, match="cannot differentiate batched gradients"):
            torch.autograd.functional.jacobian(fn, c, vectorize=True)
    else:
        J = torch.autograd.functional.jacobian(fn, c, vectorize=True).reshape(2, 2)
        torch.testing.assert_close(J, exact, rtol=1e-10, atol=1e-12)
