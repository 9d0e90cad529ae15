"""Statistics a fixed-point solve reports, per sample, with one fixed schema."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SolverStats:
    """Per-sample statistics of one batched fixed-point solve.

    Residuals of an iterate ``z`` are ``abs = ||f(z) - z||`` and
    ``rel = ||f(z) - z|| / (||f(z)|| + 1e-8)``, norms over all non-batch dimensions.

    Attributes:
        nstep: ``(B,)`` int64, f-evaluations the sample used before it stopped (reached the
            tolerance, was flagged diverged, or ran out of budget).
        abs_lowest: ``(B,)`` absolute residual of the returned iterate (``inf`` when no
            evaluation of ``f`` was finite): in ``stop_mode="abs"`` the lowest seen; in
            ``"rel"`` that of the lowest-``rel`` iterate, except that a sample flagged
            diverged gets back its start when that has the lower absolute residual.
        rel_lowest: ``(B,)`` relative residual of the returned iterate.
        converged: ``(B,)`` bool, the returned iterate's residual (in the solve's stop mode) is
            ``<= tol``.
        diverged: ``(B,)`` bool, the sample was stopped because ``f`` returned a non-finite value
            or the residual kept growing (see ``wtmodels.solvers.common``). Never both
            converged and diverged.
        abs_trace: ``(B, n_iter)`` absolute residual at each iteration; once a sample stopped,
            its columns hold the residual of its returned iterate (``abs_lowest``: its lowest,
            or its start's for a sample that gets its start back, see ``abs_lowest``).
            ``n_iter`` is the number of f-evaluations the batch ran.
        rel_trace: ``(B, n_iter)`` the same for the relative residual (``rel_lowest``).
        jac_loss: 0-dim tensor, the Hutchinson estimate of ``||df/dz||_F^2 / numel`` averaged
            over the batch, when a :class:`wtmodels.DEQ` was asked for it; else ``None``.

    Example:
        >>> import torch, wtmodels as wt
        >>> _, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(3, 2), tol=1e-6)
        >>> stats.converged.tolist(), stats.abs_trace.shape[0]
        ([True, True, True], 3)
        >>> sorted(stats.summary())
        ['converged', 'diverged', 'nstep', 'rel_residual', 'rel_residual_max']
    """

    nstep: torch.Tensor
    abs_lowest: torch.Tensor
    rel_lowest: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    jac_loss: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return self.nstep.shape[0]

    @property
    def n_iter(self) -> int:
        """f-evaluations the batch ran (the width of the traces)."""
        return self.abs_trace.shape[1]

    def summary(self) -> dict[str, float]:
        """Batch means for logging.

        Returns:
            ``{"nstep": mean nstep, "rel_residual": mean rel_lowest, "rel_residual_max": max
            rel_lowest, "converged": share converged, "diverged": share diverged}``.

        Example:
            >>> import torch, wtmodels as wt
            >>> _, stats = wt.solve(lambda z: 0.5 * z, torch.ones(4, 3), tol=1e-3)
            >>> stats.summary()["converged"]
            1.0
        """
        rel = self.rel_lowest.detach().double()
        return {
            "nstep": float(self.nstep.double().mean()),
            "rel_residual": float(rel.mean()),
            "rel_residual_max": float(rel.max()),
            "converged": float(self.converged.double().mean()),
            "diverged": float(self.diverged.double().mean()),
        }
