"""The solvers: odd inputs, per-sample problems against scipy, stop modes across
scales, f's output dtype / storage, an f that raises, huge batches (known answers only)."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import wtmodels as wt
from wtmodels.solvers import common

SOLVERS = ["fixed_point", "anderson", "broyden"]
F64 = torch.float64


def _affine(b):
    """``z = 0.5 z + b``: fixed point ``2 b``, rows independent."""
    return lambda z: 0.5 * z + b[: z.shape[0]]


@pytest.mark.parametrize("method", SOLVERS)
def test_expanded_sliced_requires_grad_scalar_and_single_sample_starts(method):
    b = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    f = _affine(b)
    base = torch.zeros(1, 8)
    big = torch.full((4, 16), 3.0)
    leaf = torch.zeros(4, 8, requires_grad=True)
    for z0 in (base.expand(4, 8), big[:, ::2], leaf):
        z, stats = wt.solve(f, z0, method=method, tol=1e-6)
        torch.testing.assert_close(z, 2 * b, atol=1e-4, rtol=0)
        assert z.is_contiguous() and stats.converged.all()
        assert not z.requires_grad and z.grad_fn is None
        assert not stats.abs_trace.requires_grad and not stats.abs_lowest.requires_grad
    assert (base == 0).all() and (big == 3).all() and (leaf == 0).all() and leaf.grad is None
    assert torch.is_grad_enabled()
    # one scalar per sample, z0 of shape (B,): z = cos(z) + c has one root per c (scipy)
    c = torch.tensor([0.0, 0.5, -1.0], dtype=F64)
    z, stats = wt.solve(lambda z: torch.cos(z) + c, torch.zeros(3, dtype=F64), method=method,
                        tol=1e-12, max_iter=200, stop_mode="abs")
    want = [scipy.optimize.brentq(lambda t, ci=ci: math.cos(t) + ci - t, -3, 3)
            for ci in c.tolist()]
    assert z.shape == (3,) and stats.nstep.shape == (3,) and stats.abs_trace.shape[0] == 3
    assert stats.converged.all()
    np.testing.assert_allclose(z.numpy(), want, atol=1e-11)
    # B = 1
    z, stats = wt.solve(f, torch.zeros(1, 8), method=method, tol=1e-6)
    torch.testing.assert_close(z, 2 * b[:1], atol=1e-4, rtol=0)
    assert stats.nstep.shape == (1,) and stats.converged.tolist() == [True]


@pytest.mark.parametrize("method", SOLVERS)
def test_max_iter_two_stats_shapes_and_honest_flags(method):
    # z = 0.5 z + 1 from 0 (D = 4): residuals 2 then 1 whatever the solver (its first step is
    # a plain one); the sample that starts at the fixed point stops after one evaluation
    z0 = torch.zeros(3, 4)
    z0[1] = 2.0
    z0[2, 0] = math.nan
    z, stats = wt.solve(lambda z: 0.5 * z + 1.0, z0, method=method, max_iter=2, tol=1e-6)
    assert stats.nstep.tolist() == [2, 1, 1] and stats.abs_trace.shape == (3, 2)
    assert stats.converged.tolist() == [False, True, False]
    assert stats.diverged.tolist() == [False, False, True]
    assert stats.abs_trace[0].tolist() == [2.0, 1.0] and stats.abs_trace[1].tolist() == [0, 0]
    assert stats.abs_trace[2].tolist() == [math.inf, math.inf]
    assert torch.equal(z[0], torch.ones(4)) and torch.equal(z[1], torch.full((4,), 2.0))
    assert torch.equal(z[2, 1:], torch.zeros(3)) and math.isnan(z[2, 0])


def _problems(D=20):
    """Five fixed-point problems on R^D (float64): three tanh maps of rising difficulty, one
    affine map 3 z + 1 (plain iteration diverges; root -1/2), one whose f is NaN everywhere."""
    g = torch.Generator().manual_seed(1)
    A = [torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D) * s for s in (0.3, 0.9, 1.0)]
    c = torch.randn(3, D, generator=g, dtype=F64)

    def one(i, z):
        if i < 3:
            return torch.tanh(z @ A[i].T + c[i])
        if i == 3:
            return 3.0 * z + 1.0
        return torch.sqrt(z - 10.0)  # NaN for every finite z below 10

    def numpy_residual(i):
        return lambda v: np.tanh(A[i].numpy() @ v + c[i].numpy()) - v

    return one, numpy_residual


@pytest.mark.parametrize("method", SOLVERS)
def test_a_batch_of_different_problems_matches_scipy_and_each_solved_alone(method):
    D, B = 20, 5
    one, numpy_residual = _problems(D)

    def batch(ids):
        return lambda z: torch.stack([one(i, z[j]) for j, i in enumerate(ids)])

    z0 = torch.zeros(B, D, dtype=F64)
    z, stats = wt.solve(batch(range(B)), z0, method=method, tol=1e-10, max_iter=200)
    for i in range(3):  # the tanh maps: scipy's root
        root = scipy.optimize.root(numpy_residual(i), np.zeros(D), tol=1e-14)
        assert root.success and stats.converged[i]
        np.testing.assert_allclose(z[i].numpy(), root.x, atol=1e-9)
    if method == "fixed_point":  # |3| > 1: flagged, back at its start
        assert stats.diverged[3] and not stats.converged[3] and torch.equal(z[3], z0[3])
    else:  # secant methods solve an affine map: z = -1/2
        assert stats.converged[3]
        torch.testing.assert_close(z[3], torch.full((D,), -0.5, dtype=F64), atol=1e-9, rtol=0)
    assert stats.diverged[4] and not stats.converged[4] and torch.equal(z[4], z0[4])
    assert stats.nstep[4] == 1 and stats.abs_lowest[4] == math.inf
    # each sample as if solved alone: same flags, steps and (to rounding) iterate
    for i in range(B):
        zi, si = wt.solve(batch([i]), z0[i:i + 1], method=method, tol=1e-10, max_iter=200)
        for name in ("nstep", "converged", "diverged"):
            assert getattr(si, name)[0] == getattr(stats, name)[i], (i, name)
        torch.testing.assert_close(zi[0], z[i], atol=1e-12, rtol=0)
    # the returned iterate is the lowest-residual one of the evaluations the sample made
    for i in range(4):
        n = int(stats.nstep[i])
        if stats.diverged[i]:  # "rel" mode: a diverged sample gets its start (lower abs)
            assert stats.abs_lowest[i] == stats.abs_trace[i, 0] < stats.abs_trace[i, 1:n].min()
        else:
            assert stats.rel_lowest[i] == stats.rel_trace[i, :n].min()
        assert (stats.rel_trace[i, n:] == stats.rel_lowest[i]).all()  # documented fill
        fz = one(i, z[i])
        np.testing.assert_allclose(float((fz - z[i]).norm()), float(stats.abs_lowest[i]),
                                   rtol=1e-6, atol=1e-300)


@pytest.mark.parametrize("method", SOLVERS)
def test_stop_modes_across_per_sample_scales(method):
    # f_s(z) = s h(z / s) with s a power of two: the iterates scale exactly, so in "rel" mode
    # every sample takes the same steps and z_s = s z_1; in "abs" mode the residuals scale by s
    # (elementwise ops and rolls only: a BLAS product may sum each row in another order)
    D = 10
    c = torch.randn(1, D, generator=torch.Generator().manual_seed(0))

    def scaled(*powers):
        s = torch.tensor([2.0 ** p for p in powers])[:, None]

        def f(z):
            u = z / s
            return s * 0.9 * torch.tanh(0.6 * u.roll(1, 1) - 0.4 * u.roll(-2, 1) + c)

        return f, s

    f, s = scaled(-10, 0, 10)

    z, stats = wt.solve(f, torch.zeros(3, D), method=method, tol=1e-5, stop_mode="rel")
    assert stats.converged.all() and len(set(stats.nstep.tolist())) == 1
    torch.testing.assert_close(z / s, (z / s)[1:2].expand(3, D), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.abs_trace / s, (stats.abs_trace / s)[1:2].expand(3, -1),
                               rtol=1e-5, atol=0)
    # "abs", tol 1e-5: the small sample stops at once; the large one is at its float32
    # rounding floor (~1e-4, or 0 on an exact fixed point of the rounded map): flags honest,
    # and no divergence read into bumps at that floor
    f_abs, _ = scaled(-20, 0, 10)
    z, stats = wt.solve(f_abs, torch.zeros(3, D), method=method, tol=1e-5, stop_mode="abs",
                        max_iter=30)
    assert stats.converged[:2].tolist() == [True, True] and stats.nstep.tolist()[:1] == [1]
    assert stats.nstep[1] > 1 and not stats.diverged.any()
    assert stats.converged.tolist() == ((f_abs(z) - z).norm(dim=1) <= 1e-5).tolist()
    n = stats.nstep
    for i in range(3):  # lowest abs residual is returned; the columns after it repeat it
        assert stats.abs_lowest[i] == stats.abs_trace[i, :n[i]].min()
        assert (stats.abs_trace[i, n[i]:] == stats.abs_lowest[i]).all()
        assert (stats.rel_trace[i, n[i]:] == stats.rel_lowest[i]).all()
    # a rel tol of two float32 eps is reached, and honestly (the returned z's own residual)
    tol = 2 * torch.finfo(torch.float32).eps
    z, stats = wt.solve(f, torch.zeros(3, D), method=method, tol=tol, max_iter=100)
    fz = f(z)
    rel = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-8)
    assert stats.converged.all() and (rel <= tol).all() and not stats.diverged.any()


@pytest.mark.parametrize("method", SOLVERS)
def test_float16_output_and_a_strided_view_of_one_global_buffer(method):
    b = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    # f returns float16 for a float32 z0: solved in float32 on that f, to fp16's precision
    z, stats = wt.solve(lambda z: (0.5 * z + b).half(), torch.zeros(4, 8), method=method,
                        tol=1e-3)
    assert z.dtype == torch.float32 and stats.converged.all()
    torch.testing.assert_close(z, 2 * b, atol=2e-3, rtol=4e-3)
    fz = (0.5 * z + b).half().float()
    torch.testing.assert_close(stats.abs_lowest, (fz - z).norm(dim=1), rtol=1e-6, atol=0)
    # f writes a transposed slice of one global buffer and returns that (non-contiguous) view:
    # the same storage on every call
    buf = torch.empty(16, 8, dtype=F64)
    A = torch.diag(torch.linspace(-0.8, 0.8, 8, dtype=F64))
    c = b.to(F64)

    def f_view(z):
        out = buf[:8, :4].t()  # (4, 8) view, strides (1, 8)
        out.copy_(torch.tanh(z @ A.T) + c)
        return out

    exact = scipy.optimize.root(
        lambda v: (np.tanh(v.reshape(4, 8) @ A.numpy().T) + c.numpy() - v.reshape(4, 8)).ravel(),
        np.zeros(32), tol=1e-14).x.reshape(4, 8)
    z, stats = wt.solve(f_view, torch.zeros(4, 8, dtype=F64), method=method, tol=1e-11,
                        max_iter=300)
    assert stats.converged.all()
    np.testing.assert_allclose(z.numpy(), exact, atol=1e-9)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("at", [1, 3])
def test_an_exception_in_f_propagates_and_leaves_the_workspace_free(method, at):
    b = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))

    def f(z):
        return 0.5 * torch.cos(z) + b

    want = wt.solve(f, torch.zeros(4, 8), method=method, tol=1e-6)
    boom, calls = KeyboardInterrupt(), [0]

    def f_raising(z):
        calls[0] += 1
        if calls[0] == at:
            raise boom
        return f(z)

    with pytest.raises(KeyboardInterrupt) as info:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            wt.solve(f_raising, torch.zeros(4, 8), method=method, tol=1e-6)
    assert info.value is boom and torch.is_grad_enabled()
    busy = [name for name, (_, in_use) in common._local.__dict__.get("buffers", {}).items()
            if in_use]
    assert busy == []
    got = wt.solve(f, torch.zeros(4, 8), method=method, tol=1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].nstep, want[1].nstep)
    assert got[1].converged.all() and (f(got[0]) - got[0]).abs().max() < 1e-5


@pytest.mark.parametrize("method", SOLVERS)
def test_a_huge_batch_of_scalars(method, monkeypatch):
    # z = a z + c per sample, a in (-0.5, 0.5): z* = c / (1 - a); 200k samples of one value
    g = torch.Generator().manual_seed(4)
    B = 200_000
    a = (torch.rand(B, 1, generator=g, dtype=F64) - 0.5) * 1.0
    c = torch.randn(B, 1, generator=g, dtype=F64)
    widths = []
    real_full = common.Small.full

    def recording_full(self, shape, value, dtype=None):
        if len(shape) == 2 and shape[0] == B:
            widths.append(shape[1])
        return real_full(self, shape, value, dtype)

    monkeypatch.setattr(common.Small, "full", recording_full)
    z, stats = wt.solve(lambda z: a * z + c, torch.zeros(B, 1, dtype=F64), method=method,
                        tol=1e-10, stop_mode="abs", max_iter=400)
    assert stats.converged.all() and not stats.diverged.any()
    torch.testing.assert_close(z, c / (1 - a), atol=1e-8, rtol=0)
    # the traces follow the evaluations made: a first allocation of 64 columns held
    # 2 x 64 x B values whatever the solve needed (512 MB at B = 1e6 in float32)
    n = stats.abs_trace.shape[1]
    assert widths and max(widths) <= max(8, 2 * n)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("layout", ["transposed", "batch_innermost"])
def test_a_dense_z0_with_the_batch_innermost_gives_contiguous_iterates_and_result(method,
                                                                                  layout):
    # z.t() and (C, H, B).permute(2, 0, 1) reshape to (B, D) views with strides (1, B): a
    # plain copy kept them, so f saw a strided first iterate and a solve that returned its
    # start (max_iter=1, or every sample diverged) returned a non-contiguous z
    if layout == "transposed":
        z0 = torch.arange(24.0).reshape(6, 4).t()  # (4, 6)
    else:
        z0 = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)  # (4, 2, 3)
    seen = []

    def f(z):
        seen.append(z.is_contiguous())
        return 0.5 * z + 1.0

    for kwargs in ({"max_iter": 1}, {"tol": 1e-6}):
        z, stats = wt.solve(f, z0, method=method, **kwargs)
        assert z.is_contiguous() and all(seen)
        want = z0 if kwargs.get("max_iter") == 1 else torch.full_like(z0, 2.0)
        torch.testing.assert_close(z, want, atol=1e-5, rtol=0)
    z, stats = wt.solve(lambda z: z * math.nan, z0, method=method)
    assert z.is_contiguous() and torch.equal(z, z0) and stats.diverged.all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_a_non_float_z0_is_refused_naming_the_valid_dtypes(dtype):
    # the message read "must be a floating-point tensor": for a complex z0 (whose values are
    # floating point) it named no dtype the solvers take
    with pytest.raises(ValueError, match=r"float32, float64, bfloat16 or float16.*" + str(dtype)):
        wt.solve(lambda z: z, torch.zeros(2, 3, dtype=dtype))
    with pytest.raises(ValueError, match=r"z0 must be a tensor of shape \(B, \.\.\.\).*got list"):
        wt.solve(lambda z: z, [[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        wt.solve(lambda z: z, torch.tensor(0.0))
