"""Fixed-point solvers against known answers: exact linear solutions, scipy, fault cases."""

import functools
import math

import numpy as np
import pytest
import scipy.optimize
import torch

import wtmodels as wt
import wtmodels.solvers as solvers_pkg
from wtmodels.solvers import anderson, broyden, fixed_point

SOLVERS = ["fixed_point", "anderson", "broyden"]
F64 = torch.float64


def linear_problem(shape, dtype, contraction=0.8, seed=0):
    """``z = A_b z + c_b`` per sample with ``||A_b||_2 = contraction``; exact solution."""
    g = torch.Generator().manual_seed(seed)
    B, D = shape[0], math.prod(shape[1:])
    A = torch.randn(B, D, D, generator=g, dtype=dtype)
    A = contraction * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    c = torch.randn(B, D, generator=g, dtype=dtype)
    exact = torch.linalg.solve(torch.eye(D, dtype=dtype) - A, c).reshape(shape)

    def f(z):
        return (torch.bmm(A, z.reshape(B, D, 1)).squeeze(2) + c).reshape(shape)

    return f, exact


def residuals(f, z):
    B = z.shape[0]
    fz = f(z)
    r = (fz - z).reshape(B, -1).norm(dim=1)
    return r, r / (fz.reshape(B, -1).norm(dim=1) + 1e-8)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("shape", [(4, 12), (3, 2, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_contraction_exact_solution(method, shape, dtype):
    f, exact = linear_problem(shape, dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-11
    z, stats = wt.solve(f, torch.zeros(shape, dtype=dtype), method=method, max_iter=300, tol=tol)
    assert z.shape == shape and z.dtype == dtype
    assert stats.converged.all() and not stats.diverged.any()
    err = (z - exact).reshape(shape[0], -1).norm(dim=1) / exact.reshape(shape[0], -1).norm(dim=1)
    assert err.max() < (1e-4 if dtype == torch.float32 else 1e-9)
    # the reported residuals are those of the returned iterate
    abs_r, rel_r = residuals(f, z)
    torch.testing.assert_close(stats.abs_lowest, abs_r, rtol=1e-2, atol=1e-6)
    assert (stats.rel_lowest <= tol).all() and (rel_r <= 1.5 * tol).all()
    B = shape[0]
    assert stats.nstep.shape == (B,) and stats.abs_trace.shape == (B, stats.n_iter)
    assert stats.rel_trace.shape == (B, stats.n_iter) and int(stats.nstep.max()) == stats.n_iter
    torch.testing.assert_close(stats.abs_trace.min(dim=1).values, stats.abs_lowest)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_accelerated_solvers_beat_plain_iteration(method):
    # symmetric A with eigenvalues spread over [0, 0.95]: plain iteration needs ~360 steps
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.linspace(0, 0.95, 30, dtype=torch.float64)) @ Q.T
    c = torch.randn(4, 30, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(30, dtype=torch.float64) - A, c.T).T

    def f(z):
        return z @ A.T + c

    z0 = torch.zeros(4, 30, dtype=torch.float64)
    _, plain = wt.solve(f, z0, method="fixed_point", max_iter=1000, tol=1e-8)
    z, fast = wt.solve(f, z0, method=method, max_iter=1000, tol=1e-8)
    assert fast.converged.all() and plain.converged.all()
    assert fast.n_iter < plain.n_iter / 4
    torch.testing.assert_close(z, exact, rtol=1e-6, atol=1e-6)


def test_broyden_small_window_wraps_and_converges():
    f, exact = linear_problem((3, 20), torch.float64, contraction=0.9)
    z, stats = broyden(f, torch.zeros(3, 20, dtype=torch.float64), max_iter=200, tol=1e-10, m=3)
    assert stats.converged.all() and stats.n_iter > 4  # the ring of 3 pairs wrapped
    torch.testing.assert_close(z, exact, rtol=1e-8, atol=1e-8)


def chandrasekhar(n=40, c=0.9):
    """Chandrasekhar H-equation, midpoint rule: H = 1 / (1 - c/2 * A H) (Kelley's test)."""
    mu = (np.arange(1, n + 1) - 0.5) / n
    A = (c / (2 * n)) * mu[:, None] / (mu[:, None] + mu[None, :])
    return A


def test_nonlinear_problems_match_scipy():
    A = chandrasekhar()
    At = torch.tensor(A)

    def f_np(h):
        return 1.0 / (1.0 - A @ h)

    reference = scipy.optimize.root(lambda h: f_np(h) - h, np.ones(len(A)), tol=1e-13).x
    ref_anderson = scipy.optimize.anderson(lambda h: f_np(h) - h, np.ones(len(A)), f_tol=1e-12)
    np.testing.assert_allclose(ref_anderson, reference, atol=1e-9)

    def f(h):  # (1, n)
        return 1.0 / (1.0 - h @ At.T)

    # a small tanh network with input injection (contraction ~0.6)
    rng = np.random.default_rng(1)
    W = rng.normal(size=(16, 16))
    W *= 0.6 / np.linalg.norm(W, 2)
    x = rng.normal(size=16)
    ref_net = scipy.optimize.broyden1(lambda z: np.tanh(W @ z + x) - z, np.zeros(16), f_tol=1e-12)
    Wt, xt = torch.tensor(W), torch.tensor(x)

    def g(z):
        return torch.tanh(z @ Wt.T + xt)

    for method in SOLVERS:
        h, stats = wt.solve(f, torch.ones(1, len(A), dtype=torch.float64), method=method,
                            max_iter=200, tol=1e-12)
        assert stats.converged.all()
        np.testing.assert_allclose(h[0].numpy(), reference, atol=1e-9)
        z, stats = wt.solve(g, torch.zeros(1, 16, dtype=torch.float64), method=method,
                            max_iter=200, tol=1e-12)
        assert stats.converged.all()
        np.testing.assert_allclose(z[0].numpy(), ref_net, atol=1e-9)


@pytest.mark.parametrize("method", SOLVERS)
def test_cosine_dottie_number_scalar_per_sample(method):
    z, stats = wt.solve(torch.cos, torch.tensor([0.0, 1.0, -2.0]), method=method, tol=1e-10,
                        max_iter=200, stop_mode="abs")
    assert z.shape == (3,)
    torch.testing.assert_close(z, torch.full((3,), 0.7390851332151607), atol=1e-6, rtol=0)
    assert stats.converged.all()


@pytest.mark.parametrize("method", SOLVERS)
def test_per_sample_stopping_freezes_easy_sample(method):
    D = 8
    rate = torch.tensor([0.1, 0.97])[:, None]  # easy, hard
    c = torch.linspace(-1, 1, D).repeat(2, 1)
    seen = []

    def f(z):
        seen.append(z.clone())
        return rate * torch.sin(z) + c

    z, stats = wt.solve(f, torch.zeros(2, D), method=method, max_iter=300, tol=1e-6)
    assert stats.converged.all()
    easy, hard = stats.nstep.tolist()
    assert easy < hard and hard == len(seen)
    # after the easy sample stopped, f only ever saw its returned iterate
    for z_seen in seen[easy - 1:]:
        torch.testing.assert_close(z_seen[0], z[0], rtol=0, atol=0)
    # its trace holds its lowest residual after it stopped
    assert (stats.rel_trace[0, easy:] == stats.rel_lowest[0]).all()


@pytest.mark.parametrize("method", SOLVERS)
def test_map_without_fixed_point_is_not_converged_and_finite(method):
    # z = exp(z) has no real solution; plain iteration overflows to inf after 5 steps
    z, stats = wt.solve(torch.exp, torch.zeros(3, 4), method=method, max_iter=50, tol=1e-6)
    assert torch.isfinite(z).all() and not stats.converged.any()
    if method == "fixed_point":
        assert stats.diverged.all() and stats.nstep.tolist() == [5, 5, 5]  # f(3.8e6) = inf
    abs_r, _ = residuals(torch.exp, z)
    torch.testing.assert_close(stats.abs_lowest, abs_r)


@pytest.mark.parametrize("method", SOLVERS)
def test_nan_in_one_sample_does_not_touch_the_other(method):
    bad = torch.tensor([False, True])[:, None]

    def f(z):  # sample 0: z = 0.5 z + 1; sample 1: z = log z, NaN once z < 0
        return torch.where(bad, torch.log(z), 0.5 * z + 1.0)

    z, stats = wt.solve(f, torch.full((2, 3), 2.0), method=method, max_iter=60, tol=1e-6)
    assert torch.isfinite(z).all()
    assert stats.converged.tolist() == [True, False]
    assert stats.diverged.tolist() == [False, True]
    torch.testing.assert_close(z[0], torch.full((3,), 2.0), atol=1e-4, rtol=0)


def test_growing_residual_rule_flags_expansive_iteration():
    # plain iteration on z = 2 z + 1 moves away from the fixed point -1: residual doubles
    z0 = torch.zeros(2, 3)
    for stop_mode in ["abs", "rel"]:  # the rule watches the absolute residual in both modes
        z, stats = fixed_point(lambda z: 2 * z + 1, z0, max_iter=100, tol=1e-6, div_factor=10,
                               patience=3, stop_mode=stop_mode)
        assert stats.diverged.all() and not stats.converged.any()
        # 2^k > 10 first at k = 4, three consecutive evaluations: stopped after 7
        assert stats.nstep.tolist() == [7, 7]
    # rel mode: the rel residual keeps falling (towards 1/2) as z runs away, so the lowest-rel
    # iterate is the furthest one (z = 63); a diverged sample gets back its start instead,
    # which has the lower absolute residual, and the stats describe what is returned
    torch.testing.assert_close(z, z0)
    assert stats.abs_lowest.eq(math.sqrt(3)).all() and stats.rel_lowest.eq(1.0).all()
    # the rule off: nothing is flagged, and the lowest-rel iterate is returned as such
    z, stats = fixed_point(lambda z: 2 * z + 1, z0, max_iter=6, tol=1e-6, div_factor=math.inf)
    assert not stats.diverged.any()
    torch.testing.assert_close(z, torch.full((2, 3), 31.0))  # rel 32/63, the lowest seen
    z, _ = fixed_point(lambda z: 2 * z + 1, z0, stop_mode="abs")
    torch.testing.assert_close(z, z0)  # the lowest absolute residual is at the start


@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_singular_anderson_system_falls_back_and_stays_finite(lam):
    # f(z) = z + 1 has no fixed point; every residual is the same, so the Gram matrix is singular
    z, stats = anderson(lambda z: z + 1.0, torch.zeros(2, 5), max_iter=20, tol=1e-6, lam=lam)
    assert torch.isfinite(z).all() and not stats.converged.any()
    assert torch.isfinite(stats.abs_trace).all()


def test_never_reports_unreached_convergence():
    f, _ = linear_problem((3, 10), torch.float64, contraction=0.99)
    for method in SOLVERS:
        z, stats = wt.solve(f, torch.zeros(3, 10, dtype=torch.float64), method=method,
                            max_iter=3, tol=1e-12)
        assert not stats.converged.any() and stats.n_iter == 3
        _, rel_r = residuals(f, z)
        torch.testing.assert_close(stats.rel_lowest, rel_r)


@pytest.mark.parametrize("method", SOLVERS)
def test_bf16_autocast(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(4, 16)
    dtypes = []

    def f(z):
        out = torch.tanh(lin(z)) + x
        dtypes.append(lin(z).dtype)
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = wt.solve(f, torch.zeros(4, 16), method=method, tol=2e-2, max_iter=40)
    assert torch.bfloat16 in dtypes  # f ran under autocast
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert stats.converged.all()
    z_ref, _ = wt.solve(f, torch.zeros(4, 16), method=method, tol=1e-6)
    assert (z - z_ref).abs().max() < 0.1


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid solvers: .*anderson.*broyden.*fixed_point"):
        wt.solve(torch.cos, torch.zeros(2, 2), method="newton")
    with pytest.raises(ValueError, match="anderson"):
        wt.get_solver("nope")


@pytest.mark.parametrize("method", SOLVERS)
def test_unknown_option_raises_naming_valid_options(method):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['history'\].*valid options"):
        wt.solve(torch.cos, torch.zeros(2, 2), method=method, history=3)
    with pytest.raises(TypeError):  # direct calls reject it too
        wt.get_solver(method)(torch.cos, torch.zeros(2, 2), history=3)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter"), ({"tol": 0.0}, "tol"),
    ({"tol": -1e-3}, "tol"), ({"stop_mode": "max"}, "stop_mode"), ({"m": 0}, "m"),
    ({"lam": -1.0}, "lam"), ({"lam": math.inf}, "lam"), ({"beta": 0.0}, "beta"),
    ({"beta": 1.5}, "beta"), ({"patience": 0}, "patience"), ({"div_factor": 0.5}, "div_factor"),
])
def test_bad_values_raise_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        wt.solve(torch.cos, torch.zeros(2, 2), method="anderson", **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tau"):
        wt.solve(torch.cos, torch.zeros(2, 2), method="fixed_point", tau=0)
    with pytest.raises(ValueError, match="shape"):
        wt.solve(lambda z: z[:, :1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="floating"):
        wt.solve(torch.cos, torch.zeros(2, 2, dtype=torch.long))


def test_register_solver_and_duplicates(monkeypatch):
    # a private copy of the registry: the registration must not leak into other tests
    monkeypatch.setattr(solvers_pkg, "_SOLVERS", dict(solvers_pkg._SOLVERS))
    def halfway(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel"):
        return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=0.5)

    wt.register_solver("test_halfway", halfway, overwrite=True)
    assert "test_halfway" in wt.list_solvers()
    z, stats = wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 2), method="test_halfway",
                        tol=1e-8, max_iter=100)
    torch.testing.assert_close(z, torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="already registered"):
        wt.register_solver("test_halfway", halfway)
    with pytest.raises(ValueError, match="valid options: \\[\\]"):
        wt.solve(torch.cos, torch.zeros(2, 2), method="test_halfway", m=3)
    with pytest.raises(ValueError, match="max_iter"):
        wt.register_solver("test_bad", lambda f, z0: (z0, None))


@pytest.mark.parametrize("returns", [
    lambda z0: z0.clone(),                   # no stats: a (2, 3) tensor unpacked into two rows
    lambda z0: (z0.clone(), None),
    lambda z0: (z0[:1].clone(), fixed_point(torch.cos, z0, max_iter=1)[1]),
])
def test_a_registered_solver_returning_something_else_is_refused(monkeypatch, returns):
    monkeypatch.setattr(solvers_pkg, "_SOLVERS", dict(solvers_pkg._SOLVERS))
    wt.register_solver("test_bad_result",
                       lambda f, z0, *, max_iter, tol, stop_mode: returns(z0))
    z0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'test_bad_result' must return \\(z, SolverStats\\)"):
        wt.solve(lambda z: 0.5 * z + 1, z0, method="test_bad_result")
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="'test_bad_result' must return"):
        wt.DEQ(f_solver="test_bad_result")(lambda z: 0.5 * z + x, z0)
    z, _ = wt.DEQ(b_solver="test_bad_result")(lambda z: 0.5 * z + x, z0)
    with pytest.raises(ValueError, match="'test_bad_result' must return"):
        z.sum().backward()


def test_a_partial_of_a_solver_keeps_its_option_checks(monkeypatch):
    monkeypatch.setattr(solvers_pkg, "_SOLVERS", dict(solvers_pkg._SOLVERS))
    wt.register_solver("test_anderson_m2", functools.partial(anderson, m=2))
    with pytest.raises(ValueError, match="beta must lie in"):  # at construction, not first use
        wt.DEQ(f_solver="test_anderson_m2", f_opts={"beta": 2.0})
    z, stats = wt.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 2), method="test_anderson_m2",
                        tol=1e-8)
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full((2, 2), 2.0))


