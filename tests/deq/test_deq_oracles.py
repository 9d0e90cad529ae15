"""wt.DEQ: oracles (dense implicit gradients, finite differences, hand-written
iterations, closed forms, numpy eigenvalues) on cases the earlier DEQ tests leave out."""

import math
import warnings

import numpy as np
import pytest
import torch

import wtmodels as wt

F64 = torch.float64
torch.set_num_threads(1)


def scaled(shape, norm2, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=g, dtype=F64)
    return norm2 * A / torch.linalg.matrix_norm(A, 2)


def conv_like(Wm, bias, x):
    """z (B, C, H, W) -> tanh(W vec(z) + bias + x): a dense 'conv' over the flattened sample."""
    return lambda z: torch.tanh((z.reshape(z.shape[0], -1) @ Wm.T + bias).reshape(z.shape) + x)


def sample_jacobian(Wm, bias, xb, zb):
    """Dense (D, D) Jacobian of conv_like at one sample ``zb`` with input ``xb`` (1, ...)."""
    return torch.autograd.functional.jacobian(
        lambda v: conv_like(Wm, bias, xb)(v.reshape(xb.shape)).reshape(-1), zb.reshape(-1))


def dense_ift_oracle(Wm, bias, x, c, iters=3000):
    """Gradients of sum(c * z*) w.r.t. (Wm, bias, x) by a dense solve of (I - J)^T u = c per
    sample (J from torch.autograd.functional.jacobian at an exact z*)."""
    B, D = x.shape[0], x[0].numel()
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(iters):
            z = conv_like(Wm, bias, x)(z)
    us = []
    for b in range(B):
        J = sample_jacobian(Wm, bias, x[b:b + 1], z[b])
        us.append(torch.linalg.solve((torch.eye(D, dtype=F64) - J).T, c[b].reshape(-1)))
    u = torch.stack(us).reshape(x.shape)
    zz = z.clone().requires_grad_()
    out = conv_like(Wm, bias, x)(zz)
    return z, torch.autograd.grad(out, (Wm, bias, x), u)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("b_solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("z0_requires_grad", [False, True])
def test_ift_4d_matches_dense_implicit_gradient(B, b_solver, stop_mode, z0_requires_grad):
    C, H, W = 2, 2, 2
    D = C * H * W
    Wm = scaled((D, D), 0.6, 1).requires_grad_()
    bias = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(2),
                       requires_grad=True)
    x = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    c = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(4))
    z_exact, want = dense_ift_oracle(Wm, bias, x, c)
    deq = wt.DEQ(f_tol=1e-12, f_max_iter=200, b_solver=b_solver, b_tol=1e-12, b_max_iter=300,
                 stop_mode=stop_mode)
    z0 = torch.zeros(B, C, H, W, dtype=F64, requires_grad=z0_requires_grad)
    z, stats = deq(conv_like(Wm, bias, x), z0)
    got = torch.autograd.grad((z * c).sum(), (Wm, bias, x))
    torch.testing.assert_close(z.detach(), z_exact, rtol=0, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert stats.converged.all() and deq.last_backward_stats.converged.all()
    assert deq.last_backward_stats.batch_size == B


def linear_problem(D=6, rho=0.9, seed=0):
    A = scaled((D, D), rho, seed)
    x = torch.randn(1, D, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    I = torch.eye(D, dtype=F64)
    z = torch.linalg.solve(I - A, x[0])
    # d sum(z*) / dA = (I - A)^-T 1  z*^T
    grad_A = torch.outer(torch.linalg.solve((I - A).T, torch.ones(D, dtype=F64)), z)
    return A, x, grad_A


@pytest.mark.parametrize("b_solver", ["anderson", "fixed_point"])
@pytest.mark.parametrize("scale", [1.0, 1e-12])
def test_ift_rel_backward_does_not_depend_on_loss_scale(b_solver, scale):
    # README: with stop_mode="rel" (the default) the adjoint solve "does not depend on the
    # loss's scale". The solvers' rel residual is abs / (||f|| + 1e-8): a per-sample gradient
    # far below 1e-8 (a loss scaled by 1e-12) was read as converged after a few steps, with a
    # relative gradient error of ~3e-3 instead of ~1e-7
    A, x, want = linear_problem()
    Ap = A.clone().requires_grad_()
    deq = wt.DEQ(f_tol=1e-10, f_max_iter=500, b_solver=b_solver, b_tol=1e-6, b_max_iter=500)
    z, _ = deq(lambda z: z @ Ap.T + x, torch.zeros(1, 6, dtype=F64))
    g = torch.autograd.grad(scale * z.sum(), Ap)[0] / scale
    assert float((g - want).norm() / want.norm()) < 1e-5
    bst = deq.last_backward_stats
    assert bst.converged.all() and float(bst.rel_lowest.max()) <= 1e-6
    # the reported absolute residual is that of the adjoint the loss produced (its scale)
    u_norm = float(torch.linalg.solve((torch.eye(6, dtype=F64) - A).T,
                                      torch.ones(6, dtype=F64)).norm()) * scale
    assert float(bst.abs_lowest.max()) <= 2e-6 * u_norm


def test_ift_abs_backward_follows_loss_scale():
    # "abs": b_tol bounds the adjoint residual itself, so a loss x 1e6 needs more steps
    A, x, want = linear_problem()
    Ap = A.clone().requires_grad_()
    steps = {}
    for scale in (1.0, 1e6):
        deq = wt.DEQ(f_solver="fixed_point", f_tol=1e-10, f_max_iter=500, b_solver="fixed_point",
                     b_tol=1e-4, b_max_iter=2000, stop_mode="abs")
        z, _ = deq(lambda z: z @ Ap.T + x, torch.zeros(1, 6, dtype=F64))
        g = torch.autograd.grad(scale * z.sum(), Ap)[0] / scale
        bst = deq.last_backward_stats
        assert bst.converged.all() and float(bst.abs_lowest.max()) <= 1e-4
        steps[scale] = int(bst.nstep[0])
        assert float((g - want).norm()) * scale <= 1e-2 * float(want.norm()) * scale + 1e-2
    assert steps[1e6] > steps[1.0] + 10


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_forward_stop_mode_iteration_count_closed_form(stop_mode):
    # z <- 0.9 z + 1000 from 0: z_k = 1e4 (1 - 0.9^k), abs residual at z_k = 1000 * 0.9^k,
    # rel = 1000 * 0.9^k / z_{k+1}; plain iteration stops after k + 1 evaluations at the
    # first k whose residual is <= tol
    tol = 1e-3
    deq = wt.DEQ(f_solver="fixed_point", f_tol=tol, f_max_iter=500, stop_mode=stop_mode)
    _, stats = deq(lambda z: 0.9 * z + 1000.0, torch.zeros(1, 1, dtype=F64))

    def res(k):
        a = 1000 * 0.9 ** k
        return a if stop_mode == "abs" else a / (1e4 * (1 - 0.9 ** (k + 1)) + 1e-8)

    k = next(k for k in range(500) if res(k) <= tol)
    assert int(stats.nstep[0]) == k + 1


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_eval_budget_used_under_eval_and_parent_eval(grad):
    # z <- 0.9 z + 1 from 0: z_k = 10 (1 - 0.9^k); a budget of n gives f(z_{n-1}) = z_n for
    # "ift"/"unroll", and phantom_steps steps from z_{n-1} (z_{n+1} for 2) for "phantom"
    deq = wt.DEQ(f_solver="fixed_point", f_max_iter=3, eval_f_max_iter=7, f_tol=1e-12,
                 grad=grad, phantom_steps=2)
    parent = torch.nn.ModuleDict({"deq": deq})
    extra = 1 if grad == "phantom" else 0
    for mode, n in (("train", 3), ("eval", 7)):
        getattr(parent, mode)()
        for ctx in (torch.enable_grad, torch.no_grad):
            with ctx():
                z, stats = deq(lambda z: 0.9 * z + 1, torch.zeros(2, 3, dtype=F64))
            assert stats.nstep.tolist() == [n, n]
            want = 10 * (1 - 0.9 ** (n + extra))
            torch.testing.assert_close(z.detach(), torch.full((2, 3), want, dtype=F64))


@pytest.mark.parametrize("steps,tau", [(1, 1.0), (3, 0.5), (7, 0.3)])
def test_phantom_equals_damped_steps_by_hand(steps, tau):
    B, C, H, W = 2, 2, 2, 2
    A = scaled((8, 8), 0.7, 5).requires_grad_()
    x = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(6),
                    requires_grad=True)
    f = conv_like(A, torch.zeros(8, dtype=F64), x)
    c = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(7))
    deq = wt.DEQ(grad="phantom", phantom_steps=steps, tau=tau, f_max_iter=4, f_tol=1e-12)
    z, _ = deq(f, torch.zeros(B, C, H, W, dtype=F64))
    got = torch.autograd.grad((z * c).sum(), (A, x))
    zs, _ = wt.solve(f, torch.zeros(B, C, H, W, dtype=F64), method="anderson", max_iter=4,
                     tol=1e-12)
    zz = zs.detach()
    for _ in range(steps):
        zz = (1 - tau) * zz + tau * f(zz)
    want = torch.autograd.grad((zz * c).sum(), (A, x))
    torch.testing.assert_close(z.detach(), zz.detach(), rtol=0, atol=1e-14)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_unroll_equals_hand_iteration_with_per_sample_stop():
    # z <- r_b z + 1 per sample; each sample stops at the first iterate within tol (rel), and
    # its output is f there; gradients by hand-written autograd through the same steps
    r = torch.tensor([[0.3], [0.9]], dtype=F64, requires_grad=True)
    tol = 1e-3
    deq = wt.DEQ(grad="unroll", f_max_iter=200, f_tol=tol)
    z, stats = deq(lambda z: r * z + 1, torch.zeros(2, 3, dtype=F64))
    g = torch.autograd.grad(z.sum(), r)[0]
    for b in range(2):
        rb = r[b:b + 1].detach().clone().requires_grad_()
        zz = torch.zeros(1, 3, dtype=F64)
        for k in range(200):
            fz, n = rb * zz + 1, k + 1
            if (fz - zz).norm() / (fz.norm() + 1e-8) <= tol:
                break
            zz = fz
        assert int(stats.nstep[b]) == n
        torch.testing.assert_close(z[b:b + 1].detach(), fz.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(g[b:b + 1], torch.autograd.grad(fz.sum(), rb)[0],
                                   rtol=1e-12, atol=0)


def test_jac_loss_unbiased_against_dense_frobenius_norm():
    B, C, H, W = 2, 2, 2, 2
    A = scaled((8, 8), 0.9, 8)
    x = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(9))
    f = conv_like(A, torch.zeros(8, dtype=F64), x)
    z = torch.randn(B, C, H, W, dtype=F64, generator=torch.Generator().manual_seed(10))
    exact = np.mean([float(sample_jacobian(A, torch.zeros(8, dtype=F64), x[b:b + 1], z[b])
                           .square().sum()) / 8 for b in range(B)])
    torch.manual_seed(0)
    est = float(wt.DEQ(jac_reg_samples=4000).jacobian_loss(f, z).detach())
    assert abs(est / exact - 1) < 0.03  # Hutchinson std here ~0.6% at 4000 probes


