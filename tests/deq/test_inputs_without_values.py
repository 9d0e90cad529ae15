"""The solvers and wt.DEQ: inputs without values (meta, sparse) through every
DEQ mode, a non-finite (NaN) start that must not poison the other samples' gradients, an empty
non-batch dimension with the Jacobian regulariser, per-sample step counts
and residuals checked against hand-computed values. Every expected value is a closed form."""

import pytest
import torch

import wtmodels as wt

F64 = torch.float64
GRADS = ["ift", "phantom", "unroll"]


@pytest.mark.parametrize("grad", GRADS)
def test_a_deq_refuses_a_meta_or_sparse_z0_with_the_solvers_value_error(grad):
    # DEQ read the start's finiteness first: a bare "Tensor.item() cannot be called on meta
    # tensors" RuntimeError / a sparse NotImplementedError, not the documented ValueError
    p = torch.nn.Parameter(torch.tensor(0.5))
    deq = wt.DEQ(grad=grad)
    with pytest.raises(ValueError, match="z0 must hold values.*'meta'"):
        deq(lambda z: p * z + 1, torch.zeros(3, 2, device="meta"))
    with pytest.raises(ValueError, match="dense.*sparse"):
        deq(lambda z: p * z + 1, torch.zeros(3, 2).to_sparse())


@pytest.mark.parametrize("grad", GRADS)
def test_jac_loss_of_an_empty_non_batch_dimension_is_zero_not_nan(grad):
    # ||df/dz||_F^2 of an empty Jacobian is 0; it was 0 / numel = 0 / 0 = NaN, poisoning a
    # loss `task + c * jac_loss`
    p = torch.nn.Parameter(torch.tensor(0.5))
    z, stats = wt.DEQ(grad=grad, jac_reg=True)(lambda z: p * z + 1, torch.zeros(3, 0, 4))
    assert z.shape == (3, 0, 4)
    assert float(stats.jac_loss.detach()) == 0.0
    (z.sum() + stats.jac_loss).backward()
    assert p.grad is None or float(p.grad) == 0.0
    # and the value stays exact on a non-empty z: ||0.5 I||_F^2 / D = 0.25 for any probe
    _, stats = wt.DEQ(grad=grad, jac_reg=True)(lambda z: p * z + 1, torch.zeros(3, 5))
    assert abs(float(stats.jac_loss.detach()) - 0.25) < 1e-6


def test_fixed_point_nstep_per_sample_is_the_hand_count_for_a_diagonal_map():
    # z = a z + 1 from 0: iterate k (k = 0, 1, ...) has residual |a|^k (abs), and
    # |a|^k / (|f(z_k)| + 1e-8) with f(z_k) = (1 - a^(k+1)) / (1 - a) (rel); a sample stops at
    # the first evaluation within tol: nstep = k + 1. tol chosen away from the exact powers.
    a = torch.tensor([0.1, 0.5, -0.9, 0.0], dtype=F64)
    tol = 3e-6
    def abs_k(ai, k):
        return abs(ai) ** k
    def rel_k(ai, k):
        return abs(ai) ** k / (abs((1 - ai ** (k + 1)) / (1 - ai)) + 1e-8)
    for mode, res in (("abs", abs_k), ("rel", rel_k)):
        z, st = wt.solve(lambda z: a[:, None] * z + 1, torch.zeros(4, 1, dtype=F64),
                         method="fixed_point", max_iter=500, tol=tol, stop_mode=mode)
        want = [next(k + 1 for k in range(500) if res(float(ai), k) <= tol) for ai in a]
        assert st.nstep.tolist() == want
        assert st.n_iter == max(want) and st.abs_trace.shape == (4, max(want))
        assert st.converged.all() and not st.diverged.any()
        # the returned iterate is z_(nstep - 1) = (1 - a^(nstep-1)) / (1 - a)
        k = st.nstep.to(F64) - 1
        assert torch.allclose(z[:, 0], (1 - a ** k) / (1 - a), rtol=1e-12, atol=0)
        for name in ("nstep", "abs_lowest", "rel_lowest", "converged", "diverged"):
            assert getattr(st, name).shape == (4,)
        assert st.nstep.dtype == torch.int64 and st.abs_lowest.dtype == F64


