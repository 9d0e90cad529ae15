"""A seeded random sweep of ``wt.DEQ`` over combinations of its settings, against dense oracles.

The hand-written DEQ tests pin each feature on its own; this file draws combinations of them
(grad mode x stop mode x forward / backward solver x dtype x state shape x train / eval budget
x a non-contractive neighbour sample x ``z0`` requiring grad) and checks the invariants that
must hold in every one. The known answers are computed apart, densely, in float64: the fixed
point by Newton's method, the implicit gradient by solving ``(I - J)^T u = w`` with
``torch.linalg.solve``, and, for affine maps, the point ``p`` that ``z_star = f(p)`` was taken
at, recovered by inverting the map (so the reported residuals can be checked against it).
A randomized sweep of a few thousand such cases (a scratch script) found no violation; these
64 keep the cross-product guarded in a few seconds.
"""

import numpy as np
import pytest
import torch

import wtmodels as wt

F64 = torch.float64
CASES = 64


def _draw(rng):
    return dict(
        grad=str(rng.choice(["ift", "phantom", "unroll"])),
        stop_mode=str(rng.choice(["abs", "rel"])),
        f_solver=str(rng.choice(["anderson", "broyden", "fixed_point"])),
        b_solver=str(rng.choice(["anderson", "broyden", "fixed_point"])),
        dtype=torch.float64 if rng.random() < 0.5 else torch.float32,
        shape=[(), (3,), (2, 2, 2)][int(rng.integers(3))],  # (B,), (B, n), (B, C, H, W)
        B=int(rng.choice([1, 3])),
        tanh=bool(rng.random() < 0.5),
        L=float(rng.choice([0.3, 0.6])),
        bad=str(rng.choice(["none", "unstable", "no_fixed_point"])),
        eval=bool(rng.random() < 0.3),
        eval_budget=int(rng.choice([3, 40])),
        z0_requires_grad=bool(rng.random() < 0.3),
    )


def _case(seed):
    rng = np.random.default_rng(seed)
    c = _draw(rng)
    dt, B, shp = c["dtype"], c["B"], c["shape"]
    n = int(np.prod(shp)) if shp else 1
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = torch.tensor(c["L"] * q, dtype=dt, requires_grad=True)  # ||A|| = rho(A) = L
    x = torch.tensor(rng.standard_normal((B, n)), dtype=dt, requires_grad=True)
    bad = np.zeros(B, bool)
    if c["bad"] != "none" and B > 1:
        bad[int(rng.integers(B))] = True  # one neighbour that is not contractive
    # unstable: z -> (1.5 / L) A z + x, spectral radius 1.5; no fixed point: z -> z + 1 + z^2
    gain = torch.tensor(np.where(bad & (c["bad"] == "unstable"), 1.5 / c["L"], 1.0), dtype=dt)
    nofp = torch.tensor(bad & (c["bad"] == "no_fixed_point"))

    def f(z):
        zf = z.reshape(B, n)
        y = gain[:, None] * (zf @ A.T) + x
        y = torch.tanh(y) if c["tanh"] else y
        return torch.where(nofp[:, None], zf + 1 + zf * zf, y).reshape((B, *shp))
    return c, f, A, x, bad, nofp, gain, n


def _exact(c, A, x, n):
    """Fixed point, Jacobian and f of the contractive map (gain 1) in float64, by Newton."""
    A64, x64 = A.detach().double().requires_grad_(), x.detach().double().requires_grad_()

    def f64(zf):
        y = zf @ A64.T + x64
        return torch.tanh(y) if c["tanh"] else y
    z = torch.zeros_like(x64)
    eye = torch.eye(n, dtype=F64)
    for _ in range(30):
        J = torch.autograd.functional.jacobian(lambda v: f64(v).sum(0), z).transpose(0, 1)
        with torch.no_grad():
            z = z + torch.linalg.solve(eye - J, (f64(z) - z)[:, :, None])[:, :, 0]
    J = torch.autograd.functional.jacobian(lambda v: f64(v).sum(0), z).transpose(0, 1)
    return z.detach(), J, f64, (A64, x64)


