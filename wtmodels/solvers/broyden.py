"""Limited-memory ("good") Broyden's method in the compact representation.

For the root ``g(x) = f(x) - x = 0`` with the initial inverse Jacobian ``-I``, Broyden's good
update applied to the pairs ``s_i = x_{i+1} - x_i``, ``y_i = g_{i+1} - g_i`` gives (Byrd, Nocedal
& Schnabel 1994, eq. 6.x) the inverse Jacobian

    H = -I + (S + Y) M^{-1} S^T,   M = S^T Y + L,   L_ij = s_i^T s_j if pair i is newer than j

so the Newton step is ``x - H g = f(x) - P c`` with ``P = S + Y`` (``p_i = f(x_{i+1}) - f(x_i)``)
and ``M c = S^T g``. Only the last ``m`` pairs are kept (a ring buffer allocated once): a step
reads the history twice (one batched product for ``S^T g``, ``S^T s``, ``P^T s``; one mixing
of ``P``) and solves one ``n x n`` system per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import Pool, Problem, Tracker, check_common, check_positive_int, scratch
from .stats import SolverStats


def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
            max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel",
            m: int = 12, div_factor: float = 10.0, patience: int = 5,
            ) -> tuple[torch.Tensor, SolverStats]:
    """Solve ``z = f(z)`` per sample with limited-memory Broyden's (good) method.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape; samples independent.
        z0: ``(B, ...)`` initial iterate.
        max_iter: most f-evaluations.
        tol: stop a sample once its residual (``stop_mode``) is ``<= tol``.
        stop_mode: ``"rel"`` or ``"abs"`` residual.
        m: number of secant pairs kept (memory ``2 m`` iterates per sample, allocated once);
            the oldest pair is dropped when the window is full.
        div_factor: a sample whose residual stays above ``div_factor`` x its lowest residual
            for ``patience`` consecutive evaluations is flagged diverged and stopped.
        patience: see ``div_factor``.

    A sample whose small system is singular takes a plain step ``x <- f(x)`` instead.

    Returns:
        ``(z, stats)``: the lowest-residual iterate per sample (shape and dtype of ``z0``) and
        its :class:`SolverStats`.

    Example:
        >>> import torch
        >>> A = torch.tensor([[0.5, 0.4], [-0.3, 0.6]])
        >>> z, stats = broyden(lambda z: z @ A.T + 1.0, torch.zeros(4, 2), tol=1e-6)
        >>> bool(stats.converged.all()), int(stats.nstep.max()) < 10
        (True, True)
    """
    check_common(max_iter, tol, stop_mode, div_factor, patience)
    check_positive_int("m", m)
    prob = Problem(f, z0)
    with prob.solver_mode() as ctx:
        x = prob.x0  # (B, D)
        B, D = x.shape
        pool = Pool(ctx, "broyden.x", x)
        tracker = Tracker(x, max_iter, tol, stop_mode, div_factor, patience, pool)
        sm = tracker.small
        hist = ctx.enter_context(scratch("broyden.hist", (B, m, 2, D), x))  # slot i: (s_i, p_i)
        gs = ctx.enter_context(scratch("broyden.gs", (2, B, 2, D), x))  # alternating (g, s) rows
        slots = [hist[:, i].unbind(1) for i in range(m)]  # (s_i, p_i) views (B, D), made once
        rows_T = [hist[:, :n].reshape(B, 2 * n, D).transpose(1, 2) for n in range(m + 1)]
        P_hist = [hist[:, :n, 1] for n in range(m + 1)]  # (B, n, D)
        SY = sm.full((B, m, m), 0.0)  # s_i^T y_j
        SS = sm.full((B, m, m), 0.0)  # s_i^T s_j
        Sg_old = sm.full((B, m), 0.0)  # s_i^T g of the previous step
        newer = sm.of(_newer_masks(m, x.device, x.dtype))  # (m + 1, m, m)
        x_prev = fx_prev = None
        for k in range(max_iter):
            fx = prob(x)
            cur = gs[k % 2]  # (B, 2, D)
            g = torch.sub(fx, x, out=cur[:, 0])
            if tracker.update(x, fx, g, live=(x_prev,)) or tracker.n_iter == max_iter:
                break
            x_new = pool.take(x, tracker.best_x)
            if k == 0:
                x_new.copy_(fx)
            else:
                n, slot = min(k, m), (k - 1) % m
                s_slot, p_slot = slots[slot]
                torch.sub(x, x_prev, out=cur[:, 1])  # s
                s_slot.copy_(cur[:, 1])
                torch.sub(fx, fx_prev, out=p_slot)  # p = s + y = f(x) - f(x_prev)
                prods = sm.of(torch.bmm(cur, rows_T[n]))  # (B, 2, 2n): (g|s) . (s_i|p_i)
                prods = prods.reshape(B, 2, n, 2)
                Sg, Ss = prods[:, 0, :, 0], prods[:, 1, :, 0]  # (B, n)
                Ys = prods[:, 1, :, 1] - Ss  # y_i^T s
                SY[:, :n, slot] = Sg - Sg_old[:, :n]  # s_i^T y = s_i^T g - s_i^T g_old
                SY[:, slot, :n] = Ys
                SS[:, slot, :n] = Ss
                SS[:, :n, slot] = Ss
                Sg_old[:, :n] = Sg
                mask = newer[slot if k > m else m, :n, :n]
                M = SY[:, :n, :n] + SS[:, :n, :n] * mask
                c, ok = sm.solve(M, Sg)  # (B, n)
                c = sm.torch(sm.xp.where(ok[:, None], c, 0.0))
                torch.baddbmm(fx.unsqueeze(1), c.unsqueeze(1), P_hist[n], alpha=-1.0,
                              out=x_new.unsqueeze(1))  # f(x) - P c
            x_prev, fx_prev = x, fx
            x = tracker.freeze(x_new, live=(x_prev,))
        return prob.restore(tracker.result()), tracker.stats()


def _newer_masks(m: int, device, dtype) -> torch.Tensor:
    """``(m + 1, m, m)``: ``[r, i, j] = 1`` if slot ``i`` holds a newer pair than slot ``j``.

    ``r < m``: a full ring whose newest pair sits in slot ``r``; ``r = m``: slots filled in
    order (slot index = age order).
    """
    idx = torch.arange(m)
    age = (idx[None, :] - idx[:, None] - 1) % m  # [r, i]: position of slot i, 0 = oldest
    full = age[:, :, None] > age[:, None, :]
    filling = (idx[:, None] > idx[None, :])[None]
    return torch.cat([full, filling]).to(device=device, dtype=dtype)
