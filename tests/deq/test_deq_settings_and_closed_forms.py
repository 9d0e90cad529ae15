"""The DEQ layer: settings checks, repr, backward stats, closed-form gradients."""

import re

import numpy as np
import pytest
import torch
from torch import nn

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
    with pytest.raises(ValueError, match="jac_reg_samples must be an integer >= 1"):
        deq.jacobian_loss(lambda z: 0.5 * z, torch.ones(2, 3))
    with pytest.raises(ValueError, match="jac_reg_samples"):
        deq(lambda z: 0.5 * z, torch.ones(2, 3), jac_reg=True)
    deq.jac_reg_samples = 3  # ||0.5 I||_F^2 / D = 0.25 exactly with Rademacher probes
    torch.testing.assert_close(deq.jacobian_loss(lambda z: 0.5 * z, torch.ones(2, 3)),
                               torch.tensor(0.25))


def test_a_frozen_f_clears_the_stats_of_an_older_adjoint_solve():
    # after a trained step, a step with the backbone frozen runs no adjoint solve, but
    # last_backward_stats still showed the older solve's stats as if it had run
    torch.manual_seed(0)
    cell, head = nn.Linear(4, 4), nn.Linear(4, 2)
    x = torch.randn(3, 4)
    deq = wt.DEQ(grad="ift")
    f = lambda z: torch.tanh(0.3 * cell(z) + x)  # noqa: E731
    z, _ = deq(f, torch.zeros(3, 4))
    head(z).sum().backward()
    assert deq.last_backward_stats is not None and deq.last_backward_stats.converged.all()
    cell.requires_grad_(False)
    z, _ = deq(f, torch.zeros(3, 4))
    head(z).sum().backward()
    assert deq.last_backward_stats is None


@pytest.mark.parametrize("kwargs, hint", [
    ({"foo": 1}, r"\['foo'\]"),
    ({"max_iter": 30}, "f_max_iter"),          # wt.solve's name
    ({"tol": 1e-4, "solver": "anderson"}, "f_tol"),
    ({"m": 5}, "f_opts / b_opts"),              # a solver option
])
def test_unknown_keywords_raise_value_error_naming_the_valid_ones(kwargs, hint):
    # wt.DEQ(max_iter=30) raised Python's TypeError without the valid settings
    with pytest.raises(ValueError, match="unknown keyword") as info:
        wt.DEQ(**kwargs)
    assert "f_max_iter" in str(info.value) and "jac_reg_samples" in str(info.value)
    assert re.search(hint, str(info.value))
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['jac'\]; valid: \['jac_reg'\]"):
        wt.DEQ()(lambda z: 0.5 * z, torch.ones(2, 3), jac=True)


def test_repr_shows_every_setting_that_differs_from_its_default_and_round_trips():
    # the repr left out stop_mode, phantom_steps, tau, eval_f_max_iter, the solver options and
    # jac_reg: two printed models with different DEQs looked the same
    assert repr(wt.DEQ()) == ("DEQ(f_solver='anderson', f_max_iter=30, f_tol=0.0001, "
                              "b_solver='anderson', b_max_iter=30, b_tol=1e-06, grad='ift')")
    settings = dict(f_solver="broyden", f_max_iter=7, f_tol=1e-5, b_solver="fixed_point",
                    b_max_iter=9, b_tol=1e-7, grad="phantom", stop_mode="abs", phantom_steps=3,
                    tau=0.5, eval_f_max_iter=11, f_opts={"patience": 3},
                    b_opts={"tau": 0.7}, jac_reg=True, jac_reg_samples=2)
    deq = wt.DEQ(**settings)
    text = repr(deq)
    for key in settings:
        assert f"{key}=" in text
    again = eval("wt.DEQ(" + text[len("DEQ("):], {"wt": wt})  # noqa: S307
    assert {k: getattr(again, k) for k in settings} == settings
    # numpy numbers (accepted as settings) print as numbers
    text = repr(wt.DEQ(f_max_iter=np.int64(12), f_tol=np.float64(1e-3), tau=np.float32(0.5)))
    assert "f_max_iter=12, f_tol=0.001," in text and text.endswith("tau=0.5)")


@pytest.mark.parametrize("tau, steps", [(1.0, 5), (0.5, 3), (0.3, 7), (1.0, 1)])
def test_phantom_gradient_equals_its_closed_form_for_a_linear_map(tau, steps):
    # K steps z <- (1 - tau) z + tau (A z + B x) from z*: dz/dx = tau sum_{k<K} M^k B with
    # M = (1 - tau) I + tau A (z* itself is a constant to the phantom gradient)
    A, B, x = linear_problem()
    x.requires_grad_()
    deq = wt.DEQ(grad="phantom", tau=tau, phantom_steps=steps, f_tol=1e-13, f_max_iter=200)
    z, stats = deq(lambda z: z @ A.T + x @ B.T, torch.zeros(3, 4, dtype=F64))
    assert stats.converged.all()
    eye = torch.eye(4, dtype=F64)
    torch.testing.assert_close(z, x.detach() @ B.T @ torch.linalg.inv(eye - A).T)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    (z * g).sum().backward()
    M = (1 - tau) * eye + tau * A
    S = tau * sum(torch.linalg.matrix_power(M, k) for k in range(steps))
    torch.testing.assert_close(x.grad, g @ S @ B)


@pytest.mark.parametrize("grad", ["ift", "unroll"])
def test_gradients_reach_an_encoder_through_a_non_leaf_input(grad):
    # f closes over x = encoder(input), a non-leaf: gradcheck in float64 for the encoder's
    # weight, the cell's weight and the raw input
    torch.manual_seed(0)
    W = (0.3 * torch.randn(5, 5, dtype=F64)).requires_grad_()
    E = torch.randn(5, 3, dtype=F64, requires_grad=True)
    inp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    deq = wt.DEQ(grad=grad, f_tol=1e-13, b_tol=1e-13, f_max_iter=300, b_max_iter=300)

    def fn(W, E, inp):
        x = inp @ E.T
        return deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros(2, 5, dtype=F64))[0]

    assert torch.autograd.gradcheck(fn, (W, E, inp), atol=1e-6, rtol=1e-5)
