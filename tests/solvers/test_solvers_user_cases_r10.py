"""The batched fixed-point solvers: cases found by a new user's checks."""

import pytest
import torch

import wtmodels as wt

METHODS = ["fixed_point", "anderson", "broyden"]


@pytest.mark.parametrize("method", METHODS)
def test_an_f_that_writes_its_argument_in_place_under_inference_mode(method):
    # inference tensors have no version counter, so the in-place write of a cell starting
    # with nn.ReLU(inplace=True) went unseen: every iterate was rectified, the fixed point
    # (with negative entries) could never be reached, and an eval pass under
    # torch.inference_mode() silently got a wrong z (off by ~1.5, 200 steps, not converged)
    torch.manual_seed(0)
    W = torch.randn(4, 4, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.tensor([-1.0, -2.0, 0.5, -0.7], dtype=torch.float64)
    relu = torch.nn.ReLU(inplace=True)
    with torch.inference_mode():
        z, stats = wt.solve(lambda z: relu(z) @ W.T + b, torch.zeros(2, 4, dtype=torch.float64),
                            method=method, tol=1e-12, max_iter=200)
    # the known answer: plain iteration of the out-of-place map, in float64
    zs = torch.zeros(4, dtype=torch.float64)
    for _ in range(200):
        zs = torch.relu(zs) @ W.T + b
    assert (zs < 0).any()  # the fixed point has negative entries
    assert stats.converged.all()
    torch.testing.assert_close(z, zs.expand(2, 4), atol=1e-10, rtol=0)

    # one that returns its argument written in place read residual 0 at z0 (a convergence
    # never reached, z = z0); with a copy it is an ordinary f: z = 0.5 z + 1 -> 2
    with torch.inference_mode():
        z, stats = wt.solve(lambda z: z.mul_(0.5).add_(1.0),
                            torch.zeros(3, 2, dtype=torch.float64), method=method, tol=1e-12,
                            max_iter=200)
    assert stats.converged.all() and (stats.nstep > 1).all()
    torch.testing.assert_close(z, torch.full((3, 2), 2.0, dtype=torch.float64), atol=1e-10,
                               rtol=0)


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
