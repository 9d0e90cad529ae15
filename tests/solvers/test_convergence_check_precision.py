"""check_result's convergence check: a tol beyond float32 does not let an infinite
residual converge (built-in solvers and the check), a negative or overflowed residual claimed
within tol is refused, a wrapper comparing equal to a built-in is still scanned, and a
registered solver's own stop mode (no residual of it in SolverStats) is not judged by abs."""

from __future__ import annotations

import pytest
import torch

import wtmodels as wt
from wtmodels.solvers import SolverStats, anderson, check_result


def _stats(B, lowest, dtype=torch.float32, converged=True) -> SolverStats:
    low = torch.full((B,), lowest, dtype=dtype)
    return SolverStats(
        nstep=torch.ones(B, dtype=torch.long), abs_lowest=low, rel_lowest=low,
        converged=torch.full((B,), converged), diverged=torch.zeros(B, dtype=torch.bool),
        abs_trace=torch.zeros(B, 1), rel_trace=torch.zeros(B, 1))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # kept clean
    return lambda name, solver: wt.register_solver(name, solver, overwrite=True)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_tol_beyond_float32_does_not_converge_an_infinite_residual(method, stop_mode):
    # f(z) = inf everywhere: the residual is inf, never within the finite tol 1e39 (which
    # rounds to inf in float32); was reported converged with abs_lowest inf
    z, stats = wt.solve(lambda z: torch.full_like(z, float("inf")), torch.zeros(2, 3),
                        method=method, tol=1e39, stop_mode=stop_mode)
    assert not stats.converged.any() and stats.diverged.all()
    # a finite problem still converges under that tol
    z, stats = wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3), method=method, tol=1e39,
                        stop_mode=stop_mode)
    assert stats.converged.all()


def test_an_overflowed_or_negative_residual_is_not_within_tol():
    z0 = torch.zeros(2, 3)
    for lowest, dtype, tol in ((float("inf"), torch.float32, 1e39),
                               (float("inf"), torch.float16, 1e5),  # 1e5 is inf in float16
                               (-1.0, torch.float32, 1e-4), (-float("inf"), torch.float32, 1.0)):
        with pytest.raises(ValueError, match="'liar' reported samples 0, 1 converged"):
            check_result("liar", (z0.clone(), _stats(2, lowest, dtype)), z0, tol=tol,
                         stop_mode="abs")
    # honest values pass: 0, -0.0, exactly at the largest float16 below tol
    for lowest, dtype in ((0.0, torch.float32), (-0.0, torch.float32), (65504.0, torch.float16)):
        check_result("ok", (z0.clone(), _stats(2, lowest, dtype)), z0, tol=1e5, stop_mode="abs")


def test_a_wrapper_equal_to_a_built_in_is_still_scanned(registered):
    class Wrapped:  # compares equal to the function it wraps; returns NaN z, claims converged
        def __init__(self, fn):
            self.fn = fn

        def __eq__(self, other):
            return other is self.fn

        __hash__ = object.__hash__

        def __call__(self, f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
            z, stats = self.fn(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
            return torch.full_like(z, float("nan")), stats

    registered("wrapped", Wrapped(anderson))
    with pytest.raises(ValueError, match="'wrapped' reported samples 0, 1 converged with a "
                                         "non-finite z"):
        wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3), method="wrapped")


def test_a_registered_solvers_own_stop_mode_is_not_judged_by_the_abs_residual(registered):
    def maxnorm(f, z0, *, max_iter=50, tol=1e-4, stop_mode="max"):
        # plain iteration stopping on the max-norm residual (its own stop mode "max")
        z = z0.clone()
        for _ in range(max_iter):
            z_next = f(z)
            done = bool(((z_next - z).flatten(1).abs().amax(1) <= tol).all())
            z = z_next
            if done:
                break
        r = (f(z) - z).flatten(1)
        a = r.norm(dim=1)
        conv = r.abs().amax(1) <= tol
        return z, SolverStats(nstep=torch.ones(len(z), dtype=torch.long), abs_lowest=a,
                              rel_lowest=a / 2, converged=conv,
                              diverged=torch.zeros(len(z), dtype=torch.bool),
                              abs_trace=a[:, None], rel_trace=a[:, None] / 2)

    registered("maxnorm", maxnorm)
    # fixed point 2: the max-norm residual (2 - z) / 2 drops below 1e-3 while the 2-norm over
    # 400 entries is 20 x larger (was: ValueError "lowest max residual above tol")
    z, stats = wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 400), method="maxnorm",
                        tol=1e-3, stop_mode="max", max_iter=100)
    assert stats.converged.all() and (stats.abs_lowest > 1e-3).all()
    assert torch.allclose(z, torch.full((2, 400), 2.0), atol=2e-3)
