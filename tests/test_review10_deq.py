"""Review 10 of the DEQ layer: settings checks, repr, backward stats, closed-form gradients."""

import pytest
import torch

import wtmodels as wt

F64 = torch.float64


def linear_problem(D=4, rho=0.8, seed=0):
    """``f(z) = z A^T + x B^T`` with spectral radius ``rho``: ``z* = (I - A)^-1 B x``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    A = A * (rho / torch.linalg.eigvals(A).abs().max())
    B = torch.randn(D, D, generator=g, dtype=F64)
    x = torch.randn(3, D, generator=g, dtype=F64)
    return A, B, x


def test_jacobian_loss_checks_jac_reg_samples_set_after_construction():
    # deq.jac_reg_samples = 0 after construction: jacobian_loss divided by it and returned NaN
    deq = wt.DEQ()
    deq.jac_reg_samples = 0
    with pytest.raises(ValueError, match="jac_reg_samples must be an int >= 1"):
        deq.jacobian_loss(lambda z: 0.5 * z, torch.ones(2, 3))
    with pytest.raises(ValueError, match="jac_reg_samples"):
        deq(lambda z: 0.5 * z, torch.ones(2, 3), jac_reg=True)
    deq.jac_reg_samples = 3  # ||0.5 I||_F^2 / D = 0.25 exactly with Rademacher probes
    torch.testing.assert_close(deq.jacobian_loss(lambda z: 0.5 * z, torch.ones(2, 3)),
                               torch.tensor(0.25))