def test_summary_schema():
    f, _ = linear_problem((4, 6), torch.float32)
    _, stats = wt.solve(f, torch.zeros(4, 6), tol=1e-5, max_iter=100)
    s = stats.summary()
    assert set(s) == {"nstep", "rel_residual", "rel_residual_max", "converged", "diverged"}
    assert s["converged"] == 1.0 and s["diverged"] == 0.0
    assert s["rel_residual"] <= s["rel_residual_max"] <= 1e-5
    assert s["nstep"] == float(stats.nstep.double().mean())


@pytest.mark.parametrize("method", SOLVERS)
def test_accelerator_code_path_copying_to_the_host(method, monkeypatch):
    # on accelerators the per-sample arrays are host copies (not shared memory): run that
    # code path on CPU tensors
    from wtmodels.solvers import common

    original = common.Small.__init__

    def as_if_on_a_device(self, like):
        original(self, like)
        self.cpu = False

    monkeypatch.setattr(common.Small, "__init__", as_if_on_a_device)
    monkeypatch.setattr(common.Small, "of", lambda self, t: t.numpy().copy())  # no sharing
    monkeypatch.setattr(common.Small, "torch", lambda self, a: torch.from_numpy(a).clone())
    f, exact = linear_problem((3, 2, 3, 3), torch.float64)
    z, stats = wt.solve(f, torch.zeros(3, 2, 3, 3, dtype=F64), method=method, max_iter=300,
                        tol=1e-11)
    assert stats.converged.all() and isinstance(stats.nstep, torch.Tensor)
    torch.testing.assert_close(z, exact, rtol=1e-9, atol=1e-9)
    bad = torch.tensor([False, True])[:, None]
    z, stats = wt.solve(lambda z: torch.where(bad, torch.log(z), 0.5 * z + 1.0),
                        torch.full((2, 3), 2.0), method=method, max_iter=60, tol=1e-6)
    assert torch.isfinite(z).all() and stats.diverged.tolist() == [False, True]


