"""Anderson acceleration (type II) with a fixed-size history and an incrementally kept Gram matrix.

Each step mixes the last ``n <= m`` evaluations: with residuals ``G_i = f(x_i) - x_i``,
``alpha = argmin ||sum_i alpha_i G_i||`` subject to ``sum_i alpha_i = 1`` (solved as
``(G G^T + lam * max(diag) I) y = 1``, ``alpha = y / sum(y)``), then
``x <- sum_i alpha_i (x_i + beta G_i)``. Only the new row of ``G G^T`` is computed per step, so a
step reads the history twice (Gram row, mixing) and solves one ``n x n`` system per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import Problem, Tracker, check_common, check_float, check_positive_int
from .stats import SolverStats


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
        lam: Tikhonov regularisation, relative to the largest diagonal entry of the Gram matrix.
            A sample whose system is still singular (non-finite solution) takes a plain damped
            step ``x + beta (f(x) - x)`` instead.
        beta: mixing (damping) in ``(0, 1]``.
        div_factor: a sample whose residual stays above ``div_factor`` x its lowest residual
            for ``patience`` consecutive evaluations is flagged diverged and stopped.
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
    check_common(max_iter, tol, stop_mode, div_factor, patience)
    check_positive_int("m", m)
    check_float("lam", lam, 0.0, low_open=False)
    check_float("beta", beta, 0.0, 1.0)
    prob = Problem(f, z0)
    with prob.solver_mode():
        x = prob.x0  # (B, D)
        B, D = x.shape
        tracker = Tracker(x, max_iter, tol, stop_mode, div_factor, patience)
        F = x.new_empty(B, m, D)  # f(x_i) history
        G = x.new_empty(B, m, D)  # residual history f(x_i) - x_i
        H = x.new_zeros(B, m, m)  # Gram matrix G G^T
        eye = torch.eye(m, device=x.device, dtype=x.dtype)
        ones = x.new_ones(B, m, 1)
        tiny = torch.finfo(x.dtype).tiny
        for k in range(max_iter):
            fx = prob(x)
            slot = k % m
            g = torch.sub(fx, x, out=G[:, slot])  # (B, D)
            if tracker.update(x, fx, g) or tracker.n_iter == max_iter:
                break
            F[:, slot] = fx
            n = min(k + 1, m)
            row = torch.bmm(G[:, :n], g.unsqueeze(2)).squeeze(2)  # (B, n)
            H[:, slot, :n] = row
            H[:, :n, slot] = row
            if n == 1:
                x_new = fx if beta == 1.0 else torch.add(x, g, alpha=beta)
            else:
                alpha = _mixing_weights(H[:, :n, :n], lam, tiny, ones[:, :n], eye[slot, :n])
                a = alpha.unsqueeze(1)  # (B, 1, n)
                x_new = torch.bmm(a, F[:, :n])  # (B, 1, D)
                if beta != 1.0:
                    x_new = torch.baddbmm(x_new, a, G[:, :n], alpha=beta - 1.0)
                x_new = x_new.squeeze(1)
            x = tracker.freeze(x_new)
        return prob.restore(tracker.best_x), tracker.stats()


def _mixing_weights(H: torch.Tensor, lam: float, tiny: float, ones: torch.Tensor,
                    fallback: torch.Tensor) -> torch.Tensor:
    """Weights ``alpha`` (B, n) summing to 1 that minimise ``alpha^T H alpha``.

    ``H`` (B, n, n) is regularised by ``lam * max(diag)``; samples whose system stays singular
    get ``fallback`` (n,), the one-hot weight of the newest iterate.
    """
    A = H.clone()
    diag = A.diagonal(dim1=1, dim2=2)  # (B, n) view
    diag.add_(diag.amax(1, keepdim=True) * lam + tiny)
    y, info = torch.linalg.solve_ex(A, ones)  # (B, n, 1)
    y = y.squeeze(2)
    alpha = y / y.sum(1, keepdim=True)
    ok = (info == 0) & torch.isfinite(alpha).all(1)
    return torch.where(ok[:, None], alpha, fallback)
