"""Damped fixed-point (Picard) iteration ``z <- (1 - tau) z + tau f(z)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import (
    DIVERGENCE_CHECKS,
    Pool,
    Problem,
    Tracker,
    check_common,
    check_float,
    check_values,
    scratch,
)
from .stats import SolverStats

OPTION_CHECKS = {**DIVERGENCE_CHECKS, "tau": lambda v: check_float("tau", v, 0.0, 1.0)}


def fixed_point(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel",
                tau: float = 1.0, div_factor: float = 10.0, patience: int = 5,
                ) -> tuple[torch.Tensor, SolverStats]:
    """Solve ``z = f(z)`` per sample by damped fixed-point iteration.

    Args:
        f: maps a ``(B, ...)`` tensor to one of the same shape; samples independent.
        z0: ``(B, ...)`` initial iterate.
        max_iter: most f-evaluations.
        tol: stop a sample once its residual (``stop_mode``) is ``<= tol``.
        stop_mode: ``"rel"`` or ``"abs"`` residual.
        tau: damping in ``(0, 1]``; 1 is plain iteration ``z <- f(z)``.
        div_factor: a sample whose residual stays above ``div_factor`` x its lowest residual
            for ``patience`` consecutive evaluations, ending no lower than it began, is flagged
            diverged and stopped (``math.inf``: never).
        patience: see ``div_factor``.

    Returns:
        ``(z, stats)``: the lowest-residual iterate per sample (shape and dtype of ``z0``) and
        its :class:`SolverStats`.

    Example:
        >>> import torch
        >>> z, stats = fixed_point(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), tol=1e-6)
        >>> torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-5), int(stats.nstep[0]) > 10
        (True, True)
    """
    max_iter, tol = check_common(max_iter, tol, stop_mode)
    tau, div_factor, patience = check_values(OPTION_CHECKS, tau=tau, div_factor=div_factor,
                                             patience=patience)
    prob = Problem(f, z0)
    with prob.solver_mode() as ctx:
        x = prob.x0  # (B, D)
        pool = Pool(ctx, "fixed_point.x", x)
        tracker = Tracker(x, max_iter, tol, stop_mode, div_factor, patience, pool,
                          noise_eps=prob.noise_eps)
        prob.on_coarse_output = tracker.note_noise
        g = ctx.enter_context(scratch("fixed_point.g", x.shape, x))
        for _ in range(max_iter):
            fx = prob(x)
            torch.sub(fx, x, out=g)
            if tracker.update(x, fx, g) or tracker.n_iter == max_iter:
                break
            x_new = pool.take(x, tracker.best_x)
            if tau == 1.0:  # a copy: f may hand out the same buffer on every call
                x_new.copy_(fx)
            else:
                torch.add(x, g, alpha=tau, out=x_new)
            x = tracker.freeze(x_new, owned=True)
        return prob.restore(tracker.result()), tracker.stats()


fixed_point.option_checks = OPTION_CHECKS
