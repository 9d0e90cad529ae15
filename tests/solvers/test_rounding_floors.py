"""Low-precision rounding floors (bf16 / float16, and float32 under a tol below its
precision) are no divergence; scipy oracles on new problems; stats invariants on mixed batches."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import wtmodels as wt

SOLVERS = ["fixed_point", "anderson", "broyden"]
F64 = torch.float64


def contractive_cells(B, D, seed=0, norm=0.5):
    """Per-sample ``z -> tanh(W_b z + c_b)`` with ``||W_b||_2 = norm``: a contraction with
    Lipschitz constant ``norm`` (tanh is 1-Lipschitz), so no sample can diverge."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g)
    W = W * (norm / torch.linalg.matrix_norm(W, 2))[:, None, None]
    c = 2 * torch.randn(B, D, generator=g)
    return lambda z: torch.tanh(torch.einsum("bij,bj->bi", W, z.float()) + c)


@pytest.mark.parametrize("method", SOLVERS)
def test_bf16_rounding_floor_is_not_divergence(method):
    # Under bf16 autocast the residuals stall at bf16's floor (rel ~1e-3) and bump around a
    # lucky low by more than div_factor: 0.2-1.7% of these contractive samples were flagged
    # diverged at tol 1e-6 (and a few at a DEQ's default 1e-4), as float32 ones were at tol
    # 1e-10 before review 8: the rounding level was float32's whatever the precision in play.
    B, D = 1000, 16
    f = contractive_cells(B, D, norm=0.8)
    for tol in (1e-4, 1e-6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, stats = wt.solve(f, torch.zeros(B, D), method=method, tol=tol, max_iter=60)
        assert not stats.diverged.any(), (tol, int(stats.diverged.sum()))
        assert torch.isfinite(z).all() and float(stats.rel_lowest.max()) < 2e-2
        for dtype in (torch.bfloat16, torch.float16):
            z, stats = wt.solve(f, torch.zeros(B, D, dtype=dtype), method=method, tol=tol,
                                max_iter=60)
            assert not stats.diverged.any(), (tol, dtype, int(stats.diverged.sum()))


def test_a_runaway_is_still_caught_in_low_precision():
    # z <- 1.2 z + 1 runs off under plain iteration: its relative residual tends to
    # 0.2 / 1.2, far above bf16's rounding level
    lin = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(1.2 * torch.eye(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = wt.solve(lambda z: lin(z) + 1.0, torch.zeros(2, 3), method="fixed_point",
                            tol=1e-6, max_iter=100)
    assert stats.diverged.all() and not stats.converged.any()
    for dtype in (torch.bfloat16, torch.float16):
        _, stats = wt.solve(lambda z: 1.2 * z + 1.0, torch.zeros(2, 3, dtype=dtype),
                            method="fixed_point", tol=1e-6, max_iter=100)
        assert stats.diverged.all() and not stats.converged.any(), dtype


def test_float32_and_float64_keep_their_rounding_level():
    # the low-precision level applies only where a coarser dtype is in play: a slow float32
    # runaway (rel -> 0.02 / 1.02, below bf16's level) is still flagged
    for dtype in (torch.float32, torch.float64):
        _, stats = wt.solve(lambda z: 1.02 * z + 1.0, torch.zeros(2, 3, dtype=dtype),
                            method="fixed_point", tol=1e-8, max_iter=400)
        assert stats.diverged.all(), dtype


@pytest.mark.parametrize("method", SOLVERS)
def test_bratu_problem_matches_scipy_and_flags_the_one_without_solution(method):
    # Discretised Bratu u'' + lam e^u = 0, u(0) = u(1) = 0, as u = L^{-1} lam e^u; a solution
    # exists for lam < 3.51: lam = 0.5 ... 3.4 against scipy.optimize.root; lam = 4.5 has none
    N = 31
    h = 1.0 / (N + 1)
    L = (2 * np.eye(N) - np.eye(N, k=1) - np.eye(N, k=-1)) / h**2
    Linv = torch.tensor(np.linalg.inv(L))
    lam = torch.tensor([0.5, 1.5, 3.0, 3.4, 4.5], dtype=torch.float64)
    z, stats = wt.solve(lambda u: (lam[:, None] * torch.exp(u)) @ Linv.T,
                        torch.zeros(5, N, dtype=torch.float64), method=method, tol=1e-11,
                        max_iter=200, stop_mode="abs")
    for i in range(4):
        ref = scipy.optimize.root(lambda v, a=float(lam[i]): Linv.numpy() @ (a * np.exp(v)) - v,
                                  np.zeros(N), tol=1e-14).x
        np.testing.assert_allclose(z[i].numpy(), ref, atol=1e-9)
    assert stats.converged[:4].all() and not stats.converged[4]
    assert torch.isfinite(z).all()
    # scipy's own Anderson / Broyden agree on lam = 3.0
    F = lambda v: Linv.numpy() @ (3.0 * np.exp(v)) - v  # noqa: E731
    for oracle in (scipy.optimize.anderson, scipy.optimize.broyden1):
        np.testing.assert_allclose(z[2].numpy(), oracle(F, np.zeros(N), f_tol=1e-12),
                                   atol=1e-9)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_stats_invariants_on_a_batch_of_easy_hard_hopeless_and_nan_samples(method, stop_mode):
    # per sample z <- rho z + 1 (fixed point 1 / (1 - rho)) with rho 0.1, 0.5, 0.9; rho = 1
    # has no fixed point; the last sample's f is NaN from the second evaluation on. Shape
    # (B, 2, 3) from a non-contiguous z0.
    rho = torch.tensor([0.1, 0.5, 0.9, 1.0, 0.5], dtype=torch.float64)[:, None, None]
    calls = [0]

    def f(z):
        out = rho * z + 1.0
        calls[0] += 1
        if calls[0] >= 2:
            out = out.clone()
            out[4] = math.nan
        return out

    z0 = torch.zeros(3, 2, 5, dtype=torch.float64).permute(2, 1, 0)  # (5, 2, 3), not contiguous
    tol, max_iter = 1e-9, 400
    z, stats = wt.solve(f, z0, method=method, tol=tol, max_iter=max_iter, stop_mode=stop_mode)
    assert z.shape == (5, 2, 3) and z.is_contiguous() and torch.isfinite(z).all()
    exact = 1.0 / (1.0 - rho[:3, 0, 0])
    np.testing.assert_allclose(z[:3].reshape(3, -1).numpy(),
                               exact[:, None].expand(3, 6).numpy(), rtol=1e-8)
    assert stats.converged.tolist() == [True, True, True, False, False]
    assert stats.diverged.tolist() == [False, False, False, False, True]
    assert int(stats.nstep[3]) == max_iter  # no fixed point: runs out of budget
    # the NaN sample keeps its only finite iterate, its start, after its second evaluation
    assert (z[4] == 0).all() and int(stats.nstep[4]) == 2
    assert math.isinf(stats.abs_lowest[4]) or stats.abs_lowest[4] == stats.abs_trace[4, 0]
    n = stats.nstep
    assert stats.abs_trace.shape == stats.rel_trace.shape == (5, int(n.max()))
    low = stats.abs_lowest if stop_mode == "abs" else stats.rel_lowest
    trace = stats.abs_trace if stop_mode == "abs" else stats.rel_trace
    for i in range(5):
        k = int(n[i])
        assert (stats.abs_trace[i, k:] == stats.abs_lowest[i]).all()
        assert (stats.rel_trace[i, k:] == stats.rel_lowest[i]).all()
        assert trace[i, :k].min() == low[i]
    assert (low[stats.converged] <= tol).all()
    # the reported residuals are the README's formulas on the returned iterate
    fz = rho * z + 1.0
    a = (fz - z).reshape(5, -1).norm(dim=1)
    r = a / (fz.reshape(5, -1).norm(dim=1) + 1e-8)
    np.testing.assert_allclose(stats.abs_lowest[:4].numpy(), a[:4].numpy(), rtol=1e-9,
                               atol=1e-300)
    np.testing.assert_allclose(stats.rel_lowest[:4].numpy(), r[:4].numpy(), rtol=1e-9,
                               atol=1e-300)


@pytest.mark.parametrize("method", SOLVERS)
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
