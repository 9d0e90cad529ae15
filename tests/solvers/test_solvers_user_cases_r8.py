"""The solvers and the DEQ layer: cases a new user hit (see each test's comment)."""

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


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_a_non_finite_start_does_not_poison_the_other_samples_gradients(grad):
    # a warm start cached from a step that blew up: one sample's z0 is NaN. The solvers flag it
    # diverged and hand it back as it came; the DEQ then evaluated f at it with autograd, and
    # 0 x NaN in f's backward made every parameter's gradient NaN, even with that sample left
    # out of the loss (as a diverging sample, whose gradients stay finite, may be)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4, dtype=F64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(3, 4, dtype=F64)
    deq = wt.DEQ(grad=grad, f_tol=1e-10, b_tol=1e-10, f_max_iter=60, b_max_iter=60,
                 jac_reg=True)

    def grads(z0, rows):
        lin.zero_grad()
        z, stats = deq(lambda z: torch.tanh(lin(z)) + x[rows], z0)
        (z[[0, -1]].square().sum() + stats.jac_loss * 0.0).backward()
        return z, stats, lin.weight.grad.clone()

    z0 = torch.zeros(3, 4, dtype=F64)
    z0[1, 2] = float("nan")
    z, stats, g = grads(z0, [0, 1, 2])
    assert stats.diverged.tolist() == [False, True, False]
    assert not stats.converged[1] and torch.isfinite(stats.jac_loss)
    assert torch.equal(z[1].isnan(), z0[1].isnan())  # back as it came
    _, _, g_ref = grads(torch.zeros(2, 4, dtype=F64), [0, 2])  # the batch without it
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():  # the same output with autograd off
        z_eval, _ = deq(lambda z: torch.tanh(lin(z)) + x, z0)
    torch.testing.assert_close(z_eval, z.detach(), equal_nan=True)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_a_tol_below_the_precision_does_not_flag_samples_at_their_rounding_floor(method):
    # float32, tol 1e-10: the residuals stall at ~4e-8 (rounding) and bump around a lucky low;
    # 1-2% of the samples were flagged diverged (and a DEQ whose b_tol was that tight warned
    # that f's Jacobian had spectral radius >= 1)
    torch.manual_seed(0)
    W = torch.randn(16, 16) * 0.15
    x = torch.randn(256, 16)
    z, stats = wt.solve(lambda z: torch.tanh(z @ W.T + x), torch.zeros(256, 16),
                        method=method, tol=1e-10, max_iter=100)
    assert not stats.diverged.any()
    assert float(stats.rel_lowest.max()) < 1e-6
    # a real divergence is still caught, in float32 and float64
    for dtype in (torch.float32, F64):
        _, stats = wt.solve(lambda z: 1.5 * z + 1.0, torch.zeros(2, 3, dtype=dtype),
                            method="fixed_point", tol=1e-10, max_iter=100)
        assert stats.diverged.all() and not stats.converged.any()
