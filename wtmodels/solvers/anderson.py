"""Anderson acceleration (type II) with a fixed-size history and an incrementally kept Gram matrix.

Each step mixes the last ``n <= m`` evaluations: with residuals ``G_i = f(x_i) - x_i``,
``alpha = argmin ||sum_i alpha_i G_i||`` subject to ``sum_i alpha_i = 1`` (solved as
``(G G^T + lam * diag(||G_i|| ||G_min||)) y = 1``, ``alpha = y / sum(y)``), then
``x <- sum_i alpha_i (x_i + beta G_i)``. Only the new row of ``G G^T`` is computed per step, so a
step reads the history twice (Gram row, mixing) and solves one ``n x n`` system per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .common import (
    DIVERGENCE_CHECKS,
    Pool,
    Problem,
    Tracker,
    check_common,
    check_float,
    check_positive_int,
    check_values,
    scratch,
)
from .stats import SolverStats

OPTION_CHECKS = {
    **DIVERGENCE_CHECKS,
    "m": lambda v: check_positive_int("m", v),
    "lam": lambda v: check_float("lam", v, 0.0, low_open=False, high_open=True),  # finite
    "beta": lambda v: check_float("beta", v, 0.0, 1.0),
}


def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
             max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel",
             m: int = 5, lam: float = 1e-4, beta: float = 1.0,
             div_factor: float = 10.0, patience: int = 5,
             ) -> tuple[torch.Tensor, SolverStats]:
    """Solve ``z = f(z)`` per sample with Anderson acceleration.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape; samples independent.
        z0: ``(B, ...)`` initial iterate.
        max_iter: most f-evaluations.
        tol: stop a sample once its residual (``stop_mode``) is ``<= tol``.
        stop_mode: ``"rel"`` or ``"abs"`` residual.
        m: history size (memory ``2 m`` iterates per sample, allocated once).
        lam: Tikhonov regularisation: weight ``i`` is penalised by ``lam`` x its residual's
            norm x the smallest residual norm in the history (relative to the newest
            residuals, and heavier on old, large ones: a long history does not slow
            convergence).
            A sample whose system is still singular (non-finite solution) takes a plain damped
            step ``x + beta (f(x) - x)`` instead.
        beta: mixing (damping) in ``(0, 1]``.
        div_factor: a sample whose residual stays above ``div_factor`` x its lowest residual
            for ``patience`` consecutive evaluations, ending no lower than it began, is flagged
            diverged and stopped (``math.inf``: never).
        patience: see ``div_factor``.

    Returns:
        ``(z, stats)``: the lowest-residual iterate per sample (shape and dtype of ``z0``) and
        its :class:`SolverStats`.

    Example:
        >>> import torch
        >>> A = torch.tensor([[0.5, 0.4], [-0.3, 0.6]])
        >>> z, stats = anderson(lambda z: z @ A.T + 1.0, torch.zeros(4, 2), tol=1e-6)
        >>> bool(stats.converged.all()), int(stats.nstep.max()) < 10
        (True, True)
    """
    max_iter, tol = check_common(max_iter, tol, stop_mode)
    m, lam, beta, div_factor, patience = check_values(
        OPTION_CHECKS, m=m, lam=lam, beta=beta, div_factor=div_factor, patience=patience)
    m = min(m, max_iter)  # a longer history could never fill
    prob = Problem(f, z0)
    with prob.solver_mode() as ctx:
        x = prob.x0  # (B, D)
        B, D = x.shape
        pool = Pool(ctx, "anderson.x", x)
        tracker = Tracker(x, max_iter, tol, stop_mode, div_factor, patience, pool,
                          noise_eps=prob.noise_eps)
        prob.on_coarse_output = tracker.note_noise
        sm = tracker.small
        F = ctx.enter_context(scratch("anderson.F", (B, m, D), x))  # f(x_i) history
        G = ctx.enter_context(scratch("anderson.G", (B, m, D), x))  # residuals f(x_i) - x_i
        F_slot, G_slot = F.unbind(1), G.unbind(1)  # views (B, D), made once
        F_hist = [F[:, :n] for n in range(m + 1)]  # (B, n, D)
        G_histT = [G[:, :n].transpose(1, 2) for n in range(m + 1)]  # (B, D, n)
        H = sm.full((B, m, m), 0.0)  # Gram matrix G G^T
        eye = sm.of(torch.eye(m, dtype=x.dtype, device=x.device))
        ones = sm.full((B, m), 1.0)
        for k in range(max_iter):
            fx = prob(x)
            slot = k % m
            g = torch.sub(fx, x, out=G_slot[slot])  # (B, D)
            n = min(k + 1, m)
            row = sm.of(torch.bmm(g.unsqueeze(1), G_histT[n]).squeeze(1))  # (B, n): g . G_i
            if tracker.update(x, fx, g, g_sq=row[:, slot]) or tracker.n_iter == max_iter:
                break
            F_slot[slot].copy_(fx)
            H[:, slot, :n] = row
            H[:, :n, slot] = row
            x_new = pool.take(x, tracker.best_x)
            if n == 1:
                torch.add(x, g, alpha=beta, out=x_new)
            else:
                alpha = sm.torch(_mixing_weights(sm, H[:, :n, :n], lam, ones[:, :n],
                                                 eye[slot, :n]))
                a = alpha.unsqueeze(1)  # (B, 1, n)
                torch.bmm(a, F_hist[n], out=x_new.unsqueeze(1))  # (B, 1, D)
                if beta != 1.0:
                    x_new.unsqueeze(1).baddbmm_(a, G_histT[n].transpose(1, 2), alpha=beta - 1.0)
            x = tracker.freeze(x_new, owned=True)
        return prob.restore(tracker.result()), tracker.stats()


def _mixing_weights(sm, H, lam: float, ones, fallback):
    """Weights ``alpha`` (B, n) summing to 1 that minimise ``alpha^T H alpha``.

    ``H`` (B, n, n) is regularised entry by entry, ``H_ii + lam sqrt(H_ii min_j H_jj)``
    (``lam ||G_i|| ||G_min||``): the newest, smallest residuals are not swamped by the old,
    large ones of a long history (``lam`` x the largest entry: m = 20 / 50 needed 30 / 60 steps
    where m = 5 needs 14; now 13), and those old ones get no large, cancelling weights (``lam``
    x the smallest entry for all: on ``z = cos(z)`` m = 30 / 100 needed 33-45 / over 100 steps,
    more than plain iteration's 36; now 7-11), while a linear problem is still solved to near
    rounding (``lam`` x each entry itself stopped it ~``lam`` short).
    ``H`` is first scaled to a largest diagonal entry of 1 (the weights do not depend on its
    scale; the guard ``_TINY`` against an exactly singular system then does not either).
    Samples whose system stays singular get ``fallback`` (n,), the one-hot weight of the newest
    iterate. Arrays of ``sm``. Silent on the non-finite values it replaces (numpy would warn:
    ``inf / inf`` in the scaling, ``inf * 0`` with ``lam=0``, a ``y`` that overflows,
    ``inf - inf`` in the check).
    """
    with np.errstate(all="ignore"):
        A = H.copy()
        diag = np.einsum("bii->bi", A)  # (B, n), writable view
        # alpha does not depend on H's scale; scaled to a largest entry of 1, nor does the guard
        # _TINY (added to H as is, it outweighed float64 residuals below ~1e-15)
        A /= diag.max(1)[:, None, None]
        diag += lam * np.sqrt(diag * diag.min(1)[:, None]) + _TINY
        y, ok = sm.solve(A, ones)
        s = y.sum(1)
        if bool(ok.all()) and bool((s != 0).all()):
            alpha = y / s[:, None]
            if math.isfinite(alpha.sum(dtype=np.float64)):
                return alpha
        alpha = y / s[:, None]
        ok = ok & np.isfinite(alpha).all(1)
    return np.where(ok[:, None], alpha, fallback)


_TINY = 1e-30


anderson.option_checks = OPTION_CHECKS
