"""Review 8 of the solvers and the DEQ layer: cases a new user hit (see each test's comment)."""

import pytest
import torch

import wtmodels as wt
import wtmodels.solvers as solvers_pkg

F64 = torch.float64


@pytest.mark.parametrize("solver", [
    lambda *, max_iter, tol, stop_mode: None,            # takes no f, z0
    lambda f, *, max_iter, tol, stop_mode: None,         # takes no z0
    lambda f, z0, max_iter, tol, stop_mode, /: None,     # common arguments positional-only
    lambda f, z0, *, max_iter, tol, stop_mode, foo: None,  # a required extra option
])
def test_register_solver_refuses_a_signature_solve_cannot_call(monkeypatch, solver):
    # these were registered, then failed with a bare TypeError at the first wt.solve (or in the
    # first backward pass of a DEQ using it as b_solver)
    monkeypatch.setattr(solvers_pkg, "_SOLVERS", dict(solvers_pkg._SOLVERS))  # registry kept clean
    with pytest.raises(ValueError, match="must be callable as solver\\(f, z0"):
        wt.register_solver("test_review8_bad", solver)
    assert "test_review8_bad" not in wt.list_solvers()
    # a solver taking options only through **kwargs is still fine
    wt.register_solver("test_review8_kw", lambda f, z0, **kw: wt.solve(f, z0, **kw))
    z, stats = wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 2), method="test_review8_kw")
    assert bool(stats.converged.all())