@pytest.mark.parametrize("n", [1, 3, 6])
def test_jac_loss_and_its_gradient_for_diagonal_jacobian(n):
    # f = s tanh(z) + x has a diagonal Jacobian, for which a Rademacher probe is exact:
    # jac_loss = mean(s^2 (1 - tanh(z)^2)^2) at the point the output comes from
    # ("unroll": z_{n-1}, differentiated through the iterations; "ift": z*, a constant)
    x = torch.randn(2, 1, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(11))
    s = torch.tensor(0.8, dtype=F64, requires_grad=True)
    f = lambda z: s * torch.tanh(z) + x  # noqa: E731
    jl = lambda z: (s ** 2 * (1 - torch.tanh(z) ** 2) ** 2).mean()  # noqa: E731
    _, st = wt.DEQ(grad="unroll", f_max_iter=n, f_tol=1e-15, jac_reg=True)(f, torch.zeros_like(x))
    zz = torch.zeros_like(x)
    for _ in range(n - 1):
        zz = f(zz)
    ref = jl(zz)
    torch.testing.assert_close(st.jac_loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(st.jac_loss, s)[0],
                               torch.autograd.grad(ref, s)[0], rtol=1e-10, atol=0)
    _, st = wt.DEQ(f_max_iter=100, f_tol=1e-13, jac_reg=True)(f, torch.zeros_like(x))
    zs = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(200):
            zs = f(zs)
    ref = jl(zs)
    torch.testing.assert_close(st.jac_loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.autograd.grad(st.jac_loss, s)[0],
                               torch.autograd.grad(ref, s)[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_against_numpy_eigvals_4d(seed):
    B, C, H, W = 2, 2, 2, 2
    M = torch.randn(B, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 0.4
    g = lambda z: torch.einsum("bij,bj->bi", M, z.reshape(B, -1)).reshape(z.shape)  # noqa: E731
    torch.manual_seed(seed)
    r = wt.DEQ().spectral_radius(g, torch.randn(B, C, H, W, dtype=F64), n_iter=200)
    want = [np.abs(np.linalg.eigvals(M[b].numpy())).max() for b in range(B)]
    np.testing.assert_allclose(r.numpy(), want, rtol=1e-4)


def test_chained_deqs_against_finite_differences():
    D = 4
    A1 = scaled((D, D), 0.5, 12).requires_grad_()
    A2 = scaled((D, D), 0.5, 13).requires_grad_()
    xin = torch.randn(3, D, dtype=F64, generator=torch.Generator().manual_seed(14),
                      requires_grad=True)
    deq = wt.DEQ(f_tol=1e-13, b_tol=1e-13, f_max_iter=200, b_max_iter=200)
    z1, _ = deq(lambda z: torch.tanh(z @ A1.T + xin), torch.zeros(3, D, dtype=F64))
    z2, _ = deq(lambda z: torch.tanh(z @ A2.T + z1), torch.zeros(3, D, dtype=F64))
    got = torch.autograd.grad((z2 ** 3).sum(), (A1, A2, xin))

    def solve(A, inp):
        z = torch.zeros_like(inp)
        for _ in range(200):
            z = torch.tanh(z @ A.T + inp)
        return z

    def loss(a1, a2, x):
        return float((solve(a2, solve(a1, x)) ** 3).sum())

    base = [A1.detach(), A2.detach(), xin.detach()]
    for i, g in enumerate(got):
        fd = torch.zeros_like(g)
        for idx in np.ndindex(*g.shape):
            args = [t.clone() for t in base]
            args[i][idx] += 1e-6
            lp = loss(*args)
            args[i][idx] -= 2e-6
            fd[idx] = (lp - loss(*args)) / 2e-6
        torch.testing.assert_close(g, fd, rtol=0, atol=1e-8)


def test_solver_options_honored_forward_and_backward():
    # f = a z + 1 with a = -2: plain iteration diverges forward and backward, damped
    # iteration (tau 0.2: factor 0.8 - 0.4 = 0.4) converges; z* = 1/3, d sum(z*)/da = 2/9
    a = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    common = dict(f_solver="fixed_point", b_solver="fixed_point", f_tol=1e-12, b_tol=1e-12,
                  f_max_iter=300, b_max_iter=300)
    deq = wt.DEQ(f_opts={"tau": 0.2}, b_opts={"tau": 0.2}, **common)
    z, st = deq(lambda z: a * z + 1, torch.zeros(1, 2, dtype=F64))
    g = torch.autograd.grad(z.sum(), a)[0]
    assert st.converged.all() and deq.last_backward_stats.converged.all()
    torch.testing.assert_close(z.detach(), torch.full((1, 2), 1 / 3, dtype=F64))
    torch.testing.assert_close(g, torch.tensor(2 / 9, dtype=F64))
    deq = wt.DEQ(f_opts={"tau": 0.2}, **common)
    z, _ = deq(lambda z: a * z + 1, torch.zeros(1, 2, dtype=F64))
    with pytest.warns(RuntimeWarning, match="backward .adjoint. solve diverged"):
        g = torch.autograd.grad(z.sum(), a)[0]
    assert deq.last_backward_stats.diverged.all()
    # the diverged adjoint falls back to dL/dz* itself: the Jacobian-free gradient sum(z*)
    torch.testing.assert_close(g, torch.tensor(2 / 3, dtype=F64))


def test_non_contractive_flags_and_backward_reports():
    a = torch.tensor(2.0, dtype=F64, requires_grad=True)
    f = lambda z: a * z + 1  # noqa: E731  (rho = 2: plain iteration runs away)
    for grad in ("ift", "phantom", "unroll"):
        z, st = wt.DEQ(grad=grad, f_solver="fixed_point", f_max_iter=40)(
            f, torch.zeros(3, 4, dtype=F64))
        assert st.diverged.all() and not st.converged.any()
        # the start is the best iterate: the output is f(z0) = 1 (one step for "phantom"
        # too: a diverged sample restarts each phantom step from its solver iterate)
        torch.testing.assert_close(z.detach(), torch.ones(3, 4, dtype=F64))
        assert float(torch.autograd.grad(z.sum(), a)[0]) == 0.0  # d f(0) / da = 0
    # Anderson solves the linear problem: z* = -1, exact gradient sum 1/(a-1)^2 = 12
    deq = wt.DEQ(b_solver="fixed_point")
    z, st = deq(f, torch.zeros(3, 4, dtype=F64))
    assert st.converged.all()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.autograd.grad(z.sum(), a)
        z, _ = deq(f, torch.zeros(3, 4, dtype=F64))
        torch.autograd.grad(z.sum(), a)
    assert sum(issubclass(x.category, RuntimeWarning) for x in w) == 1  # once per module
    assert deq.last_backward_stats.diverged.all()
    # a backward that only runs out of budget is not warned about, but reported
    deq = wt.DEQ(b_solver="broyden", b_max_iter=2)
    z, _ = deq(f, torch.zeros(3, 4, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(z.sum(), a)
    bst = deq.last_backward_stats
    assert not bst.converged.any() and not bst.diverged.any()
    deq = wt.DEQ(b_solver="anderson", b_tol=1e-12)
    z, _ = deq(f, torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(torch.autograd.grad(z.sum(), a)[0],
                               torch.tensor(12.0, dtype=F64))


BAD = [("f_solver", "x", "anderson"), ("b_solver", None, "broyden"), ("grad", "IFT", "phantom"),
       ("stop_mode", "Rel", "abs"), ("f_max_iter", 0, ">= 1"), ("b_max_iter", 1.0, ">= 1"),
       ("phantom_steps", True, ">= 1"), ("tau", 0, "(0.0, 1.0]"), ("tau", math.nan, "number"),
       ("f_tol", math.inf, "(0.0, inf)"), ("b_tol", "1e-6", "number"),
       ("eval_f_max_iter", 2.5, ">= 1"), ("f_opts", {"tau": 0.5}, "'m'"),
       ("b_opts", {"m": 0}, ">= 1"), ("f_opts", [("m", 3)], "dict"),
       ("jac_reg", 1, "bool"), ("jac_reg_samples", 0, ">= 1")]


@pytest.mark.parametrize("name,value,hint", BAD)
def test_bad_settings_raise_at_construction_and_on_call(name, value, hint):
    with pytest.raises(ValueError, match=None if "opts" in name else name) as e:
        wt.DEQ(**{name: value})
    assert hint in str(e.value)
    deq = wt.DEQ()
    setattr(deq, name, value)  # changed after construction: the next call checks it
    with pytest.raises(ValueError) as e:
        deq(lambda z: 0.5 * z, torch.zeros(2, 3))
    assert hint in str(e.value)


def test_bad_call_arguments():
    deq = wt.DEQ()
    with pytest.raises(ValueError, match="valid: \\['jac_reg'\\]"):
        deq(lambda z: 0.5 * z, torch.zeros(2, 3), jac=True)
    with pytest.raises(ValueError, match="f_max_iter"):
        wt.DEQ(max_iter=3)
    with pytest.raises(ValueError, match="f_opts / b_opts"):
        wt.DEQ(m=3)
    with pytest.raises(ValueError, match=">= 1"):
        deq.spectral_radius(lambda z: 0.5 * z, torch.zeros(2, 3), n_iter=0)
