"""The fixed-point solvers: option numerics against scipy and closed forms, what
``f`` and ``z0`` may be (sparse, meta), bf16 autocast, bit-identical repeated solves, a batch of
per-sample nonlinear problems against scipy.optimize.root and each sample solved alone."""

import dataclasses

import numpy as np
import pytest
import scipy.optimize
import scipy.optimize as so
import torch

import wtmodels as wt

METHODS = ["anderson", "broyden", "fixed_point"]
F64 = torch.float64


@pytest.mark.parametrize("method", METHODS)
def test_a_sparse_output_of_f_is_refused_naming_the_layout(method):
    # was: RuntimeError "reshape is not implemented for sparse tensors" from inside the solver
    with pytest.raises(ValueError, match=r"f must return a dense \(strided\) tensor.*sparse_coo"):
        wt.solve(lambda z: (0.5 * z + 1).to_sparse(), torch.zeros(4, 3), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_a_sparse_z0_is_refused_naming_the_layout(method):
    with pytest.raises(ValueError, match=r"z0 must be a dense \(strided\) tensor.*sparse_coo"):
        wt.solve(lambda z: 0.5 * z + 1, torch.zeros(4, 3).to_sparse(), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_a_meta_z0_is_refused(method):
    # was: RuntimeError "unknown device type for autocast ..." (a solve decides on values)
    with pytest.raises(ValueError, match="z0 must hold values.*'meta'"):
        wt.solve(lambda z: 0.5 * z + 1, torch.zeros(4, 3, device="meta"), method=method)


def _tanh_problem(dtype):
    rng = np.random.default_rng(0)
    n = 5
    W = rng.standard_normal((n, n))
    W = 0.8 * W / np.linalg.norm(W, 2)
    c = rng.standard_normal((3, n))
    ref = np.stack([so.root(lambda z, i=i: np.tanh(W @ z + c[i]) - z, np.zeros(n),
                            method="hybr", tol=1e-14).x for i in range(3)])
    Wt, ct = torch.tensor(W, dtype=dtype), torch.tensor(c, dtype=dtype)
    return (lambda z: torch.tanh(z @ Wt.T + ct)), torch.zeros(3, n, dtype=dtype), ref


OPTION_GRID = ([("anderson", dict(m=m, beta=b)) for m in (1, 2, 5, 10) for b in (1.0, 0.4)]
               + [("broyden", dict(m=m)) for m in (1, 3, 6, 20)]
               + [("fixed_point", dict(tau=t)) for t in (1.0, 0.5, 0.2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,opts", OPTION_GRID)
def test_options_reach_scipys_root_of_a_nonlinear_map(method, opts, dtype):
    f, z0, ref = _tanh_problem(dtype)
    tol, err = (1e-6, 1e-4) if dtype == torch.float32 else (1e-12, 1e-9)
    z, stats = wt.solve(f, z0, method=method, tol=tol, max_iter=2000, **opts)
    assert bool(stats.converged.all())
    assert np.abs(z.double().numpy() - ref).max() < err
    rel = (f(z) - z).double().norm(dim=1) / (f(z).double().norm(dim=1) + 1e-8)
    # f(z) - z recomputed in float32 carries rounding of ~eps x ||z||
    atol = 1e-7 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(stats.rel_lowest.double(), rel, rtol=1e-3, atol=atol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 16), (3, 4, 6, 6)])
def test_bf16_autocast_around_linear_and_conv_cells(method, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16) if len(shape) == 2 else torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(0.3)
    x = torch.randn(shape)

    def f(z):
        return torch.tanh(layer(z) + x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = wt.solve(f, torch.zeros(shape), method=method, tol=1e-2, max_iter=60)
        with torch.no_grad():
            fz = f(z).float()
    assert z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    assert bool(stats.converged.all())
    # the reported residual is that of the returned z, with f under autocast
    torch.testing.assert_close(stats.abs_lowest, (fz - z).flatten(1).norm(dim=1),
                               rtol=1e-5, atol=1e-7)


def _same(a, b):
    (za, sa), (zb, sb) = a, b
    assert torch.equal(za, zb)
    for field in dataclasses.fields(sa):
        x, y = getattr(sa, field.name), getattr(sb, field.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan()) and torch.equal(
                x.nan_to_num(), y.nan_to_num()), field.name


@pytest.mark.parametrize("method,opts", [("anderson", dict(m=3, beta=0.5)), ("broyden", {}),
                                         ("fixed_point", dict(tau=0.5))])
def test_repeated_solves_are_bit_identical_whatever_ran_in_between(method, opts):
    W = 0.9 * torch.randn(12, 12, generator=torch.Generator().manual_seed(0)) / 12 ** 0.5

    def run(meth, B, dtype, **o):
        c = torch.randn(B, 12, generator=torch.Generator().manual_seed(B)).to(dtype)
        Wd = W.to(dtype)
        return wt.solve(lambda z: torch.tanh(z @ Wd.T + c), torch.zeros(B, 12, dtype=dtype),
                        method=meth, tol=1e-9, max_iter=30, **o)

    wt.solvers.clear_workspace()
    ref = {(B, dt): run(method, B, dt, **opts) for B in (4, 8)
           for dt in (torch.float32, torch.float64)}
    other = "anderson" if method != "anderson" else "broyden"
    for B, dt in [(8, torch.float32), (4, torch.float32), (4, torch.float64),
                  (8, torch.float64), (4, torch.float32)]:
        run(other, 2 * B, dt)  # other shapes and methods reuse the workspace in between
        wt.solve(lambda z: z * float("nan"), torch.zeros(B, 12, dtype=dt), method=method,
                 max_iter=3, **opts)  # leaves NaNs in the kept buffers of this shape
        _same(ref[(B, dt)], run(method, B, dt, **opts))


@pytest.mark.parametrize("method", METHODS)
def test_nonlinear_problem_against_scipy_root_and_batch_independence(method):
    # per sample z = tanh(W_b z + c_b) + 0.1 sin(z), a different W per sample; each sample
    # solved alone gives the same iterate and the same number of steps as in the batch
    g = torch.Generator().manual_seed(3)
    B, D = 4, 6
    W = torch.randn(B, D, D, generator=g, dtype=F64) * 0.25
    c = torch.randn(B, D, generator=g, dtype=F64)

    def f(z, W=W, c=c):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + c) + 0.1 * torch.sin(z)

    z, stats = wt.solve(f, torch.zeros(B, D, dtype=F64), method=method, tol=1e-12,
                        max_iter=300)
    assert stats.converged.all() and not stats.diverged.any()
    assert (stats.rel_lowest <= 1e-12).all() and (stats.nstep <= 300).all()
    for i in range(B):
        def residual(v, i=i):
            t = torch.from_numpy(v)[None]
            return (f(t, W[i:i + 1], c[i:i + 1])[0] - t[0]).numpy()

        root = scipy.optimize.root(residual, np.zeros(D), tol=1e-14).x
        np.testing.assert_allclose(z[i].numpy(), root, atol=1e-9)
        zi, si = wt.solve(lambda t, i=i: f(t, W[i:i + 1], c[i:i + 1]),
                          torch.zeros(1, D, dtype=F64), method=method, tol=1e-12, max_iter=300)
        assert int(si.nstep[0]) == int(stats.nstep[i])
        torch.testing.assert_close(zi[0], z[i], rtol=0, atol=1e-12)
