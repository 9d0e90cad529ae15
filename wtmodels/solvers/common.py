"""Shared internals of the fixed-point solvers: validation, precision, per-sample bookkeeping.

Every solver works on a flattened batch ``x`` of shape ``(B, D)`` in a compute dtype (float64
for float64 inputs, float32 otherwise) and leaves all per-sample decisions to :class:`Tracker`:

- residuals ``abs = ||f(x) - x||`` and ``rel = abs / (||f(x)|| + EPS)`` per sample;
- the lowest-residual iterate of each sample is kept and returned;
- a sample stops (its iterate is frozen) once its residual is ``<= tol`` (converged) or once it
  is flagged diverged: ``f`` returned a non-finite value (or its norm overflowed), or its
  absolute residual stayed above ``div_factor`` times the lowest absolute residual it had
  for ``patience`` consecutive evaluations (whatever the stop mode: a relative residual can
  stay bounded while the iterates run off to infinity).
  A diverged sample keeps its best finite iterate and is never reported converged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .stats import SolverStats

EPS = 1e-8  # in the relative residual ||f(z) - z|| / (||f(z)|| + EPS)
STOP_MODES = ("abs", "rel")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(name: str, value, low: float, high: float = math.inf, *,
                low_open: bool = True, high_open: bool = False) -> float:
    """Return ``float(value)`` if it lies in the interval, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_common(max_iter, tol, stop_mode, div_factor, patience) -> None:
    """Validate the options every solver shares (``ValueError`` naming the field)."""
    check_positive_int("max_iter", max_iter)
    check_float("tol", tol, 0.0)
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, got {stop_mode!r}")
    check_float("div_factor", div_factor, 1.0, low_open=False)
    check_positive_int("patience", patience)