def test_nested_solves_and_returned_memory_is_own():
    # f itself runs a solve of the same kind and shape: the inner one gets fresh buffers
    def f(z):
        inner, _ = wt.solve(lambda y: 0.5 * y + z, torch.zeros_like(z), tol=1e-10)  # y = 2 z
        return 0.25 * inner + 1.0  # z = 0.5 z + 1 -> 2

    z0 = torch.zeros(3, 4, dtype=F64)
    z, stats = wt.solve(f, z0, tol=1e-9, max_iter=100)
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full((3, 4), 2.0, dtype=F64))
    z_again, _ = wt.solve(f, z0, tol=1e-9, max_iter=100)  # reuses the kept buffers
    torch.testing.assert_close(z, z_again, rtol=0, atol=0)
    # nothing returned aliases z0 or the solver's buffers
    z_start, _ = wt.solve(lambda z: z + 1, z0, max_iter=3, stop_mode="abs")
    assert z_start.data_ptr() != z0.data_ptr()


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_returns_lowest_residual_iterate_of_non_monotone_run(method, stop_mode):
    # z = A z + c, A non-normal with spectral radius > 1: residuals rise and fall (and for plain
    # iteration the best iterate lies many steps back, beyond any history window or pool).
    g = torch.Generator().manual_seed(3)
    B, D = 5, 12
    Q = torch.linalg.qr(torch.randn(B, D, D, generator=g, dtype=F64))[0]
    A = 1.05 * Q + 0.6 * torch.randn(B, D, D, generator=g, dtype=F64).triu(1)
    c = torch.randn(B, D, generator=g, dtype=F64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.bmm(A, z[:, :, None])[:, :, 0] + c

    z, stats = wt.solve(f, torch.zeros(B, D, dtype=F64), method=method, max_iter=40, tol=1e-12,
                        stop_mode=stop_mode, div_factor=math.inf)
    # brute force: the residual of every iterate f saw, per sample
    res = torch.stack([residuals(f, s)[stop_mode == "rel"] for s in seen[:40]])  # (40, B)
    res = res.nan_to_num(math.inf)
    best = res.argmin(0)
    assert not stats.converged.any()
    assert (res[1:] > res[:-1]).any()  # non-monotone
    if method == "fixed_point":
        assert (best < 40 - 8).any()  # some sample's best is older than the iterate pool
    for b in range(B):
        torch.testing.assert_close(z[b], seen[best[b]][b], rtol=0, atol=0)
    torch.testing.assert_close(stats.rel_lowest if stop_mode == "rel" else stats.abs_lowest,
                               res.min(0).values)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_z0_reports_the_residual_of_the_returned_iterate(method, dtype):
    # f sees the iterate rounded to z0's dtype; the reported residual is that iterate's
    torch.manual_seed(0)
    W, b = torch.randn(16, 16) * 0.3 / 4, torch.randn(8, 16)

    def f(z):
        return torch.tanh(z @ W.T.to(z.dtype) + b.to(z.dtype))

    z, stats = wt.solve(f, torch.zeros(8, 16, dtype=dtype), method=method, tol=1e-5,
                        max_iter=60)
    assert z.dtype == dtype
    fz = f(z).float()
    rel = (fz - z.float()).norm(dim=1) / (fz.norm(dim=1) + 1e-8)
    torch.testing.assert_close(stats.rel_lowest, rel, rtol=1e-3, atol=1e-7)
    assert not (stats.converged & (rel > 1e-5)).any()
    _, loose = wt.solve(f, torch.zeros(8, 16, dtype=dtype), method=method, tol=2e-2)
    assert loose.converged.all()  # a tolerance above the precision is reached


@pytest.mark.parametrize("method", SOLVERS)
def test_solvers_cope_with_f_reusing_its_output_buffer(method):
    A, b = torch.diag(torch.tensor([0.9, 0.5, -0.7, 0.2], dtype=torch.float64)), torch.ones(2, 4,
                                                                                       dtype=F64)
    buf = torch.empty(2, 4, dtype=F64)

    def f_buf(z):
        torch.matmul(z, A.T, out=buf)
        return buf.add_(b)

    want = wt.solve(lambda z: z @ A.T + b, torch.zeros(2, 4, dtype=F64), method=method,
                    tol=1e-10, max_iter=200)
    got = wt.solve(f_buf, torch.zeros(2, 4, dtype=F64), method=method, tol=1e-10, max_iter=200)
    assert got[1].converged.all() and got[1].nstep.tolist() == want[1].nstep.tolist()
    torch.testing.assert_close(got[0], want[0])


def test_broyden_takes_one_spare_buffer_for_f_reusing_its_output(monkeypatch):
    # the rebuilt f(x_prev) went into a fresh scratch entry every step: the cached buffer was
    # busy, so each step allocated one more (B, D) tensor, all held until the solve ended
    import contextlib
    import sys

    module = sys.modules["wtmodels.solvers.broyden"]
    taken, real = [], module.scratch

    @contextlib.contextmanager
    def counting(name, shape, like):
        taken.append(name)
        with real(name, shape, like) as buf:
            yield buf

    monkeypatch.setattr(module, "scratch", counting)
    A = 0.9 * torch.eye(4, dtype=F64)
    buf = torch.empty(2, 4, dtype=F64)
    z, stats = broyden(lambda z: torch.add(torch.tanh(z @ A.T), 1.0, out=buf),
                       torch.zeros(2, 4, dtype=F64), tol=1e-10, max_iter=60)
    assert stats.converged.all() and int(stats.nstep.max()) > 3
    assert taken.count("broyden.fx_prev") == 1


@pytest.mark.parametrize("method", SOLVERS)
def test_the_callers_z0_is_never_written(method):
    z0 = -torch.ones(4, 6)
    wt.solve(lambda z: 0.5 * torch.tanh(torch.relu_(z)) + 1.0, z0, method=method, max_iter=5)
    assert (z0 == -1).all()


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_f_returning_its_argument_written_in_place_is_refused(method, dtype):
    # z.mul_(0.5).add_(1) is z itself: the residual f(z) - z read 0 and the solve reported
    # convergence at the first step, returning f(z0) = 1 (the fixed point is 2)
    with pytest.raises(ValueError, match="modified its argument in place"):
        wt.solve(lambda z: z.mul_(0.5).add_(1.0), torch.zeros(2, 3, dtype=dtype),
                 method=method)
    # writing the argument in place and returning a new tensor stays as it was (see above)
    _, stats = wt.solve(lambda z: 0.5 * torch.relu_(z) + 1.0, torch.zeros(2, 3),
                        method=method, tol=1e-6)
    assert stats.converged.all()


@pytest.mark.parametrize("method", ["fixed_point", "broyden"])
def test_falling_transient_is_not_divergence(method):
    # spectral radius 0.5 but far from normal: the residual jumps 100x, then falls steadily
    # (Anderson's own iterates there rise again, 100 -> ~200, after 8 evaluations: flagged)
    A = torch.tensor([[0.5, 100.0], [0.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    z, stats = wt.solve(lambda z: z @ A.T + b, torch.zeros(1, 2, dtype=torch.float64),
                        method=method, tol=1e-8, max_iter=100)
    assert stats.converged.all() and not stats.diverged.any()
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, b[0])
    torch.testing.assert_close(z[0], exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", SOLVERS)
def test_memory_follows_the_evaluations_made_not_the_budget(method):
    # traces grow on demand and the history is capped at max_iter: a huge budget or history
    # costs nothing up front
    z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(64, 3), method=method,
                        max_iter=10**9, tol=1e-6)
    assert stats.converged.all() and stats.abs_trace.shape[1] == int(stats.nstep.max())
    if method != "fixed_point":
        z, stats = wt.solve(lambda z: 0.5 * z + 1.0, torch.zeros(64, 3), method=method,
                            max_iter=20, tol=1e-4, m=10**9)
        assert stats.converged.all()
    # more than 64 evaluations: the traces grow past their first allocation, in order
    z, stats = fixed_point(lambda z: 0.95 * z + 1.0, torch.zeros(2, 3), max_iter=200,
                           tol=1e-6, stop_mode="abs")
    assert int(stats.nstep.max()) > 128 and bool((stats.abs_trace.diff(dim=1) <= 0).all())


def test_complex_output_is_refused():
    with pytest.raises(ValueError, match="real floating-point"):
        wt.solve(lambda z: (0.5 * z).to(torch.complex64), torch.zeros(2, 3))


def test_divergence_defaults_of_the_unrolled_deq_match_the_solvers():
    import inspect

    from wtmodels.solvers.common import DIVERGENCE_DEFAULTS

    for method in SOLVERS:
        params = inspect.signature(solvers_pkg.get_solver(method)).parameters
        assert {k: params[k].default for k in DIVERGENCE_DEFAULTS} == DIVERGENCE_DEFAULTS


def test_a_longer_anderson_history_does_not_slow_convergence():
    # the regularisation follows the smallest residual in the history, not the oldest/largest
    g = torch.Generator().manual_seed(0)
    W = torch.randn(100, 100, generator=g, dtype=F64)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    b = torch.randn(4, 100, generator=g, dtype=F64)
    steps = {}
    for m in (5, 20, 50):
        _, stats = anderson(lambda z: torch.tanh(z @ W.T) + b, torch.zeros(4, 100, dtype=F64),
                            m=m, tol=1e-6, max_iter=200)
        assert stats.converged.all()
        steps[m] = int(stats.nstep.max())
    assert steps[20] <= steps[5] + 2 and steps[50] <= steps[5] + 2, steps


@pytest.mark.parametrize("method", SOLVERS)
def test_a_solve_under_inference_mode_leaves_later_solves_working(method):
    # the CPU history buffers kept between solves were inference tensors after a solve inside
    # torch.inference_mode (an eval pass), and the next solve outside it could not write them
    f, z_star = linear_problem((4, 6), torch.float32)
    with torch.inference_mode():
        z_eval, _ = wt.solve(f, torch.zeros(4, 6), method=method, tol=1e-6)
    z, stats = wt.solve(f, torch.zeros(4, 6), method=method, tol=1e-6)
    assert stats.converged.all() and not z.is_inference()
    torch.testing.assert_close(z, z_star, atol=1e-4, rtol=0)
    torch.testing.assert_close(z_eval, z, rtol=0, atol=0)


def test_small_solve_flags_exactly_singular_systems_and_solves_the_rest():
    from wtmodels.solvers.common import Small

    rng = np.random.default_rng(0)
    A, b = rng.random((6, 3, 3)) + 3 * np.eye(3), rng.random((6, 3))
    A[2] = 0.0
    A[4] = [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 1.0, 1.0]]  # proportional rows
    x, ok = Small(torch.zeros(1)).solve(A, b)
    assert ok.tolist() == [True, True, False, True, False, True]
    assert np.isnan(x[~ok]).all()
    assert np.allclose(x[ok], np.linalg.solve(A[ok], b[ok][..., None])[..., 0])


def test_broyden_samples_that_stopped_do_not_make_the_small_systems_singular(monkeypatch):
    from wtmodels.solvers.common import Small

    calls = []
    real = Small._solve_regular
    monkeypatch.setattr(Small, "_solve_regular",
                        staticmethod(lambda A, b: calls.append(1) or real(A, b)))
    a = torch.linspace(0.1, 0.9, 16, dtype=torch.float64)[:, None]  # (16, 1): per-sample rates
    z, stats = wt.solve(lambda z: a * torch.tanh(z) + 1, torch.zeros(16, 4, dtype=torch.float64),
                        method="broyden", max_iter=40, tol=1e-10)
    assert stats.converged.all() and len(set(stats.nstep.tolist())) > 1  # stopped apart
    assert torch.allclose(z, a * torch.tanh(z) + 1, atol=1e-8)
    assert calls == []  # a stopped sample's zero secant pair is kept out of the batched solve
