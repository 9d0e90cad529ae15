"""A solver never reports convergence it did not reach: a registered solver claiming it for a
sample with a non-finite ``z`` or a lowest residual above ``tol`` is an error naming it, in
``wt.solve`` and in both of DEQ's solves; honest and built-in solvers pass."""

from __future__ import annotations

import pytest
import torch

import wtmodels as wt
from wtmodels.solvers import SolverStats, check_result


def _stats(B: int, converged, abs_lowest, rel_lowest) -> SolverStats:
    return SolverStats(
        nstep=torch.ones(B, dtype=torch.long), abs_lowest=torch.tensor(abs_lowest),
        rel_lowest=torch.tensor(rel_lowest), converged=torch.tensor(converged),
        diverged=torch.zeros(B, dtype=torch.bool), abs_trace=torch.zeros(B, 1),
        rel_trace=torch.zeros(B, 1))


def _claiming(abs_lowest, rel_lowest, z_value=0.5):
    """A solver that returns ``z_value`` everywhere and says every sample converged."""
    def solver(f, z0, *, max_iter, tol, stop_mode):
        B = z0.shape[0]
        return torch.full_like(z0, z_value), _stats(B, [True] * B, abs_lowest, rel_lowest)
    return solver


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # kept clean
    return lambda name, solver: wt.register_solver(name, solver, overwrite=True)


def test_converged_above_tol_is_refused_in_the_stop_mode_that_decides(registered):
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z0 = torch.zeros(3, 4)
    # rel residual 1e-3 above tol 1e-4 (abs tiny): a lie in "rel" mode, the truth in "abs" mode
    registered("liar_rel", _claiming([1e-9, 1e-9, 1e-9], [1e-5, 1e-3, 1e-5]))
    with pytest.raises(ValueError, match=r"'liar_rel' reported samples 1 converged .*rel "
                                         r"residual outside \[0, tol=0\.0001\] \(sample 1: "
                                         r"0\.001\)"):
        wt.solve(f, z0, method="liar_rel", tol=1e-4, stop_mode="rel")
    z, stats = wt.solve(f, z0, method="liar_rel", tol=1e-4, stop_mode="abs")
    assert stats.converged.all()
    # exactly tol is within tol; NaN is not
    registered("at_tol", _claiming([0.0] * 3, [1e-4, 1e-4, 1e-4]))
    assert wt.solve(f, z0, method="at_tol", tol=1e-4)[1].converged.all()
    registered("nan_residual", _claiming([0.0] * 3, [float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="samples 0 converged"):
        wt.solve(f, z0, method="nan_residual", tol=1e-4)


def test_converged_with_a_non_finite_z_is_refused(registered):
    registered("nan_z", _claiming([0.0] * 2, [0.0] * 2, z_value=float("nan")))
    with pytest.raises(ValueError, match="'nan_z' reported samples 0, 1 converged with a "
                                         "non-finite z"):
        wt.solve(lambda z: z, torch.zeros(2, 3), method="nan_z")
    # the same z reported not converged is the solver's honest answer
    stats = _stats(2, [False, False], [1.0, 1.0], [1.0, 1.0])
    z, _ = check_result("honest", (torch.full((2, 3), float("inf")), stats), torch.zeros(2, 3))
    assert not torch.isfinite(z).any()


def test_message_lists_the_first_five_and_counts_the_rest():
    B = 8
    stats = _stats(B, [True] * B, [1.0] * B, [1.0] * B)
    with pytest.raises(ValueError, match=r"samples 0, 1, 2, 3, 4 and 3 more converged"):
        check_result("many", (torch.zeros(B, 2), stats), torch.zeros(B, 2), tol=1e-3,
                     stop_mode="abs")


def test_deq_forward_and_backward_solves_are_checked(registered):
    registered("liar", _claiming([1.0, 1.0], [1.0, 1.0]))
    W = torch.nn.Parameter(0.3 * torch.eye(3))
    x = torch.randn(2, 3)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    with pytest.raises(ValueError, match="'liar' reported samples 0, 1 converged"):
        wt.DEQ(f_solver="liar", f_tol=1e-4)(f, torch.zeros(2, 3))
    deq = wt.DEQ(f_solver="anderson", b_solver="liar", f_tol=1e-6, b_tol=1e-6)
    z, _ = deq(f, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'liar' reported samples 0, 1 converged"):
        z.sum().backward()


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_built_in_solvers_pass_the_check_down_to_their_noise_floor(method, stop_mode):
    # a contraction with fixed point (I - A)^-1 b; tol 1e-12 is below float32's reach for most
    # samples (some land on a residual of exactly 0): no error, and what is reported holds
    A = 0.6 * torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    b = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    f = lambda z: z @ A.T + b  # noqa: E731
    exact = torch.linalg.solve(torch.eye(6) - A, b.T).T  # (5, 6)
    for tol in (1e-12, 1e-5):
        z, stats = wt.solve(f, torch.zeros(5, 6), method=method, tol=tol, stop_mode=stop_mode,
                            max_iter=200)
        lowest = stats.rel_lowest if stop_mode == "rel" else stats.abs_lowest
        assert (lowest[stats.converged] <= tol).all()
        assert torch.allclose(z, exact, atol=1e-4)
    assert stats.converged.all()  # tol 1e-5: every sample