class Problem:
    """A fixed-point problem ``z = f(z)`` seen by a solver as ``(B, D)`` in a compute dtype.

    The solver's own arithmetic runs with autocast disabled (inside :meth:`solver_mode`);
    ``f`` itself is called under the autocast state the caller had, on a tensor of the shape
    and dtype of ``z0``. Its output is cast to the compute dtype (bf16 outputs are fine).
    """

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor):
        if not callable(f):
            raise ValueError(f"f must be callable, got {type(f).__name__}")
        if not isinstance(z0, torch.Tensor) or z0.dim() < 1 or z0.shape[0] < 1:
            raise ValueError("z0 must be a tensor of shape (B, ...) with B >= 1")
        if not z0.is_floating_point():
            raise ValueError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
        self.f = f
        self.shape = z0.shape
        self.dtype = z0.dtype
        self.compute_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
        self.device_type = z0.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = (torch.get_autocast_dtype(self.device_type)
                               if self.autocast else None)
        self.x0 = z0.detach().reshape(z0.shape[0], -1).to(self.compute_dtype)  # (B, D)

    def solver_mode(self):
        """Context for the solver body: no autograd graph, autocast off."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.autocast:
            stack.enter_context(torch.autocast(self.device_type, enabled=False))
        return stack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``f`` on a flat ``(B, D)`` iterate, returning ``(B, D)`` in the compute dtype."""
        z = x.view(self.shape).to(self.dtype)
        if self.autocast:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                fz = self.f(z)
        else:
            fz = self.f(z)
        if not isinstance(fz, torch.Tensor) or fz.shape != self.shape:
            got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
            raise ValueError(f"f must return a tensor of shape {tuple(self.shape)} "
                             f"(the shape of z0), got {got}")
        return fz.reshape(x.shape).to(self.compute_dtype)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the shape and dtype of ``z0``."""
        return x.view(self.shape).to(self.dtype)


class Tracker:
    """Per-sample residuals, best iterates, stopping and divergence flags of one solve.

    Call :meth:`update` once per f-evaluation; it returns ``True`` when every sample has
    stopped. :meth:`freeze` keeps stopped samples at their best iterate.
    """

    def __init__(self, x0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 div_factor: float, patience: int):
        B = x0.shape[0]
        dev, dt = x0.device, x0.dtype
        self.tol, self.rel = tol, stop_mode == "rel"
        self.div_factor, self.patience = div_factor, patience
        self.abs_trace = torch.empty(B, max_iter, device=dev, dtype=dt)
        self.rel_trace = torch.empty(B, max_iter, device=dev, dtype=dt)
        self.best_abs = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.best_rel = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.min_abs = torch.full((B,), math.inf, device=dev, dtype=dt)
        self.best_x = x0  # (B, D), never written in place
        self.active = torch.ones(B, device=dev, dtype=torch.bool)
        self.converged = torch.zeros(B, device=dev, dtype=torch.bool)
        self.diverged = torch.zeros(B, device=dev, dtype=torch.bool)
        self.streak = torch.zeros(B, device=dev, dtype=torch.int32)
        self.nstep = torch.zeros(B, device=dev, dtype=torch.int64)
        self.n_iter = 0
        self.all_active = True

    def update(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor) -> bool:
        """Record the evaluation ``fx = f(x)``, ``g = fx - x`` (all ``(B, D)``).

        Returns:
            ``True`` when every sample has stopped.
        """
        k = self.n_iter
        self.n_iter += 1
        abs_r = torch.linalg.vector_norm(g, dim=1)  # (B,)
        f_norm = torch.linalg.vector_norm(fx, dim=1)
        bad = ~torch.isfinite(abs_r + f_norm)  # non-finite f(x), or an overflowing norm
        abs_r = abs_r.masked_fill(bad, math.inf)
        rel_r = (abs_r / (f_norm + EPS)).masked_fill(bad, math.inf)
        self.abs_trace[:, k] = abs_r
        self.rel_trace[:, k] = rel_r
        res = rel_r if self.rel else abs_r
        best = self.best_rel if self.rel else self.best_abs
        act = self.active
        improved = (res < best) & act
        if self.all_active and bool(improved.all()):
            self.best_x = x
        else:
            self.best_x = torch.where(improved[:, None], x, self.best_x)
        self.best_abs = torch.where(improved, abs_r, self.best_abs)
        self.best_rel = torch.where(improved, rel_r, self.best_rel)
        # divergence: the absolute residual stays above div_factor x the lowest one seen
        self.min_abs = torch.minimum(self.min_abs, abs_r)
        self.streak = (self.streak + 1) * (abs_r > self.div_factor * self.min_abs)
        conv = act & (res <= self.tol)
        div = act & ~conv & ((self.streak >= self.patience) | bad)
        self.nstep += act
        self.converged |= conv
        self.diverged |= div
        self.active = act & ~(conv | div)
        n_active = int(self.active.sum())
        self.all_active = n_active == self.active.shape[0]
        return n_active == 0

    def freeze(self, x_new: torch.Tensor) -> torch.Tensor:
        """Stopped samples stay at their best iterate; the others take ``x_new``."""
        if self.all_active:
            return x_new
        return torch.where(self.active[:, None], x_new, self.best_x)

    def stats(self) -> SolverStats:
        """The :class:`SolverStats` of the solve so far."""
        n = self.n_iter
        steps = torch.arange(n, device=self.nstep.device)
        after = steps[None, :] >= self.nstep[:, None]  # (B, n): columns after the sample stopped
        abs_trace = torch.where(after, self.best_abs[:, None], self.abs_trace[:, :n])
        rel_trace = torch.where(after, self.best_rel[:, None], self.rel_trace[:, :n])
        best = self.best_rel if self.rel else self.best_abs
        return SolverStats(
            nstep=self.nstep.clone(),
            abs_lowest=self.best_abs.clone(),
            rel_lowest=self.best_rel.clone(),
            converged=self.converged & (best <= self.tol),
            diverged=self.diverged.clone(),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
        )
