"""Solvers registered with ``wt.register_solver``: a signature ``wt.solve`` cannot call is
refused at registration, a solver whose options are ordinary (positional-or-keyword) parameters
takes them through ``wt.solve`` and ``wt.DEQ``, and a solver returning another dtype than
``z0``'s is refused with a ValueError (each test keeps the registry clean)."""

import pytest
import torch

import wtmodels as wt
import wtmodels.solvers as solvers_pkg
from wtmodels.solvers import anderson


def test_a_registered_solver_returning_another_dtype_is_refused(monkeypatch):
    # a custom solver that returned float64 for a float32 z0 passed the result check; DEQ then
    # fed it to f, which failed with "expected m1 and m2 to have the same dtype"
    def to64(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
        return anderson(lambda z: f(z.float()).double(), z0.double(), max_iter=max_iter,
                        tol=tol, stop_mode=stop_mode)

    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # registry kept clean
    wt.register_solver("test_review7_to64", to64, overwrite=True)
    W = torch.eye(3) * 0.5
    with pytest.raises(ValueError, match="dtype of z0"):
        wt.solve(lambda z: z @ W + 1.0, torch.zeros(2, 3), method="test_review7_to64")
    with pytest.raises(ValueError, match="dtype of z0"):
        wt.DEQ(f_solver="test_review7_to64")(lambda z: z @ W + 1.0, torch.zeros(2, 3))


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


def test_a_registered_solver_whose_options_are_ordinary_parameters_takes_them(monkeypatch):
    # register_solver accepted solver(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", tau=1.0)
    # (options as positional-or-keyword parameters, the plain Python way), but solve and DEQ
    # refused its option: "unknown option(s) ['tau'] ...; valid options: []"
    from wtmodels.solvers import fixed_point, solver_options

    def damped(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", tau=1.0):
        return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=tau)

    monkeypatch.setattr(wt.solvers, "_SOLVERS", dict(wt.solvers._SOLVERS))  # kept clean
    wt.register_solver("review10_damped", damped)
    assert solver_options("review10_damped") == ["tau"]
    # z = -z + 2 oscillates undamped; tau = 0.5 lands on the fixed point 1 in one step
    z, stats = wt.solve(lambda z: -z + 2.0, torch.zeros(2, 3), method="review10_damped",
                        tau=0.5, tol=1e-6)
    assert stats.converged.all() and stats.nstep.tolist() == [2, 2]
    torch.testing.assert_close(z, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"valid options: \['tau'\]"):
        wt.solve(lambda z: -z + 2.0, torch.zeros(2, 3), method="review10_damped", damping=0.5)
    wt.DEQ(f_solver="review10_damped", f_opts={"tau": 0.5})  # built without a ValueError
