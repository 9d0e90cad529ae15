"""The solvers (a researcher burned by torchdeq): every iterate of Anderson and
Broyden against a dense numpy implementation of the documented algorithm; divergence caught
at the hand-counted evaluation; abs / rel traces by hand; an f returning a coarser dtype than
the solve's; options given as exact fractions; peak memory flat in max_iter."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import wtmodels as wt
from wtmodels.solvers import clear_workspace

F64 = torch.float64
SOLVERS = ["fixed_point", "anderson", "broyden"]


def _recording(f):
    """``f`` that keeps a copy of every argument it sees (rows: samples)."""
    seen = []

    def g(z):
        seen.append(z.clone())
        return f(z)
    return g, seen


def _nonnormal_map(D=8, B=3, seed=0):
    """``z -> tanh(0.3 A z) + b_i`` with a non-normal ``A`` (large strictly upper part), as a
    torch batch map and a per-sample numpy map."""
    rng = np.random.default_rng(seed)
    A = np.triu(rng.normal(size=(D, D)), 1) * 2.0 + 0.6 * np.eye(D)
    b = rng.normal(size=(B, D))
    At, bt = torch.tensor(A), torch.tensor(b)
    return (lambda z: torch.tanh(0.3 * z @ At.T) + bt,
            lambda z, i: np.tanh(0.3 * A @ z) + b[i])


def _broyden_dense(f, x0, n, m):
    """``n`` iterates of Broyden's good method: inverse Jacobian of ``g = f(x) - x`` rebuilt
    from ``-I`` by Sherman-Morrison updates over the last ``m`` pairs ``(s, y)``."""
    x, g, pairs, xs = x0.copy(), f(x0) - x0, [], [x0.copy()]
    for _ in range(n - 1):
        H = -np.eye(len(x))
        for s, y in pairs[-m:]:
            Hy = H @ y
            H = H + np.outer(s - Hy, s @ H) / (s @ Hy)
        x_new = x - H @ g
        g_new = f(x_new) - x_new
        pairs.append((x_new - x, g_new - g))
        x, g = x_new, g_new
        xs.append(x.copy())
    return np.array(xs)


def _anderson_dense(f, x0, n, m, lam, beta):
    """``n`` iterates of type-II Anderson as the README writes it: over the last ``m``
    residuals ``G_i``, ``(G G^T + lam diag(||G_i|| ||G_min||)) y = 1``, ``alpha = y / sum y``,
    ``x <- sum_i alpha_i (x_i + beta G_i)``."""
    X, G, xs, x = [], [], [x0.copy()], x0.copy()
    for _ in range(n - 1):
        X.append(x.copy())
        G.append(f(x) - x)
        Xm, Gm = np.array(X[-m:]), np.array(G[-m:])
        H = Gm @ Gm.T
        norms = np.sqrt(np.diag(H))
        y = np.linalg.solve(H + lam * np.diag(norms * norms.min()), np.ones(len(Gm)))
        x = (y / y.sum()) @ (Xm + beta * Gm)
        xs.append(x.copy())
    return np.array(xs)


@pytest.mark.parametrize("m", [20, 3])  # the full history, and a window that wraps
def test_broyden_iterates_are_dense_good_broydens(m):
    B, D = 3, 8
    f, f_np = _nonnormal_map(D, B)
    g, seen = _recording(f)
    _, stats = wt.solve(g, torch.zeros(B, D, dtype=F64), method="broyden", m=m, max_iter=12,
                        tol=1e-13)
    ours = torch.stack(seen).numpy()  # (n_iter, B, D)
    for i in range(B):
        n = int(stats.nstep[i])
        assert n >= 6
        ref = _broyden_dense(lambda z, i=i: f_np(z, i), np.zeros(D), n, m)
        np.testing.assert_allclose(ours[:n, i], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, lam, beta", [(6, 0.0, 1.0), (20, 1e-4, 1.0), (3, 1e-4, 1.0),
                                          (4, 1e-2, 0.5)])
def test_anderson_iterates_are_the_documented_regularised_type_ii(m, lam, beta):
    B, D = 3, 8
    f, f_np = _nonnormal_map(D, B)
    g, seen = _recording(f)
    _, stats = wt.solve(g, torch.zeros(B, D, dtype=F64), method="anderson", m=m, lam=lam,
                        beta=beta, max_iter=12, tol=1e-13)
    ours = torch.stack(seen).numpy()
    for i in range(B):
        n = int(stats.nstep[i])
        assert n >= 6
        ref = _anderson_dense(lambda z, i=i: f_np(z, i), np.zeros(D), n, m, lam, beta)
        np.testing.assert_allclose(ours[:n, i], ref, rtol=0, atol=1e-12)


def _rot(rho):
    return lambda z: rho * torch.stack([z[:, 1], -z[:, 0]], 1) + 1.0


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_divergence_is_flagged_at_the_hand_counted_evaluation(stop_mode):
    # plain iteration from 0: the residual g_k = f(z_k) - z_k obeys g_{k+1} = J g_k, so
    # |g_k| = sqrt(2) |rho|^k; the streak starts at the first k with |rho|^k > div_factor
    # and is flagged at its patience-th evaluation: nstep = k_first + patience
    cases = [  # (map, |rho|, div_factor, patience)
        (lambda z: 1.05 * z + 1.0, 1.05, 10.0, 5),      # slow growth: 1.05^48 > 10
        (lambda z: -1.5 * z + 1.0, 1.5, 10.0, 5),       # growing oscillation: 1.5^6 > 10
        (_rot(1.02), 1.02, 10.0, 5),                    # growing rotation: 1.02^117 > 10
        (lambda z: -1.5 * z + 1.0, 1.5, 3.0, 2),        # 1.5^3 > 3
    ]
    for f, rho, div_factor, patience in cases:
        k_first = math.floor(math.log(div_factor) / math.log(rho)) + 1
        z, stats = wt.solve(f, torch.zeros(1, 2, dtype=F64), method="fixed_point",
                            max_iter=300, tol=1e-8, stop_mode=stop_mode,
                            div_factor=div_factor, patience=patience)
        assert int(stats.nstep[0]) == k_first + patience, (rho, div_factor)
        assert bool(stats.diverged[0]) and not bool(stats.converged[0])
        # the start has the lowest absolute residual: it comes back, in either mode
        assert torch.equal(z, torch.zeros(1, 2, dtype=F64))
        assert float(stats.abs_lowest[0]) == pytest.approx(math.sqrt(2), rel=1e-12)
    # a bounded oscillation (rho = -1) neither converges nor diverges: the whole budget,
    # and with every residual equal the first iterate (the start) stays the lowest
    z, stats = wt.solve(lambda z: 2.0 - z, torch.zeros(1, 2, dtype=F64), method="fixed_point",
                        max_iter=300, tol=1e-8, stop_mode=stop_mode)
    assert int(stats.nstep[0]) == 300 and not stats.diverged[0] and not stats.converged[0]
    assert torch.equal(z, torch.zeros(1, 2, dtype=F64))
    torch.testing.assert_close(stats.abs_trace[0], torch.full((300,), 2 * math.sqrt(2), dtype=F64))


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_damped_traces_nstep_and_returned_iterate_by_hand(stop_mode):
    # z <- z + 0.5 (f(z) - z) with f(z) = 0.5 z + 1 from 0: z_k = 2 - 2 (3/4)^k,
    # g_k = (3/4)^k, f(z_k) = 2 - (3/4)^k; abs_k = g_k, rel_k = g_k / (f(z_k) + 1e-8)
    tol = 1e-3
    k = np.arange(40)
    abs_k = 0.75 ** k
    rel_k = abs_k / (2 - abs_k + 1e-8)
    res = rel_k if stop_mode == "rel" else abs_k
    n = int(np.argmax(res <= tol)) + 1  # abs: 0.75^24 > 1e-3 >= 0.75^25; rel: 0.75^22 / ...
    assert n == (23 if stop_mode == "rel" else 26)
    z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(1, 1, dtype=F64),
                        method="fixed_point", tau=0.5, tol=tol, stop_mode=stop_mode,
                        max_iter=100)
    assert int(stats.nstep[0]) == n and bool(stats.converged[0])
    np.testing.assert_allclose(stats.abs_trace[0].numpy(), abs_k[:n], rtol=1e-12)
    np.testing.assert_allclose(stats.rel_trace[0].numpy(), rel_k[:n], rtol=1e-12)
    assert float(z[0, 0]) == pytest.approx(2 - 2 * 0.75 ** (n - 1), rel=1e-14)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_an_f_returning_a_coarser_dtype_is_not_flagged_at_its_rounding_floor(method):
    # f computes in float16 (its own choice, no autocast) for a float32 z0: the residuals
    # stall at float16's floor and bump around a lucky low by more than div_factor; one of
    # these 16 contractive samples was flagged diverged (the rounding level in play was
    # taken to be float32's). Its floor is now what autocast to float16 would give.
    g = torch.Generator().manual_seed(0)
    for D in (1, 4):  # the draws of an earlier probe, kept so the seed gives the same W
        torch.randn(D, D, generator=g), torch.randn(16, D, generator=g)
    D = 64
    W = torch.randn(D, D, generator=g)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    b = torch.randn(16, D, generator=g)
    f = lambda z: (torch.tanh(z @ W.T) + b).half()  # noqa: E731
    z, stats = wt.solve(f, torch.zeros(16, D), method=method, max_iter=100, tol=1e-7)
    assert not stats.diverged.any(), stats.diverged.nonzero().flatten().tolist()
    ref, _ = wt.solve(lambda z: torch.tanh(z @ W.T.double()) + b.double(),
                      torch.zeros(16, D, dtype=F64), method="anderson", tol=1e-12, max_iter=100)
    assert float(((z.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 2e-3
    # a runaway returning float16 is still caught (rel -> (rho - 1) / rho = 0.33)
    _, stats = wt.solve(lambda z: (1.5 * z + 1.0).half(), torch.zeros(2, 4), method=method,
                        max_iter=100, div_factor=10.0)
    # (the accelerated solvers solve this linear map exactly: then it converges instead)
    assert bool((stats.diverged | stats.converged).all())
    _, stats = wt.solve(lambda z: (1.5 * z + 1.0).half(), torch.zeros(2, 4),
                        method="fixed_point", max_iter=100)
    assert bool(stats.diverged.all())


@pytest.mark.parametrize("method", SOLVERS)
def test_options_given_as_exact_fractions_solve_like_floats(method):
    # Fraction is a numbers.Real: the checks accepted it, then the solve raised a TypeError
    # ('<=' between a tensor and a Fraction, add()'s alpha must be a Number)
    opts = {"fixed_point": {"tau": Fraction(1, 2)},
            "anderson": {"beta": Fraction(1, 2), "lam": Fraction(1, 1000)},
            "broyden": {}}[method]
    A = torch.tensor([[0.5, 0.2], [-0.1, 0.4]], dtype=F64)
    f = lambda z: z @ A.T + 1.0  # noqa: E731
    exact = torch.linalg.solve(torch.eye(2, dtype=F64) - A, torch.ones(2, dtype=F64))
    z, stats = wt.solve(f, torch.zeros(3, 2, dtype=F64), method=method, tol=Fraction(1, 10**8),
                        max_iter=np.int64(200), div_factor=Fraction(10), **opts)
    assert stats.converged.all()
    torch.testing.assert_close(z, exact.expand(3, 2), atol=1e-6, rtol=0)
    zf, _ = wt.solve(f, torch.zeros(3, 2, dtype=F64), method=method, tol=1e-8, max_iter=200,
                     **{k: float(v) for k, v in opts.items()})
    assert torch.equal(z, zf)


@pytest.mark.parametrize("method", SOLVERS)
def test_peak_memory_is_the_same_for_10_and_1000_iterations(method):
    # f(z) = z + 1 has no fixed point and a constant residual: no sample converges or is
    # flagged, so every solve runs its whole budget (Anderson's Gram matrix and Broyden's
    # M are singular all along: their fallback steps). The peak must not follow max_iter:
    # only the (B, n_iter) traces may grow, far below one iterate.
    from benchmarks.solvers import peak_memory_bytes

    B, D = 4, 1 << 15
    iterate = B * D * 4
    peaks = {}
    for max_iter in (10, 1000):
        clear_workspace()  # both solves allocate their history afresh

        def run(max_iter=max_iter):
            z, stats = wt.solve(lambda z: z + 1.0, torch.zeros(B, D), method=method,
                                max_iter=max_iter, tol=1e-12)
            assert int(stats.nstep.min()) == max_iter and not stats.diverged.any()
            assert torch.isfinite(z).all()
        peaks[max_iter] = peak_memory_bytes(run)
    clear_workspace()
    assert peaks[10] > 2 * iterate  # the measurement sees the solver's buffers
    assert abs(peaks[1000] - peaks[10]) < iterate / 4, peaks


def test_register_solver_refuses_malformed_option_checks_naming_the_problem():
    # before: registered fine, then a TypeError at the first solve with that option (list
    # indices / 'int' object is not callable), or a misspelt key whose check never ran
    from wtmodels.solvers import fixed_point

    def make(checks):
        def damped(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", damp=0.5):
            return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                               tau=damp)
        damped.option_checks = checks
        return damped

    def must_be_half(v):
        if v != 0.5:
            raise ValueError(f"damp must be 0.5, got {v}")

    cases = [(["damp"], "must be a dict"), ({"damp": 3}, r"callables.*\['damp'\]"),
             ({"dampening": must_be_half}, r"\['dampening'\].*valid options: \['damp'\]")]
    for checks, message in cases:
        with pytest.raises(ValueError, match=message):
            wt.register_solver("review15_malformed", make(checks))
        assert "review15_malformed" not in wt.list_solvers()
    wt.register_solver("review15_wellformed", make({"damp": must_be_half}))
    try:
        with pytest.raises(ValueError, match="damp must be 0.5"):
            wt.solve(lambda z: 0.5 * z, torch.ones(2, 2), method="review15_wellformed", damp=0.7)
        _, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.ones(2, 2),
                            method="review15_wellformed", damp=0.5)
        assert stats.converged.all()
    finally:
        from wtmodels.solvers import _SOLVERS
        _SOLVERS.pop("review15_wellformed", None)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_anderson_with_a_history_of_one_is_damped_iteration(beta):
    # with m = 1 there is nothing to mix: x <- x + beta (f(x) - x), fixed_point's tau = beta
    A = torch.tensor([[0.5, 0.8], [-0.6, 0.3]], dtype=F64)
    f = lambda z: torch.tanh(z @ A.T) + 1.0  # noqa: E731
    za, sa = wt.solve(f, torch.zeros(2, 2, dtype=F64), method="anderson", m=1, beta=beta,
                      tol=1e-10, max_iter=200)
    zf, sf = wt.solve(f, torch.zeros(2, 2, dtype=F64), method="fixed_point", tau=beta,
                      tol=1e-10, max_iter=200)
    assert sa.converged.all() and torch.equal(sa.nstep, sf.nstep)
    torch.testing.assert_close(za, zf, rtol=0, atol=1e-15)