def test_register_solver_refuses_a_callable_without_a_readable_signature():
    # a builtin gave inspect's bare "no signature found for builtin ..." and an object with a
    # broken __signature__ a TypeError; both now name the signature a solver must have
    class BrokenSignature:
        __signature__ = "not a signature"

        def __call__(self, f, z0, *, max_iter, tol, stop_mode):
            return wt.solvers.fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)

    for i, fn in enumerate((torch.add, max, BrokenSignature())):
        with pytest.raises(ValueError, match=r"must be callable as solver\(f, z0, \*, max_iter"):
            wt.register_solver(f"review12_unreadable_{i}", fn)
        assert f"review12_unreadable_{i}" not in wt.list_solvers()


@pytest.mark.parametrize("grad", GRADS)
def test_an_f_writing_its_argument_in_place_under_inference_mode_matches_the_closed_form(grad):
    # f(z) = 0.5 relu(z) + c, the relu in place: z* = c for c < 0, 2c for c > 0. Under
    # torch.inference_mode (no version counter) DEQ handed f its own iterates: the damped
    # phantom steps mixed the rectified iterate (output -0.5, not -1), and the unrolled
    # residuals were read at the rectified iterate (never converged, the whole budget spent)
    c = torch.tensor([[-1.0], [2.0]], dtype=F64)
    want = torch.tensor([[-1.0], [4.0]], dtype=F64)
    tol = 1e-9
    for ctx in (torch.inference_mode, torch.no_grad):
        # a fresh module: one that saw a write outside inference mode hands f copies anyway
        deq = wt.DEQ(grad=grad, f_solver="anderson", f_tol=tol, f_max_iter=200, tau=0.5,
                     phantom_steps=3)
        with ctx():
            z, st = deq(lambda z: 0.5 * torch.relu_(z) + c, torch.zeros(2, 1, dtype=F64))
        torch.testing.assert_close(z, want, rtol=0, atol=1e-8)
        assert st.converged.all() and not st.diverged.any()
        if grad == "unroll":  # plain iteration from 0: z_k = -1 (k >= 1) and 4 (1 - 0.5^k)
            rel = [lambda k: 0.0 if k else 1.0 / (1.0 + 1e-8),
                   lambda k: 2 * 0.5 ** k / (4 * (1 - 0.5 ** (k + 1)) + 1e-8)]
            assert st.nstep.tolist() == [next(k + 1 for k in range(200) if r(k) <= tol)
                                         for r in rel]


@pytest.mark.parametrize("grad", GRADS)
def test_a_non_finite_start_does_not_poison_the_other_samples_gradients(grad):
    # a warm start cached from a step that blew up: one sample's z0 is NaN. The solvers flag it
    # diverged and hand it back as it came; the DEQ then evaluated f at it with autograd, and
    # 0 x NaN in f's backward made every parameter's gradient NaN, even with that sample left
    # out of the loss (as a diverging sample, whose gradients stay finite, may be)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4, dtype=F64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(3, 4, dtype=F64)
    deq = wt.DEQ(grad=grad, f_tol=1e-10, b_tol=1e-10, f_max_iter=60, b_max_iter=60,
                 jac_reg=True)

    def grads(z0, rows):
        lin.zero_grad()
        z, stats = deq(lambda z: torch.tanh(lin(z)) + x[rows], z0)
        (z[[0, -1]].square().sum() + stats.jac_loss * 0.0).backward()
        return z, stats, lin.weight.grad.clone()

    z0 = torch.zeros(3, 4, dtype=F64)
    z0[1, 2] = float("nan")
    z, stats, g = grads(z0, [0, 1, 2])
    assert stats.diverged.tolist() == [False, True, False]
    assert not stats.converged[1] and torch.isfinite(stats.jac_loss)
    assert torch.equal(z[1].isnan(), z0[1].isnan())  # back as it came
    _, _, g_ref = grads(torch.zeros(2, 4, dtype=F64), [0, 2])  # the batch without it
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():  # the same output with autograd off
        z_eval, _ = deq(lambda z: torch.tanh(lin(z)) + x, z0)
    torch.testing.assert_close(z_eval, z.detach(), equal_nan=True)
