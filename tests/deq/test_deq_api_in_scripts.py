"""The public solver / DEQ API used the way a researcher's own scripts use it."""

import pytest
import torch

import wtmodels as wt
from wtmodels.solvers import SolverStats


def _stats(B, **changes):
    fields = dict(nstep=torch.full((B,), 3, dtype=torch.int64), abs_lowest=torch.zeros(B),
                  rel_lowest=torch.zeros(B), converged=torch.ones(B, dtype=torch.bool),
                  diverged=torch.zeros(B, dtype=torch.bool), abs_trace=torch.zeros(B, 3),
                  rel_trace=torch.zeros(B, 3))
    fields.update(changes)
    return SolverStats(**fields)


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # kept clean


B = 3
BAD_STATS = {  # a custom solver's stats that a log / the trainer would read as nonsense
    "nstep": dict(nstep=torch.full((B + 1,), 3, dtype=torch.int64)),  # another batch size
    "converged": dict(converged=torch.ones(B)),  # float: summary() works, masks do not
    "abs_trace": dict(abs_trace=torch.zeros(B)),  # 1-D
    "rel_lowest": dict(rel_lowest=[0.0] * B),  # not a tensor
    "converged and diverged": dict(diverged=torch.ones(B, dtype=torch.bool)),
}


@pytest.mark.parametrize("what", list(BAD_STATS))
@pytest.mark.parametrize("api", ["solve", "deq"])
def test_a_registered_solver_returning_malformed_stats_is_refused(what, api):
    def bad(f, z0, *, max_iter=10, tol=1e-4, stop_mode="rel"):
        return z0.clone(), _stats(z0.shape[0], **BAD_STATS[what])

    wt.register_solver("review14_bad_stats", bad, overwrite=True)
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    with pytest.raises(ValueError, match=f"solver 'review14_bad_stats'.*{what.split()[0]}"):
        if api == "solve":
            wt.solve(f, torch.zeros(B, 4), method="review14_bad_stats")
        else:
            wt.DEQ(f_solver="review14_bad_stats")(f, torch.zeros(B, 4))


def test_a_registered_solver_returning_well_formed_stats_is_accepted():
    def good(f, z0, *, max_iter=10, tol=1e-4, stop_mode="rel"):
        return torch.full_like(z0, 2.0), _stats(z0.shape[0])

    wt.register_solver("review14_good_stats", good, overwrite=True)
    z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(B, 4), method="review14_good_stats")
    assert torch.equal(z, torch.full((B, 4), 2.0)) and stats.converged.all()


def test_solve_returns_no_graph_whatever_the_registered_solver_builds():
    # solve builds no autograd graph (its docstring): a custom solver running f with autograd
    # on handed back an iterate carrying one, whose backward reached the parameters through
    # a single f step (a wrong gradient, silently)
    w = torch.tensor(0.5, requires_grad=True)

    def one_step(f, z0, *, max_iter=10, tol=1e-4, stop_mode="rel"):
        z = f(f(z0))  # z0 = 0, f(z) = w z + 1: z = w + 1 = 1.5
        return z, _stats(z0.shape[0])

    wt.register_solver("review14_graph", one_step, overwrite=True)
    z, _ = wt.solve(lambda z: w * z + 1.0, torch.zeros(B, 2), method="review14_graph")
    assert torch.equal(z, torch.full((B, 2), 1.5))
    assert not z.requires_grad and z.grad_fn is None
