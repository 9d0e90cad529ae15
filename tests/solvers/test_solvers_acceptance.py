"""Acceptance checks of the solvers and the DEQ layer on cases beyond the unit tests: scipy
oracles on new problems, 1-d batches, per-sample difficulty, stats semantics, faults."""

import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import wtmodels as wt

SOLVERS = ["fixed_point", "anderson", "broyden"]
F64 = torch.float64


def residuals(f, z):
    B = z.shape[0]
    fz = f(z)
    r = (fz - z).reshape(B, -1).double().norm(dim=1)
    return r, r / (fz.reshape(B, -1).double().norm(dim=1) + 1e-8)


@pytest.mark.parametrize("method", SOLVERS)
def test_scalar_batch_matches_brentq(method):
    """``z = a exp(-z)`` per sample, batch of shape ``(B,)`` (D = 1), against scipy's brentq."""
    a = torch.linspace(0.1, 2.0, 7, dtype=F64)
    z, stats = wt.solve(lambda z: a * torch.exp(-z), torch.zeros(7, dtype=F64), method=method,
                        tol=1e-12, max_iter=500, stop_mode="abs")
    exact = [scipy.optimize.brentq(lambda t, ai=float(ai): ai * math.exp(-t) - t, 0.0, 5.0)
             for ai in a]
    assert z.shape == (7,) and stats.nstep.shape == (7,) and stats.abs_trace.shape[0] == 7
    assert torch.allclose(z, torch.tensor(exact, dtype=F64), atol=1e-9)
    assert stats.converged.all()


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_non_contractive_map_matches_scipy_root(method):
    """``z = tanh(A z) + c`` with rho(A) = 1.4 (plain iteration diverges) against scipy.root."""
    g = torch.Generator().manual_seed(1)
    D = 8
    A = torch.randn(D, D, generator=g, dtype=F64)
    A = A / float(np.abs(np.linalg.eigvals(A.numpy())).max()) * 1.4
    c = torch.randn(3, D, generator=g, dtype=F64)
    z, stats = wt.solve(lambda z: torch.tanh(z @ A.T) + c, torch.zeros(3, D, dtype=F64),
                        method=method, tol=1e-11, max_iter=300, stop_mode="abs")
    An = c.numpy(), A.numpy()
    for i in range(3):
        ref = scipy.optimize.root(lambda v, i=i: np.tanh(An[1] @ v) + An[0][i] - v,
                                  np.zeros(D), tol=1e-14).x
        assert np.abs(z[i].numpy() - ref).max() < 1e-9
    assert stats.converged.all() and not stats.diverged.any()


@pytest.mark.parametrize("method", SOLVERS)
def test_very_different_difficulty_per_sample(method):
    """Contraction factors 0.1 ... 0.99 in one batch: each sample stops on its own, its trace
    after it stopped holds its lowest residual, which is that of the iterate returned."""
    rho = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=F64)[:, None]
    c = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(0))

    def f(z):
        return rho * z + c

    z, stats = wt.solve(f, torch.zeros(4, 5, dtype=F64), method=method, tol=1e-10,
                        max_iter=3000, stop_mode="abs")
    assert stats.converged.all()
    assert torch.allclose(z, c / (1 - rho), atol=1e-8)
    abs_r, rel_r = residuals(f, z)
    assert torch.allclose(stats.abs_lowest, abs_r, rtol=1e-6, atol=1e-14)
    assert torch.allclose(stats.rel_lowest, rel_r, rtol=1e-6, atol=1e-14)
    assert stats.abs_trace.shape == (4, int(stats.nstep.max()))
    for i in range(4):
        n = int(stats.nstep[i])
        assert (stats.abs_trace[i, n:] == stats.abs_lowest[i]).all()
        assert stats.abs_trace[i, :n].min() == stats.abs_lowest[i]
    if method == "fixed_point":  # plain iteration: the easy sample stops far earlier
        assert stats.nstep[0] < stats.nstep[3] / 10


@pytest.mark.parametrize("method", SOLVERS)
def test_max_iter_one_returns_z0_unconverged(method):
    b = torch.randn(3, 4)
    z, stats = wt.solve(lambda z: 0.5 * z + b, torch.zeros(3, 4), method=method, max_iter=1)
    assert torch.equal(z, torch.zeros(3, 4)) and stats.nstep.tolist() == [1, 1, 1]
    assert not stats.converged.any() and not stats.diverged.any()
    assert stats.abs_trace.shape == (3, 1)


