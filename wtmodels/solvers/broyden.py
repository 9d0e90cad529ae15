"""Limited-memory ("good") Broyden's method in the compact representation.

For the root ``g(x) = f(x) - x = 0`` with the initial inverse Jacobian ``-I``, Broyden's good
update applied to the pairs ``s_i = x_{i+1} - x_i``, ``y_i = g_{i+1} - g_i`` gives (Byrd, Nocedal
& Schnabel 1994, eq. 6.x) the inverse Jacobian

    H = -I + (S + Y) M^{-1} S^T,   M = S^T Y + L,   L_ij = s_i^T s_j if pair i is newer than j

so the Newton step is ``x - H g = f(x) - P c`` with ``P = S + Y`` (``p_i = f(x_{i+1}) - f(x_i)``)
and ``M c = S^T g``. Only the last ``m`` pairs are kept (a ring buffer allocated once): a step
reads the history three times (``[g, s]^T S`` in one pass: ``g`` sits in the row before the
``s_i`` so the two vectors form one strided operand; ``P^T s``; one mixing of ``P``) and solves
one ``n x n`` system per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .common import (
    DIVERGENCE_CHECKS,
    Pool,
    Problem,
    Tracker,
    check_common,
    check_positive_int,
    check_values,
    scratch,
)
from .stats import SolverStats

OPTION_CHECKS = {**DIVERGENCE_CHECKS, "m": lambda v: check_positive_int("m", v)}


def broyden(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
            max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel",
            m: int = 6, div_factor: float = 10.0, patience: int = 5,
            ) -> tuple[torch.Tensor, SolverStats]:
    """Solve ``z = f(z)`` per sample with limited-memory Broyden's (good) method.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape; samples independent.
        z0: ``(B, ...)`` initial iterate.
        max_iter: most f-evaluations.
        tol: stop a sample once its residual (``stop_mode``) is ``<= tol``.
        stop_mode: ``"rel"`` or ``"abs"`` residual.
        m: number of secant pairs kept (memory ``2 m`` iterates per sample, allocated once);
            the oldest pair is dropped when the window is full. On the benchmark cells 6
            pairs reach the tolerance in as many evaluations as 12 at half the history reads.
        div_factor: a sample whose residual stays above ``div_factor`` x its lowest residual
            for ``patience`` consecutive evaluations, ending no lower than it began, is flagged
            diverged and stopped (``math.inf``: never).
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
    max_iter, tol = check_common(max_iter, tol, stop_mode)
    m, div_factor, patience = check_values(OPTION_CHECKS, m=m, div_factor=div_factor,
                                           patience=patience)
    m = min(m, max_iter)  # a longer history could never fill
    prob = Problem(f, z0)
    with prob.solver_mode() as ctx:
        x = prob.x0  # (B, D)
        B, D = x.shape
        pool = Pool(ctx, "broyden.x", x)
        tracker = Tracker(x, max_iter, tol, stop_mode, div_factor, patience, pool,
                          noise_eps=prob.noise_eps)
        prob.on_coarse_output = tracker.note_noise
        sm = tracker.small
        W = ctx.enter_context(scratch("broyden.W", (B, m + 1, D), x))  # rows: g, then s_i
        S = W[:, 1:]  # (B, m, D) s_i
        P = ctx.enter_context(scratch("broyden.P", (B, m, D), x))  # p_i = s_i + y_i
        S_slot, P_slot = S.unbind(1), P.unbind(1)  # views (B, D), made once
        # history reads are products (B, 1 or 2, D) x (B, D, n)
        S_T = [S[:, :n].transpose(1, 2) for n in range(m + 1)]  # (B, D, n)
        P_T = [P[:, :n].transpose(1, 2) for n in range(m + 1)]
        P_hist = [P[:, :n] for n in range(m + 1)]  # (B, n, D)
        SY = sm.full((B, m, m), 0.0)  # s_i^T y_j
        SS = sm.full((B, m, m), 0.0)  # s_i^T s_j
        Sg_old = sm.full((B, m), 0.0)  # s_i^T g of the previous step
        newer = sm.of(_newer_masks(m, x.device, x.dtype))  # (m + 1, m, m)
        g = W[:, 0]  # (B, D), a row of W so that [g, s] is one strided (B, 2, D) operand
        x_prev = fx_prev = spare = None
        for k in range(max_iter):
            fx = prob(x)
            if fx_prev is not None and fx.data_ptr() == fx_prev.data_ptr():
                # f wrote this output over its last one: rebuild f(x_prev) = g_prev + x_prev
                # (g still holds g_prev) in a buffer of our own, taken once per solve
                if spare is None:
                    spare = ctx.enter_context(scratch("broyden.fx_prev", x.shape, x))
                fx_prev = torch.add(x_prev, g, out=spare)
            torch.sub(fx, x, out=g)
            if tracker.update(x, fx, g, live=(x_prev,)) or tracker.n_iter == max_iter:
                break
            x_new = pool.take(x, tracker.best_x)
            if k == 0:
                x_new.copy_(fx)
            else:
                n, slot = min(k, m), (k - 1) % m
                s = torch.sub(x, x_prev, out=S_slot[slot]).unsqueeze(1)  # (B, 1, D)
                torch.sub(fx, fx_prev, out=P_slot[slot])  # p = s + y = f(x) - f(x_prev)
                gs = W.as_strided((B, 2, D), (W.stride(0), (1 + slot) * D, 1))  # [g, s]
                both = sm.of(torch.bmm(gs, S_T[n]))  # (B, 2, n): one pass over S
                Sg, Ss = both[:, 0], both[:, 1]  # s_i . g, s_i . s
                Ys = sm.of(torch.bmm(s, P_T[n]).squeeze(1))  # p_i . s
                with np.errstate(all="ignore"):  # products that overflowed: a singular M below
                    Ys -= Ss  # y_i . s
                    SY[:, :n, slot] = Sg - Sg_old[:, :n]  # s_i^T y = s_i^T g - s_i^T g_old
                    SY[:, slot, :n] = Ys
                    SS[:, slot, :n] = Ss
                    SS[:, :n, slot] = Ss
                    Sg_old[:, :n] = Sg
                    mask = newer[slot if k > m else m, :n, :n]
                    M = SY[:, :n, :n] + SS[:, :n, :n] * mask
                if not tracker.all_active:  # a stopped sample's pairs are 0 (s = 0): M singular
                    M[~tracker.active] = sm.xp.eye(n, dtype=M.dtype)  # and its step unused
                c, ok = sm.solve(M, Sg)  # (B, n)
                if not bool(ok.all()):
                    c = sm.xp.where(ok[:, None], c, 0.0)
                torch.baddbmm(fx.unsqueeze(1), sm.torch(c).unsqueeze(1), P_hist[n], alpha=-1.0,
                              out=x_new.unsqueeze(1))  # f(x) - P c
            x_prev, fx_prev = x, fx
            x = tracker.freeze(x_new, live=(x_prev,), owned=True)
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


broyden.option_checks = OPTION_CHECKS
