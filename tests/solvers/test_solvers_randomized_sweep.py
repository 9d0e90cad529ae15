"""Fixed-point solvers, findings of a randomized sweep (float32 values near overflow).

Known answers: a constant map ``f(z) = c`` has the fixed point ``c``, reached by every solver's
first step (``z1 = f(z0) = c``), so its second evaluation has residual 0.
"""

import warnings

import pytest
import torch

import wtmodels as wt

METHODS = ["fixed_point", "anderson", "broyden"]


@pytest.mark.parametrize("method", METHODS)
def test_huge_finite_sample_not_flagged_by_a_non_finite_neighbour(method):
    # sample 1's norms (2e38) are finite in float32, but their float32 sum is not: it was read
    # as non-finite (diverged at step 1, its start returned) only when another sample of the
    # batch was non-finite; alone it converged at step 2 to its fixed point 2e38
    c = torch.tensor([[float("inf")], [2e38]])
    z, st = wt.solve(lambda z: c.clone(), torch.zeros(2, 1), method=method, max_iter=10,
                     tol=1e-6)
    assert st.diverged.tolist() == [True, False]
    assert st.converged.tolist() == [False, True]
    assert st.nstep.tolist() == [1, 2]
    assert z[1].item() == pytest.approx(2e38, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_huge_finite_values_raise_no_numpy_warning(method, stop_mode):
    # f(z) = 3e38 from 0: residual 3e38, and div_factor x 3e38 overflows float32 (numpy warned,
    # an error under warnings.simplefilter("error")); the fixed point 3e38 is reached at step 2
    c = torch.full((2, 1), 3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, st = wt.solve(lambda z: c.clone(), torch.zeros(2, 1), method=method, max_iter=10,
                         tol=1e-6, stop_mode=stop_mode)
    assert st.converged.tolist() == [True, True]
    assert st.nstep.tolist() == [2, 2]
    assert torch.equal(z, c)


@pytest.mark.parametrize("method", METHODS)
def test_huge_start_with_zero_image_raises_no_numpy_warning(method):
    # z0 = 3e38, f(z) = 0: the relative residual 3e38 / (0 + 1e-8) overflows float32 (numpy
    # warned); the fixed point 0 is reached at step 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, st = wt.solve(lambda z: torch.zeros_like(z), torch.full((2, 1), 3e38),
                         method=method, max_iter=10, tol=1e-6, stop_mode="rel")
    assert st.converged.tolist() == [True, True]
    assert st.nstep.tolist() == [2, 2]
    assert torch.equal(z, torch.zeros(2, 1))