@pytest.mark.parametrize("method", SOLVERS)
def test_one_sample_infinite_from_the_start(method):
    b = torch.randn(3, 4)

    def f(z):
        out = 0.5 * z + b
        out[2] = math.inf
        return out

    z, stats = wt.solve(f, torch.zeros(3, 4), method=method, tol=1e-6)
    assert torch.isfinite(z).all() and torch.equal(z[2], torch.zeros(4))
    assert stats.converged.tolist() == [True, True, False]
    assert stats.diverged.tolist() == [False, False, True]
    assert torch.allclose(z[:2], 2 * b[:2], atol=1e-4)


@pytest.mark.parametrize("method", SOLVERS)
def test_map_without_fixed_point_at_eigenvalue_one_stays_finite(method):
    """``z -> z + e_1`` (eigenvalue 1, constant residual: every Anderson/Broyden system is
    singular) is neither converged nor diverged, and stays finite."""
    shift = torch.zeros(4)
    shift[0] = 1.0
    z, stats = wt.solve(lambda z: z + shift, torch.zeros(3, 4), method=method, max_iter=40)
    assert torch.isfinite(z).all()
    assert not stats.converged.any() and not stats.diverged.any()
    assert torch.allclose(stats.abs_lowest, torch.ones(3))


@pytest.mark.parametrize("grad", ["ift", "phantom", "unroll"])
def test_deq_on_a_scalar_batch_gives_the_exact_gradient(grad):
    """``z0`` of shape ``(B,)`` (the solvers take it): ``z = a z + b``, ``z* = b / (1 - a)``.
    The phantom mode crashed with an IndexError (it flattened from dimension 1)."""
    a = (torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.8)
    a.requires_grad_()
    b = torch.randn(4, dtype=F64, requires_grad=True)
    deq = wt.DEQ(grad=grad, f_tol=1e-12, b_tol=1e-12, f_max_iter=200, b_max_iter=200,
                 phantom_steps=60)
    z, _ = deq(lambda z: a * z + b, torch.zeros(4, dtype=F64))
    w = torch.randn(4, dtype=F64)
    ga, gb = torch.autograd.grad((z * w).sum(), [a, b])
    ad, bd = a.detach(), b.detach()
    assert z.shape == (4,) and torch.allclose(z, bd / (1 - ad), atol=1e-10)
    assert torch.allclose(ga, w * bd / (1 - ad) ** 2, atol=1e-8)
    assert torch.allclose(gb, w / (1 - ad), atol=1e-8)


def test_ift_gradcheck_with_an_ignored_parameter_and_inputs():
    torch.manual_seed(0)
    B, D = 3, 5
    W = (torch.randn(D, D, dtype=F64) * 0.3).requires_grad_()
    bias = torch.randn(D, dtype=F64, requires_grad=True)
    x = torch.randn(B, D, dtype=F64, requires_grad=True)
    unused = torch.randn(D, dtype=F64, requires_grad=True)
    deq = wt.DEQ(f_tol=1e-13, b_tol=1e-13, f_max_iter=300, b_max_iter=300)

    def fn(W, bias, x, unused):
        return deq(lambda z: 0.8 * torch.tanh(z @ W.T + bias) + x * torch.sigmoid(z),
                   torch.zeros(B, D, dtype=F64))[0]

    assert torch.autograd.gradcheck(fn, (W, bias, x, unused), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["long_history_scalar", "inf_sample_lam0"])
def test_anderson_is_silent_on_the_non_finite_values_it_handles(case):
    """Near-singular / non-finite small systems are the solver's business (it falls back to a
    plain step): numpy's RuntimeWarnings ('overflow encountered in cast', 'invalid value
    encountered in multiply') leaked out, and under warnings-as-errors the solve raised."""
    if case == "long_history_scalar":  # D = 1, m = 50: rank-1 Gram matrices
        a = torch.linspace(0.5, 1.5, 5)[:, None]
        f, z0, opts = (lambda z: torch.cos(a * z)), torch.zeros(5, 1), {"m": 50}
    else:
        b = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

        def f(z):
            out = 0.5 * z + b
            out[2] = math.inf
            return out

        z0, opts = torch.zeros(3, 4), {"lam": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, stats = wt.solve(f, z0, method="anderson", tol=1e-6, max_iter=200, **opts)
    assert torch.isfinite(z).all()
    assert stats.converged.tolist() == ([True] * 5 if case == "long_history_scalar"
                                        else [True, True, False])
