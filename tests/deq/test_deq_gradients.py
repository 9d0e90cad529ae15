"""DEQ layer: gradients against exact implicit gradients and finite differences, options, stats."""

import math
import warnings

import pytest
import torch
from torch import nn

import wtmodels as wt

F64 = torch.float64


def contraction(D, rho, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=dtype)
    return rho * A / torch.linalg.matrix_norm(A, ord=2)


def tight(**kw):
    opts = dict(f_tol=1e-12, b_tol=1e-12, f_max_iter=200, b_max_iter=200)
    opts.update(kw)
    return wt.DEQ(**opts)


@pytest.mark.parametrize("b_solver", ["fixed_point", "anderson", "broyden"])
def test_ift_gradient_equals_exact_implicit_gradient(b_solver):
    B, D = 3, 6
    A = contraction(D, 0.8).requires_grad_()
    c = torch.randn(B, D, dtype=F64, requires_grad=True)
    w = torch.randn(B, D, dtype=F64)
    z, stats = tight(b_solver=b_solver)(lambda z: z @ A.T + c, torch.zeros(B, D, dtype=F64))
    gA, gc = torch.autograd.grad((z * w).sum(), [A, c])
    # exact: z* = (I - A)^-1 c, so dL/dc = (I - A)^-T w and dL/dA = (dL/dc) z*^T
    I = torch.eye(D, dtype=F64)
    z_exact = torch.linalg.solve(I - A.detach(), c.detach().T).T
    u = torch.linalg.solve((I - A.detach()).T, w.T).T  # (B, D)
    torch.testing.assert_close(z, z_exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gc, u, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gA, u.T @ z_exact, rtol=1e-8, atol=1e-9)
    assert stats.converged.all()


def test_ift_gradcheck_nonlinear_float64():
    B, D = 2, 4
    A = contraction(D, 0.7).requires_grad_()
    x = torch.randn(B, D, dtype=F64, requires_grad=True)
    deq = tight()

    def fn(A, x):
        return deq(lambda z: torch.tanh(z @ A.T + x), torch.zeros(B, D, dtype=F64))[0]

    assert torch.autograd.gradcheck(fn, (A, x), eps=1e-6, atol=1e-6)


def exact_gradient(A, x, w):
    """Gradient of sum(w * z*) for z* = tanh(A z* + x), by a dense solve of the adjoint system."""
    z = torch.zeros_like(x)
    for _ in range(500):
        z = torch.tanh(z @ A.T + x)
    s = 1 - z ** 2  # (B, D) tanh'
    gx = []
    for b in range(x.shape[0]):
        J = s[b, :, None] * A  # dz/dz
        gx.append(torch.linalg.solve((torch.eye(len(A), dtype=F64) - J).T, w[b]) * s[b])
    return torch.stack(gx)


@pytest.mark.parametrize("grad, min_cos", [("ift", 0.999999), ("phantom", 0.9),
                                           ("unroll", 0.999999)])
def test_gradients_close_to_exact(grad, min_cos):
    B, D = 4, 10
    A = contraction(D, 0.6)
    x = torch.randn(B, D, dtype=F64, requires_grad=True)
    w = torch.randn(B, D, dtype=F64)
    deq = tight(grad=grad, phantom_steps=5, tau=0.8)
    z, _ = deq(lambda z: torch.tanh(z @ A.T + x), torch.zeros(B, D, dtype=F64))
    (gx,) = torch.autograd.grad((z * w).sum(), [x])
    exact = exact_gradient(A, x.detach(), w)
    cos = torch.nn.functional.cosine_similarity(gx.flatten(), exact.flatten(), dim=0)
    assert cos > min_cos
    if grad == "phantom":
        assert cos < 0.999999  # inexact by design: 5 damped steps


