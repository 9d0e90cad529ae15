"""The solvers: finite termination on linear maps (Anderson with lam=0 is GMRES,
D + 2 evaluations; good Broyden needs at most 2D steps, Gay 1979), plain / damped iteration's
closed-form nstep, traces and iterate per sample across trace growth in a batch above 16384,
and a batch mixing a NaN mid-run, a runaway, a start at the fixed point and ordinary problems
giving each sample bit for bit what it gets solved alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import wtmodels as wt

F64 = torch.float64


def _linear(D, seed, norm=0.9):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((D, D))
    A *= norm / np.linalg.norm(A, 2)
    b = rng.standard_normal(D)
    return torch.tensor(A), torch.tensor(b), np.linalg.solve(np.eye(D) - A, b)


@pytest.mark.parametrize("D", [3, 5])
def test_anderson_without_regularisation_terminates_like_gmres(D):
    # type-II Anderson with beta = 1 and a history of D + 1 residuals spans the Krylov space of
    # I - A: on z = A z + b the iterate x_{D+1} is exact, i.e. D + 2 evaluations
    A, b, zstar = _linear(D, seed=D)
    z, st = wt.solve(lambda z: z @ A.T + b, torch.zeros(1, D, dtype=F64), method="anderson",
                     m=D + 1, lam=0.0, tol=1e-12, stop_mode="abs", max_iter=50)
    assert st.converged[0] and int(st.nstep[0]) <= D + 2
    np.testing.assert_allclose(z[0].numpy(), zstar, atol=1e-12, rtol=0)
    # with a history of D residuals the span is one dimension short: no early termination
    _, short = wt.solve(lambda z: z @ A.T + b, torch.zeros(1, D, dtype=F64), method="anderson",
                        m=D, lam=0.0, tol=1e-12, stop_mode="abs", max_iter=50)
    assert int(short.nstep[0]) > D + 2


@pytest.mark.parametrize("D", [3, 5])
def test_broyden_terminates_within_2d_steps_on_a_linear_map(D):
    # Gay (1979): good Broyden solves a D-dimensional linear system in at most 2D steps, so
    # x_{2D} is exact: at most 2D + 1 evaluations, given the memory for all pairs (m >= 2D)
    A, b, zstar = _linear(D, seed=10 + D)
    z, st = wt.solve(lambda z: z @ A.T + b, torch.zeros(1, D, dtype=F64), method="broyden",
                     m=2 * D, tol=1e-12, stop_mode="abs", max_iter=50)
    assert st.converged[0] and int(st.nstep[0]) <= 2 * D + 1
    np.testing.assert_allclose(z[0].numpy(), zstar, atol=1e-12, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_damped_iteration_closed_form_per_sample_in_a_batch_above_16384(tau):
    # z = rho z + c from z0 = 0: g_k = f(z_k) - z_k = c q^k with q = 1 - tau (1 - rho), and
    # z_k = c / (1 - rho) (1 - q^k). Each sample stops at the first k with c q^k <= tol, so
    # nstep = k + 1 (64 to ~220 evaluations: the traces, 52 columns wide at first for this B,
    # grow several times while samples stop)
    B, tol = 20000, 1e-10
    gen = torch.Generator().manual_seed(0)
    rho = torch.empty(B, dtype=F64).uniform_(0.3, 0.8, generator=gen)
    c = torch.empty(B, dtype=F64).uniform_(0.5, 2.0, generator=gen)
    z, st = wt.solve(lambda z: rho[:, None] * z + c[:, None], torch.zeros(B, 1, dtype=F64),
                     method="fixed_point", tau=tau, max_iter=300, tol=tol, stop_mode="abs")
    q = 1 - tau * (1 - rho)
    k_real = torch.log(tol / c) / torch.log(q)
    k = torch.ceil(k_real).long()
    clear = (k_real - k_real.round()).abs() > 1e-3  # no tie with tol within rounding
    assert clear.float().mean() > 0.99
    assert torch.equal(st.nstep[clear], k[clear] + 1)
    assert st.converged.all() and not st.diverged.any()
    assert st.n_iter == int(st.nstep.max()) and st.abs_trace.shape == (B, st.n_iter)
    n = st.nstep
    cols = torch.arange(st.n_iter, dtype=F64)
    want = c[:, None] * q[:, None] ** torch.minimum(cols[None, :], (n - 1)[:, None].to(F64))
    # f(z) - z cancels to ~1e-15 absolute: compare to that
    torch.testing.assert_close(st.abs_trace, want, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(st.abs_lowest, want[torch.arange(B), n - 1], rtol=1e-9,
                               atol=1e-13)
    want_z = c / (1 - rho) * (1 - q ** (n - 1).to(F64))
    torch.testing.assert_close(z[:, 0], want_z, rtol=0, atol=1e-13)


def _mixed(idx, dtype):
    """Sample 0 turns NaN from the 3rd evaluation, 1 is a runaway (rho 1.5), 2 and 3 contract
    (rho 0.3, a rotation at 0.95), 4 is z = 0.7 z started at its fixed point 0."""
    gen = torch.Generator().manual_seed(1)
    D = 4
    Q = torch.linalg.qr(torch.randn(5, D, D, dtype=F64, generator=gen))[0][idx].to(dtype)
    rho = torch.tensor([0.5, 1.5, 0.3, 0.95, 0.7], dtype=F64)[idx].to(dtype)
    c = torch.randn(5, D, dtype=F64, generator=gen)[idx].to(dtype)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = rho[:, None] * torch.einsum("bij,bj->bi", Q, z) + c
        for row, i in enumerate(idx.tolist()):
            if i == 0 and calls[0] >= 3:
                out[row] = math.nan
            if i == 4:
                out[row] = 0.7 * z[row]
        return out

    z0 = torch.randn(5, D, dtype=F64, generator=gen)[idx].to(dtype)
    z0[idx == 4] = 0
    return f, z0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method,opts", [("anderson", {}), ("anderson", {"lam": 0.0}),
                                         ("broyden", {}), ("fixed_point", {"tau": 0.7})])
def test_mixed_fault_batch_gives_each_sample_what_it_gets_alone(method, opts, stop_mode, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    kw = dict(method=method, max_iter=60, tol=tol, stop_mode=stop_mode, **opts)
    f, z0 = _mixed(torch.arange(5), dtype)
    z, st = wt.solve(f, z0, **kw)
    # known outcomes
    assert st.diverged[0] and not st.converged[0] and st.nstep[0] == 3
    assert st.converged[4] and st.nstep[4] == 1 and torch.equal(z[4], z0[4])
    assert st.abs_lowest[4] == 0 and st.converged[2]
    # invariants
    assert (st.nstep <= 60).all() and st.n_iter == int(st.nstep.max())
    assert not (st.converged & st.diverged).any()
    lowest = st.rel_lowest if stop_mode == "rel" else st.abs_lowest
    assert (lowest[st.converged] <= tol).all()
    assert torch.isfinite(z).all()
    for i in range(5):
        n = int(st.nstep[i])
        assert (st.abs_trace[i, n:] == st.abs_lowest[i]).all()
        assert (st.rel_trace[i, n:] == st.rel_lowest[i]).all()
        # each sample alone: same flags, steps, traces and iterate, bit for bit
        fi, zi0 = _mixed(torch.tensor([i]), dtype)
        assert torch.equal(zi0[0], z0[i])
        zi, si = wt.solve(fi, zi0, **kw)
        assert si.nstep[0] == st.nstep[i], i
        assert si.converged[0] == st.converged[i] and si.diverged[0] == st.diverged[i], i
        assert torch.equal(si.abs_trace[0], st.abs_trace[i, :si.n_iter]), i
        assert torch.equal(zi[0], z[i]), i