@pytest.mark.filterwarnings("ignore:DEQ. the backward:RuntimeWarning")
@pytest.mark.parametrize("chunk", range(4))
def test_random_combinations_keep_every_invariant_against_dense_oracles(chunk):
    for seed in range(chunk * CASES // 4, (chunk + 1) * CASES // 4):
        c, f, A, x, bad, nofp, gain, n = _case(seed)
        dt, B = c["dtype"], c["B"]
        deq = wt.DEQ(f_solver=c["f_solver"], b_solver=c["b_solver"], f_max_iter=40, f_tol=1e-5,
                     b_max_iter=60, b_tol=1e-7, grad=c["grad"], stop_mode=c["stop_mode"],
                     eval_f_max_iter=c["eval_budget"])
        deq.train(not c["eval"])
        budget = c["eval_budget"] if c["eval"] else 40
        z0 = torch.zeros((B, *c["shape"]), dtype=dt, requires_grad=c["z0_requires_grad"])
        z_star, st = deq(f, z0)
        msg = f"seed {seed}: {c}"
        # output: z0's dtype and shape, always finite; per-sample stats of shape (B,)
        assert z_star.dtype == dt and z_star.shape == z0.shape, msg
        assert torch.isfinite(z_star).all(), msg
        for field in ("nstep", "abs_lowest", "rel_lowest", "converged", "diverged"):
            assert getattr(st, field).shape == (B,), msg
        assert not (st.converged & st.diverged).any(), msg
        assert (st.nstep <= budget).all(), msg
        unfinished = ~st.converged & ~st.diverged
        assert (st.nstep[unfinished] == budget).all(), msg  # the budget is used, not ignored
        assert not st.converged[nofp].any(), msg
        res = st.abs_lowest if c["stop_mode"] == "abs" else st.rel_lowest
        assert (res[st.converged] <= 1e-5).all(), msg

        z_ex, J, f64, params64 = _exact(c, A, x, n)
        zf = z_star.detach().reshape(B, n).double()
        eps = 1e-5 if dt == torch.float32 else 1e-12
        L = c["L"]
        for b in np.flatnonzero(~bad):  # ||z - z*|| <= ||f(p) - p|| / (1 - L), p the iterate
            if st.converged[b]:
                bound = float(st.abs_lowest[b]) / (1 - L) * 1.05 + 10 * eps * (1 + z_ex[b].norm())
                assert (zf[b] - z_ex[b]).norm() <= bound, msg

        if not c["tanh"]:
            # z_star = f(p): recover p by inverting the affine map; the reported residuals
            # are those of p, for every sample (converged, unfinished, diverged); under
            # "phantom" (tau = 1) only for a diverged sample, which takes one step from p
            Ag = gain.double()[:, None, None] * A.detach().double()
            p = torch.linalg.solve(Ag, (zf - x.detach().double())[:, :, None])[:, :, 0]
            r_abs = (zf - p).norm(dim=1)
            r_rel = r_abs / (zf.norm(dim=1) + 1e-8)
            tol = 1e-3 if dt == torch.float32 else 1e-8
            checked = ~nofp.numpy() & (st.diverged.numpy() | (c["grad"] != "phantom"))
            for b in np.flatnonzero(checked):
                scale = tol * (1 + float(zf[b].norm()))
                assert abs(float(st.abs_lowest[b]) - r_abs[b]) <= scale, msg
                assert abs(float(st.rel_lowest[b]) - r_rel[b]) <= scale + tol * r_rel[b], msg

        # gradients of a loss on the contractive samples: finite, none for z0, and against
        # the dense implicit gradient (I - J)^-T w
        w = torch.tensor(np.random.default_rng(seed + 1).standard_normal((B, n)), dtype=F64)
        w[torch.tensor(bad)] = 0
        (z_star.reshape(B, n).double() * w).sum().backward()
        assert torch.isfinite(A.grad).all() and torch.isfinite(x.grad).all(), msg
        assert z0.grad is None, msg
        u = torch.linalg.solve((torch.eye(n, dtype=F64) - J).transpose(1, 2), w[:, :, None])
        exact = torch.cat([g.flatten() for g in torch.autograd.grad(f64(z_ex), params64,
                                                                    u[:, :, 0])])
        got = torch.cat([A.grad.double().flatten(), x.grad.double().flatten()])
        if exact.norm() < 1e-12 or not st.converged[torch.tensor(~bad)].all():
            continue
        if c["grad"] == "ift" and bool(deq.last_backward_stats.converged.all()):
            err = (got - exact).norm() / exact.norm()
            assert err <= 20 * (1e-5 + 1e-7) / (1 - L) ** 2 + 100 * eps, msg
        cos = got @ exact / (got.norm() * exact.norm())
        assert cos > (0.9 if c["grad"] == "phantom" else 0.999), msg