class Cell(nn.Module):
    """A conv cell with input injection; the DEQ must send gradients to every parameter."""

    def __init__(self, C=4):
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.norm = nn.GroupNorm(2, C)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.mul_(0.3)
            self.conv2.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.relu(self.norm(self.conv2(torch.relu(self.conv1(z))) + x))


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_gradients_reach_every_parameter_and_input(grad):
    torch.manual_seed(0)
    cell, stem = Cell(), nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(3, 1, 6, 6)
    inj = stem(x)
    deq = wt.DEQ(grad=grad, f_max_iter=20, b_max_iter=20)
    z, stats = deq(lambda z: cell(z, inj), torch.zeros(3, 4, 6, 6))
    z.square().mean().backward()
    for name, p in list(cell.named_parameters()) + list(stem.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name
    assert stats.nstep.shape == (3,) and stats.jac_loss is None


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_ift_memory_independent_of_forward_iterations_unroll_grows():
    torch.manual_seed(0)
    cell = Cell()
    x = torch.randn(2, 4, 6, 6)
    z0 = torch.zeros(2, 4, 6, 6)

    def f(z):  # converges at rate >= 1/2: never exactly in 15 steps
        return 0.5 * z + 0.5 * cell(z, x)

    def run(grad, iters):
        deq = wt.DEQ(grad=grad, f_max_iter=iters, f_tol=1e-30)  # never converges early
        return saved_bytes(lambda: deq(f, z0))

    assert run("ift", 5) == run("ift", 15) > 0
    assert run("unroll", 15) > 2.5 * run("unroll", 5)


def test_eval_budget_and_train_budget():
    calls = []

    def f(z):
        calls.append(1)
        return 0.9 * z + 1.0

    deq = wt.DEQ(f_max_iter=3, eval_f_max_iter=7, f_tol=1e-30, f_solver="fixed_point")
    assert list(deq.parameters()) == []
    _, stats = deq(f, torch.zeros(2, 3))
    assert stats.n_iter == 3 and not stats.converged.any()
    deq.eval()
    calls.clear()
    with torch.no_grad():
        _, stats = deq(f, torch.zeros(2, 3))
    # f at the solver's iterate, as with autograd on: the output is the same function
    assert stats.n_iter == 7 and len(calls) == 8
    parent = nn.Sequential(nn.Linear(2, 2), deq)
    parent.train()
    assert deq.training and deq.budget == 3


def test_jacobian_regulariser_known_value_and_gradient():
    a = torch.tensor(0.5, requires_grad=True)
    deq = wt.DEQ(jac_reg=True)
    z, stats = deq(lambda z: a * z + 1.0, torch.zeros(4, 10))
    # J = a I: ||J||_F^2 / D = a^2 exactly with Rademacher probes
    torch.testing.assert_close(stats.jac_loss, torch.tensor(0.25))
    assert stats.jac_loss.dim() == 0
    (ga,) = torch.autograd.grad(stats.jac_loss, [a])
    torch.testing.assert_close(ga, torch.tensor(1.0))  # d(a^2)/da
    # a general linear map: the estimate is unbiased for ||A||_F^2 / D
    A = contraction(8, 0.9)
    deq = wt.DEQ(jac_reg_samples=400, grad="phantom")
    _, stats = deq(lambda z: z @ A.T, torch.zeros(2, 8, dtype=F64), jac_reg=True)
    expected = torch.linalg.matrix_norm(A) ** 2 / 8
    assert abs(float(stats.jac_loss) - float(expected)) < 0.1 * float(expected)


def test_spectral_radius_power_iteration():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))[0]
    eig = torch.linspace(-0.3, 0.8, 12, dtype=F64)
    A = Q @ torch.diag(eig) @ Q.T
    r = wt.DEQ().spectral_radius(lambda z: torch.tanh(0.0 * z) + z @ A.T,
                                 torch.zeros(3, 12, dtype=F64), n_iter=100)
    assert r.shape == (3,)
    torch.testing.assert_close(r, torch.full((3,), 0.8, dtype=F64), rtol=1e-3, atol=1e-3)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    cell = Cell()
    x = torch.randn(2, 4, 6, 6)
    deq = wt.DEQ(f_tol=1e-2, b_tol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = deq(lambda z: cell(z, x), torch.zeros(2, 4, 6, 6))
        loss = z.float().square().mean()
    loss.backward()
    assert torch.isfinite(z.float()).all() and stats.converged.all()
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_autocast_gradients_reach_every_weight_as_with_the_cast_cache_off(grad):
    """The solve runs f under no_grad inside the caller's autocast, which caches bf16 copies of
    the conv weights without autograd history; torch before ~2.10 reused them in the calls
    with autograd, and the convs' .grad stayed None (torch 2.4: only the GroupNorm's were
    set). Oracle: the same step with autocast's cache off, where every cast is fresh."""
    grads = {}
    for cache in (True, False):
        torch.manual_seed(0)
        cell = Cell()
        x = torch.randn(2, 4, 6, 6)
        deq = wt.DEQ(f_tol=1e-3, b_tol=1e-3, grad=grad, f_max_iter=30)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            z, _ = deq(lambda z, cell=cell, x=x: cell(z, x), torch.zeros(2, 4, 6, 6))
            loss = z.float().square().mean()
        loss.backward()
        grads[cache] = {n: p.grad for n, p in cell.named_parameters()}
    for name, ref in grads[False].items():
        got = grads[True][name]
        assert got is not None and ref.abs().sum() > 0, name
        if grad == "ift":  # one call with autograd: the same casts, the same gradient
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        else:  # several calls: one cached cast sums their gradients in bf16 (eps 7.8e-3)
            assert (got - ref).norm() <= 2e-2 * ref.norm(), name


def test_jacobian_loss_after_a_no_grad_solve_in_one_autocast_region_reaches_the_weights():
    grads = {}
    for cache in (True, False):
        torch.manual_seed(0)
        cell, x = Cell(), torch.randn(2, 4, 6, 6)
        f = lambda z, cell=cell, x=x: cell(z, x)  # noqa: E731
        deq = wt.DEQ(f_tol=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            with torch.no_grad():
                z, _ = deq(f, torch.zeros(2, 4, 6, 6))
            torch.manual_seed(1)  # the probes
            deq.jacobian_loss(f, z).backward()
        grads[cache] = {n: p.grad for n, p in cell.named_parameters() if "weight" in n}
    for name, ref in grads[False].items():
        assert grads[True][name] is not None and ref.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("z0_dtype", [torch.float32, torch.bfloat16])
def test_z_star_has_z0s_dtype_in_every_grad_mode_under_autocast(z0_dtype):
    lin = torch.nn.Linear(6, 6)  # under bf16 autocast f returns bf16, whatever z's dtype
    x = torch.randn(3, 6)
    for grad in ("ift", "phantom", "unroll"):
        deq = wt.DEQ(f_tol=1e-2, f_max_iter=10, grad=grad)
        for autograd in (True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(autograd):
                z, _ = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros(3, 6, dtype=z0_dtype))
            assert z.dtype == z0_dtype, (grad, autograd)


@pytest.mark.parametrize("kwargs, match", [
    ({"grad": "exact"}, r"grad must be one of \['ift', 'phantom', 'unroll'\]"),
    ({"f_solver": "newton"}, "valid solvers"), ({"b_solver": "x"}, "valid solvers"),
    ({"f_opts": {"history": 3}}, "valid options"), ({"b_opts": {"tau": 0.5}}, "valid options"),
    ({"f_max_iter": 0}, "f_max_iter"), ({"b_tol": 0}, "b_tol"), ({"tau": 1.5}, "tau"),
    ({"phantom_steps": 0}, "phantom_steps"), ({"stop_mode": "max"}, "stop_mode"),
    ({"eval_f_max_iter": 0}, "eval_f_max_iter"), ({"jac_reg": 1}, "jac_reg"),
    ({"b_opts": {"beta": 2.0}}, "beta"), ({"f_opts": {"m": 0}}, "m must"),
    ({"f_opts": [("m", 3)]}, "must be a dict"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wt.DEQ(**kwargs)


def test_z0_must_be_a_tensor_and_opts_may_be_reset_to_none():
    with pytest.raises(ValueError, match="z0 must be a tensor of shape"):
        wt.DEQ()(lambda z: 0.5 * z, [[0.0]])
    deq = wt.DEQ(f_opts={"m": 2})
    deq.f_opts = deq.b_opts = None  # as the constructor accepts: no options
    z, stats = deq(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3))
    assert stats.converged.all() and deq.f_opts == {} and deq.b_opts == {}


def test_solver_options_are_used():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=g))[0]
    A = Q @ torch.diag(torch.linspace(0, 0.95, 20)) @ Q.T

    def f(z):
        return z @ A.T + 1.0

    z0 = torch.zeros(2, 20)
    _, m1 = wt.DEQ(f_opts={"m": 1}, f_tol=1e-6, f_max_iter=200)(f, z0)
    _, m5 = wt.DEQ(f_opts={"m": 5}, f_tol=1e-6, f_max_iter=200)(f, z0)
    assert m5.n_iter < m1.n_iter


def test_settings_changed_after_construction_are_checked_on_every_call():
    f, z0 = (lambda z: 0.5 * z + 1.0), torch.zeros(2, 3)
    for field, value, match in [("grad", "bogus", "grad must be one of"),
                                ("f_max_iter", 0, "f_max_iter"),
                                ("b_opts", {"beta": 2.0}, "beta"),
                                ("f_solver", "newton", "valid solvers")]:
        deq = wt.DEQ()
        setattr(deq, field, value)
        with pytest.raises(ValueError, match=match):
            deq(f, z0)
    with pytest.raises(ValueError, match="jac_reg must be a bool"):
        wt.DEQ()(f, z0, jac_reg="yes")


def _second_derivative_problem(grad):
    # z* = a z* + x^2  =>  z* = x^2 / (1 - a);  d2 z*/(dx da) = 2x / (1 - a)^2 = 8 at a=.5, x=1
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x = torch.ones(1, 1, dtype=F64, requires_grad=True)
    z, _ = tight(grad=grad)(lambda z: a * z + x ** 2, torch.zeros(1, 1, dtype=F64))
    (gx,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    return a, gx


def test_ift_refuses_higher_order_gradients_unroll_gives_them():
    a, gx = _second_derivative_problem("unroll")
    (gxa,) = torch.autograd.grad(gx.sum(), a)
    torch.testing.assert_close(gxa, torch.tensor(8.0, dtype=F64))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        _second_derivative_problem("ift")
    _, gx = _second_derivative_problem("phantom")  # the phantom map's own derivatives
    assert torch.isfinite(gx).all()


def test_unroll_detaches_z0_stops_diverging_samples_and_returns_f_at_the_best_iterate():
    s, b = torch.tensor([0.5, 3.0]), torch.ones(2, 4)
    z0 = torch.zeros(2, 4, requires_grad=True)
    w = torch.ones((), requires_grad=True)
    z, stats = wt.DEQ(f_max_iter=200, f_tol=1e-6, grad="unroll", stop_mode="abs")(
        lambda z: w * s[:, None] * z + b, z0)
    assert stats.converged.tolist() == [True, False] and stats.diverged.tolist() == [False, True]
    assert int(stats.nstep[1]) < 20  # stopped, not iterated to the budget
    torch.testing.assert_close(z[0], torch.full((4,), 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[1], torch.ones(4))  # f at its lowest-residual iterate, z0
    z.sum().backward()
    assert z0.grad is None and w.grad is not None


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_map_ignoring_z_gives_gradients_regulariser_and_radius(grad):
    W = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    deq = wt.DEQ(grad=grad)
    z, stats = deq(lambda z: x @ W, torch.zeros(2, 3), jac_reg=True)
    (z.sum() + stats.jac_loss).backward()
    torch.testing.assert_close(W.grad, x.sum(0)[:, None].expand(3, 3).contiguous())
    assert float(stats.jac_loss) == 0.0
    assert deq.spectral_radius(lambda z: x @ W, z).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("n_iter", [19, 20, 21])
def test_spectral_radius_of_a_complex_pair(n_iter):
    A = torch.tensor([[0.0, 1.0], [-0.81, 0.0]], dtype=F64)  # eigenvalues +-0.9i
    r = wt.DEQ().spectral_radius(lambda z: z @ A.T, torch.zeros(1, 2, dtype=F64), n_iter=n_iter)
    torch.testing.assert_close(r, torch.tensor([0.9], dtype=F64), rtol=0.02, atol=0)


def test_unroll_from_a_converged_warm_start_is_still_differentiable():
    w = torch.tensor(0.5, requires_grad=True)
    x = torch.ones(3, 4)
    f = lambda z: w * z + x  # noqa: E731
    warm, _ = wt.DEQ(f_tol=1e-7, f_max_iter=100)(f, torch.zeros(3, 4))
    z, stats = wt.DEQ(grad="unroll", f_tol=1e-4)(f, warm.detach())
    assert stats.nstep.tolist() == [1, 1, 1] and z.requires_grad
    (gw,) = torch.autograd.grad(z.sum(), w)
    torch.testing.assert_close(gw, torch.tensor(12 * 2.0), rtol=1e-3, atol=0)  # dz*/dw = x/(1-w)^2


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_a_diverging_sample_does_not_poison_the_others_gradients(grad):
    w = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor([[0.0], [0.1], [2.0]])  # sample 2: 0.1 exp(z) + 2 has no fixed point
    z, stats = wt.DEQ(grad=grad, f_max_iter=40, f_tol=1e-6)(
        lambda z: 0.1 * torch.exp(w * z) + x, torch.zeros(3, 1))
    assert stats.converged.tolist() == [True, True, False] and torch.isfinite(z).all()
    z[:2].sum().backward()
    assert torch.isfinite(w.grad) and w.grad > 0


def test_ift_output_may_be_modified_in_place():
    lin = nn.Linear(4, 4)
    z, _ = wt.DEQ()(lambda z: 0.3 * torch.tanh(lin(z)), torch.zeros(2, 4))
    z.add_(1.0)
    z.relu_().sum().backward()
    assert lin.weight.grad is not None


def test_regulariser_and_radius_refuse_inference_mode_and_accept_its_tensors():
    deq = wt.DEQ()
    with torch.inference_mode():
        z = torch.ones(3, 5)
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            deq.spectral_radius(lambda z: 0.7 * z, z)
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            deq.jacobian_loss(lambda z: 0.7 * z, z)
    r = deq.spectral_radius(lambda z: 0.7 * z, z)  # an inference tensor, used outside
    torch.testing.assert_close(r, torch.full((3,), 0.7))


def test_a_diverging_backward_solve_warns_once_per_deq():
    # f = 1.5 z + x: Anderson finds z* = -2 x, but plain iteration of the adjoint
    # u <- 1.5 u + grad runs away: the gradient is unreliable and the user is told so
    x = torch.tensor([[1.0], [2.0]], dtype=F64, requires_grad=True)
    deq = wt.DEQ(f_solver="anderson", b_solver="fixed_point", f_tol=1e-10, b_max_iter=30)
    z, stats = deq(lambda z: 1.5 * z + x, torch.zeros(2, 1, dtype=F64))
    assert stats.converged.all()
    torch.testing.assert_close(z, -2 * x.detach())
    message = r"diverged for some samples \(b_solver='fixed_point'\)"
    with pytest.warns(RuntimeWarning, match=message):
        z.sum().backward()
    assert deq.last_backward_stats.diverged.all()
    with warnings.catch_warnings():  # once per DEQ: the next backward is silent
        warnings.simplefilter("error")
        z, _ = deq(lambda z: 1.5 * z + x, torch.zeros(2, 1, dtype=F64))
        z.sum().backward()
    assert deq.last_backward_stats.diverged.all()
    # Anderson solves the same (non-contractive but linear) adjoint: exact gradient, no warning
    x.grad = None
    deq.b_solver = "anderson"
    z, _ = deq(lambda z: 1.5 * z + x, torch.zeros(2, 1, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 1), -2.0, dtype=F64))


def test_eval_under_inference_mode_then_training_keeps_working():
    cell = nn.Linear(6, 6).double()
    with torch.no_grad():
        cell.weight.mul_(0.3 / torch.linalg.matrix_norm(cell.weight, ord=2))
    x = torch.randn(4, 6, dtype=F64)
    deq = wt.DEQ(f_solver="anderson", b_solver="anderson")
    with torch.inference_mode():
        z_eval, _ = deq(lambda z: torch.tanh(cell(z) + x), torch.zeros(4, 6, dtype=F64))
    z, stats = deq(lambda z: torch.tanh(cell(z) + x), torch.zeros(4, 6, dtype=F64))
    z.square().sum().backward()
    assert stats.converged.all() and cell.weight.grad is not None
    assert torch.isfinite(cell.weight.grad).all()


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
@pytest.mark.parametrize("budget", [1, 3, 50])
def test_output_is_the_same_with_autograd_on_and_off(grad, budget):
    # evaluation (no_grad) must compute the function that training differentiates, converged
    # or not: with budget 1 the output is f(z0), never z0 itself
    torch.manual_seed(0)
    W, x = nn.Linear(4, 4).double(), torch.randn(3, 4, dtype=F64)
    f = lambda z: torch.tanh(W(z) + x)  # noqa: E731
    deq = wt.DEQ(grad=grad, f_max_iter=budget, f_solver="anderson", f_tol=1e-8)
    with torch.no_grad():
        off, _ = deq(f, torch.zeros(3, 4, dtype=F64))
    on, _ = deq(f, torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(off, on.detach(), rtol=1e-12, atol=1e-12)
    assert off.abs().sum() > 0
    if budget == 1 and grad != "phantom":  # phantom: its damped steps from z0
        torch.testing.assert_close(off, f(torch.zeros(3, 4, dtype=F64)).detach())


def test_unroll_takes_the_divergence_rule_from_f_opts():
    # a contraction (spectral radius 0.9) with a large transient: the default rule stops it as
    # diverged, and div_factor=inf in f_opts must reach "unroll" too (it was ignored)
    J = torch.tensor([[0.9, 50.0], [0.0, 0.9]], dtype=F64, requires_grad=True)
    b = torch.ones(2, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(2, dtype=F64) - J.detach(), b)
    z0 = (z_star + torch.tensor([0.0, 1e-2], dtype=F64)).expand(2, 2).clone()
    f = lambda z: z @ J.T + b  # noqa: E731
    _, stats = wt.DEQ(grad="unroll", f_max_iter=300, f_tol=1e-8)(f, z0)
    assert stats.diverged.all()
    deq = wt.DEQ(grad="unroll", f_max_iter=300, f_tol=1e-8, f_opts={"div_factor": math.inf})
    z, stats = deq(f, z0)
    assert stats.converged.all() and not stats.diverged.any()
    torch.testing.assert_close(z.detach(), z_star.expand(2, 2), rtol=1e-6, atol=0)  # |z*| ~ 5e3


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_inference_output_does_not_alias_a_reused_output_buffer_of_f(grad):
    buf = torch.empty(2, 3)

    def f(z):  # returns the same buffer on every call (allowed for the solvers)
        return torch.add(0.5 * z, 1.0, out=buf)

    deq = wt.DEQ(f_tol=1e-8, f_max_iter=60, grad=grad)
    with torch.no_grad():
        z1, _ = deq(f, torch.zeros(2, 3))
        f(torch.full((2, 3), 7.0))  # the buffer now holds 4.5
    torch.testing.assert_close(z1, torch.full((2, 3), 2.0), atol=1e-6, rtol=0)
    # unroll kept f(z0) by reference: with a budget of 1 it returned the buffer itself, and a
    # sample whose residual never fell got whatever f wrote last
    deq = wt.DEQ(f_max_iter=1, grad=grad, phantom_steps=1)
    with torch.no_grad():
        z1, _ = deq(f, torch.zeros(2, 3))  # f(z0) = 1 in every mode
        f(torch.full((2, 3), 7.0))
    torch.testing.assert_close(z1, torch.ones(2, 3), atol=0, rtol=0)
    if grad == "unroll":  # z <- 1 - z from 0: residual 1 at every step, f(z0) = 1 is the output
        deq = wt.DEQ(f_max_iter=4, grad=grad)
        with torch.no_grad():
            z1, _ = deq(lambda z: torch.sub(1.0, z, out=buf), torch.zeros(2, 3))
        torch.testing.assert_close(z1, torch.ones(2, 3), atol=0, rtol=0)


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_the_callers_z0_is_never_written(grad):
    # unroll handed the caller's z0 itself to f at its first step (the solvers pass a copy)
    def f(z):
        return 0.5 * torch.tanh(torch.relu_(z)) + 1.0

    z0 = -torch.ones(2, 3)
    with torch.no_grad():
        wt.DEQ(grad=grad)(f, z0)
    assert (z0 == -1).all()
    if grad == "unroll":  # ift/phantom differentiate f at a leaf: in-place ops are refused there
        wt.DEQ(grad=grad)(f, z0)
        assert (z0 == -1).all()


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_f_returning_its_argument_written_in_place_is_refused(grad):
    # unroll recorded the residual of z.mul_(0.5).add_(1) against itself: 0, "converged"
    for mode in (torch.enable_grad, torch.no_grad):
        with mode(), pytest.raises(ValueError, match="modified its argument in place"):
            wt.DEQ(grad=grad)(lambda z: z.mul_(0.5).add_(1.0), torch.zeros(2, 3))


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_diverged_samples_come_back_from_their_start_in_every_grad_mode(grad):
    # plain iteration of an expansive map (spectral radius 1.5) from z0 = 0: the lowest-rel
    # iterate is a runaway; every mode returns f(z0) for those samples (their start had the
    # lower absolute residual), with stats to match
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    A = (1.5 * Q).requires_grad_()
    x = torch.randn(4, 6, dtype=F64)
    f = lambda z: z @ A.T + x  # noqa: E731
    deq = wt.DEQ(grad=grad, f_solver="fixed_point", f_max_iter=40, tau=1.0)
    z, stats = deq(f, torch.zeros(4, 6, dtype=F64))
    assert stats.diverged.all()
    # phantom: a diverged sample restarts every step from its solver iterate: one step in effect
    torch.testing.assert_close(z.detach(), x)
    torch.testing.assert_close(stats.abs_lowest, x.norm(dim=1))
    torch.testing.assert_close(stats.rel_lowest, torch.ones(4, dtype=F64), rtol=1e-7, atol=0)


def test_float64_estimates_keep_float64_precision():
    deq = wt.DEQ()
    z = torch.ones(2, 5, dtype=F64)
    r = deq.spectral_radius(lambda z: 0.9 * z, z)
    assert r.dtype == F64 and (r - 0.9).abs().max() < 1e-12
    loss = deq.jacobian_loss(lambda z: 0.9 * z, z)  # ||J||_F^2 / numel = 0.81 exactly
    assert loss.dtype == F64 and abs(loss.item() - 0.81) < 1e-12


@pytest.mark.parametrize("other", ["phantom", "unroll"])
def test_last_backward_stats_is_cleared_by_a_mode_without_an_adjoint_solve(other):
    x = torch.tensor([[1.0], [2.0]], dtype=F64, requires_grad=True)
    deq = wt.DEQ(f_tol=1e-10, b_tol=1e-10)
    z, _ = deq(lambda z: 0.5 * z + x, torch.zeros(2, 1, dtype=F64))
    z.sum().backward()
    assert deq.last_backward_stats.converged.all()
    deq.grad = other  # the ift stats no longer describe this module's gradients
    z, _ = deq(lambda z: 0.5 * z + x, torch.zeros(2, 1, dtype=F64))
    z.sum().backward()
    assert deq.last_backward_stats is None
