"""The fixed-point solvers at extreme scales of the values and of the residuals: fixed points
of large float32 values are found (not flagged diverged), tiny residuals do not underflow into a
false convergence, and Anderson takes as many steps whatever the scale of its residuals or the
length of its history. Residuals are checked against a float64 scaled norm and closed forms."""

import pytest
import torch

import wtmodels as wt

F64 = torch.float64
SOLVERS = ["fixed_point", "anderson", "broyden"]


def true_residuals(f, z):
    """(abs, rel) per sample in float64, with a scaled norm (no over/underflow)."""
    with torch.no_grad():
        fz = f(z.clone()).flatten(1).double()
    zz = z.flatten(1).double()

    def norm(t):
        s = t.abs().amax(1, keepdim=True).clamp_min(1e-300)
        return s[:, 0] * (t / s).norm(dim=1)

    a = norm(fz - zz)
    return a, a / (norm(fz) + 1e-8)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_a_fixed_point_of_large_float32_values_is_found_not_flagged_diverged(method, scale):
    # z = 0.5 z + 1e30 has the fixed point 2e30, representable in float32 (max 3.4e38); the norm
    # squared the entries and overflowed to inf, so every sample was flagged diverged after one
    # evaluation and handed back z0 = 0 with abs_lowest = inf
    def f(z):
        return 0.5 * z + scale

    z, stats = wt.solve(f, torch.zeros(3, 4), method=method, tol=1e-5, max_iter=100)
    assert stats.converged.all() and not stats.diverged.any(), stats
    torch.testing.assert_close(z / (2 * scale), torch.ones(3, 4), rtol=1e-4, atol=0)
    a, r = true_residuals(f, z)
    torch.testing.assert_close(stats.rel_lowest.double(), r, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(stats.abs_lowest.double() / scale, a / scale, rtol=1e-3,
                               atol=1e-12)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-20), (torch.float32, 1e-30),
                                         (F64, 1e-170)])
def test_tiny_residuals_do_not_underflow_into_a_false_convergence(method, dtype, scale):
    # abs stop mode with a tolerance below the problem's scale: the residual's squares
    # underflowed to 0 (float32 below ~1e-19), so a sample still 2e-30 away from its fixed point
    # was reported converged at tol 1e-35 after one evaluation
    def f(z):
        return 0.5 * z + scale

    tol = scale * 1e-5
    z, stats = wt.solve(f, torch.zeros(2, 4, dtype=dtype), method=method, tol=tol,
                        stop_mode="abs", max_iter=100)
    a, _ = true_residuals(f, z)
    assert (a <= tol).all() and stats.converged.all(), (a, stats)
    torch.testing.assert_close(stats.abs_lowest.double() / scale, a / scale, rtol=1e-2,
                               atol=1e-7)
    torch.testing.assert_close(z.double() / (2 * scale), torch.ones(2, 4, dtype=F64),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale", [1e-12, 1e-100])
def test_anderson_takes_as_many_steps_at_any_scale_of_the_residuals(scale):
    # the guard 1e-30 added as is to the Gram matrix outweighed float64 residuals below ~1e-15:
    # the same problem scaled by 1e-12 took 53 steps instead of 17, by 1e-100 80 (plain
    # iteration: 70), as the mixing weights fell back to an average of the history
    g = torch.Generator().manual_seed(0)
    A = 0.3 * torch.randn(6, 6, generator=g, dtype=F64)
    b = torch.randn(4, 6, generator=g, dtype=F64)
    steps = {}
    for s in (1.0, scale):
        _, stats = wt.solve(lambda z, s=s: torch.tanh(z @ A.T) + s * b,
                            torch.zeros(4, 6, dtype=F64), method="anderson", stop_mode="abs",
                            tol=1e-8 * s, max_iter=200)
        assert stats.converged.all()
        steps[s] = int(stats.nstep.max())
    assert steps[scale] <= steps[1.0] + 3, steps


@pytest.mark.parametrize("D", [1, 5, 50])
def test_a_long_anderson_history_is_no_slower_than_plain_iteration(D):
    # lam was scaled by the smallest squared residual in the history: on z = cos(z) the mixing
    # put large, cancelling weights on old iterates, so m = 100 did not converge in 100
    # evaluations (plain iteration needs 36, scipy.optimize.anderson with M=100 about 7-23)
    z0 = torch.randn(2, D, dtype=F64, generator=torch.Generator().manual_seed(D))
    _, plain = wt.solve(torch.cos, z0, method="fixed_point", tol=1e-6, max_iter=100)
    for m in (5, 30, 100):
        z, stats = wt.solve(torch.cos, z0, method="anderson", m=m, tol=1e-6, max_iter=100)
        assert stats.converged.all(), (m, stats.nstep)
        assert int(stats.nstep.max()) <= int(plain.nstep.max()) // 2, (m, stats.nstep)
        torch.testing.assert_close(z, torch.full_like(z, 0.7390851332151607), rtol=0, atol=1e-5)
