"""The solver benchmark's measures (benchmarks/solvers.py) and the DEQ's Jacobian
term / spectral radius (wtmodels/implicit.py), each against an independent answer."""

import math
import statistics

import pytest
import torch

import wtmodels as wt
from benchmarks import solvers as bs

MiB = 2**20


def test_cpu_peak_counts_memory_freed_and_reallocated_inside_one_scope():
    # known answer: 2 MiB live, freed, then 1 MiB -> peak 2 MiB. Inside one profiler scope
    # (as autograd's evaluate_function wraps each backward node) the replay of the op events'
    # net memory put the scope's frees at its start and read 0
    def fn():
        with torch.profiler.record_function("scope"):
            a = torch.empty(2 * MiB, dtype=torch.uint8)
            del a
            b = torch.empty(MiB, dtype=torch.uint8)
            del b

    assert bs.peak_memory_bytes(fn) == 2 * MiB


def test_cpu_peak_of_plain_sequence():
    # 1 MiB, + 2 MiB, - 1 MiB, + 3 MiB -> peak 5 MiB
    def fn():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(3 * MiB, dtype=torch.uint8)
        del b, c

    assert bs.peak_memory_bytes(fn) == 5 * MiB


def test_ift_step_peak_holds_the_backward_on_top_of_the_forward_graph():
    # by hand, when the adjoint solve runs: the tensors autograd saved for f at z* (z_in, the
    # norm's input, the relu output: 3 iterates), z_star (1), the incoming gradient dL/dz_star
    # (1), and inside each vector-Jacobian product at least two gradients live at once (one
    # node's incoming and outgoing): >= saved + 4 iterates (measured: saved + 7); the op-event
    # replay read saved + 2
    it = 16 * 16 * 16 * 16 * 4 / MiB  # one iterate (B, C, H, H) = (16, 16, 16, 16), MiB
    rows = bs.memory_check([6], B=16, C=16, H=16)
    ift = [r for r in rows if r["grad"] == "ift"][0]
    assert ift["saved_for_backward_mb"] == pytest.approx(3 * it, abs=0.01)
    assert ift["peak_mb"] >= ift["saved_for_backward_mb"] + 4 * it - 0.01
    unroll = [r for r in rows if r["grad"] == "unroll"][0]
    assert unroll["saved_for_backward_mb"] >= 6 * 3 * it - 0.01  # 3 iterates per step
    assert unroll["peak_mb"] >= unroll["saved_for_backward_mb"] + 2 * it - 0.01


def test_summarize_formulas_by_hand():
    # (f_evals, solve s, one f s, converged, solve cpu s, one f cpu s, inside f s)
    s = [(10, 2.0, 0.1, 1.0, 1.5, 0.1, 1.2),
         (12, 3.6, 0.2, 0.5, 2.4, 0.1, 2.4),
         (11, 1.1, 0.05, 1.0, 1.1, 0.05, 0.66)]
    r = bs.summarize(s)
    assert r["f_evals"] == 11
    assert r["wall_ms"] == 2000.0
    assert r["f_ms"] == 100.0
    assert r["overhead"] == pytest.approx(statistics.median([2.0, 1.5, 2.0]), abs=1e-3)
    # fastest solve per f-eval: 1.1 / 11 = 0.1; fastest f: 0.05 -> 2.0
    assert r["overhead_best"] == pytest.approx(2.0, abs=1e-3)
    assert r["overhead_cpu"] == pytest.approx(statistics.median([1.5, 2.0, 2.0]), abs=1e-3)
    assert r["f_slowdown"] == pytest.approx(statistics.median([1.2, 1.0, 1.2]), abs=1e-3)
    assert r["solver_ops"] == pytest.approx(statistics.median([0.8, 0.5, 0.8]), abs=1e-3)
    assert r["converged"] == 1.0


def test_every_solver_gets_the_same_budget_and_is_counted_by_calls():
    pytest.importorskip("torchdeq")
    torch.manual_seed(0)
    cell = bs.ConvCell(4)
    x = torch.randn(2, 4, 4, 4)
    z0 = torch.zeros_like(x)
    for max_iter in (2, 7):
        for name, (_, run) in bs.solver_table(max_iter, 1e-30).items():
            calls = []

            def f(z, calls=calls):
                calls.append(z.shape[0])  # the whole batch every time
                return cell(z, x)

            with torch.no_grad():
                run(f, z0)
            assert calls == [2] * max_iter, name


def test_converged_share_from_the_returned_iterate():
    def f(z):
        return 0.5 * z + 1.0  # fixed point 2

    z = torch.full((4, 3), 2.0)
    z[0] = 2.1  # f(z) = 2.05: rel = 0.05 / 2.05 ~ 0.0244
    assert bs.share_converged(f, z, 1e-4) == 0.75
    assert bs.share_converged(f, z, 0.02) == 0.75
    assert bs.share_converged(f, z, 0.025) == 1.0


def test_jac_loss_is_unbiased_float64():
    torch.manual_seed(0)
    B, d = 3, 5
    W = torch.randn(d, d, dtype=torch.float64) * 0.5
    b = torch.randn(B, d, dtype=torch.float64)
    z = torch.randn(B, d, dtype=torch.float64)
    J = torch.stack([torch.autograd.functional.jacobian(
        lambda v, i=i: torch.tanh(W @ v + b[i]), z[i]) for i in range(B)])
    exact = float(J.pow(2).sum() / (B * d))
    deq = wt.DEQ(jac_reg_samples=1)
    draws = torch.tensor([float(deq.jacobian_loss(lambda v: torch.tanh(v @ W.T + b),
                                                     z).detach())
                          for _ in range(2000)], dtype=torch.float64)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * se + 1e-12
    assert float(draws.std()) > 0  # a random estimate, not the exact value


@pytest.mark.parametrize("kind", ["sym", "nonsym"])
def test_spectral_radius_matches_eigvals(kind):
    torch.manual_seed(1)
    d = 6
    A = torch.randn(d, d, dtype=torch.float64)
    if kind == "sym":
        A = (A + A.T) / 2
    else:  # non-normal, with a real dominant eigenvalue (-2.0)
        S = torch.eye(d, dtype=torch.float64) + 0.5 * A
        lam = torch.tensor([-2.0, 1.5, 1.0, 0.5, 0.3, -0.2], dtype=torch.float64)
        A = S @ torch.diag(lam) @ torch.linalg.inv(S)
    rho = float(torch.linalg.eigvals(A).abs().max())
    r = wt.DEQ().spectral_radius(lambda z: z @ A.T, torch.randn(2, d, dtype=torch.float64),
                                 n_iter=200)
    assert torch.allclose(r, torch.full((2,), rho, dtype=torch.float64), rtol=1e-3)


def _pair(th=0.7, rho=0.9):
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[:2, :2] = rho * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]],
                                   dtype=torch.float64)
    A[2, 2], A[3, 3] = 0.3, -0.2
    return A


def test_spectral_radius_normal_complex_pair():
    # a rotation-scaling pair: every growth factor is exactly |lambda|
    r = wt.DEQ().spectral_radius(lambda z: z @ _pair().T, torch.randn(3, 4, dtype=torch.float64),
                                 n_iter=60)
    assert torch.allclose(r, torch.full((3,), 0.9, dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_radius_non_normal_complex_pair_at_the_default_n_iter(dtype):
    # the same eigenvalues (0.9 e^{+-0.7i}, 0.3, -0.2) in a non-orthogonal basis: the growth
    # factors' geometric mean over 10 steps was up to 15% off at n_iter=20 (error ~ 1/n_iter),
    # although the rest of the spectrum (0.3) is far below the pair: (1/3)^10 ~ 2e-5
    S = torch.tensor([[1.0, 2.0, 0, 0], [0, 1.0, 0, 0], [0.3, 0, 1.0, 0], [0, 0.5, 0, 1.0]],
                     dtype=torch.float64)
    A = (S @ _pair() @ torch.linalg.inv(S)).to(dtype)
    assert float(torch.linalg.eigvals(A.double()).abs().max()) == pytest.approx(0.9, rel=1e-6)
    torch.manual_seed(0)
    r = wt.DEQ().spectral_radius(lambda z: z @ A.T, torch.zeros(32, 4, dtype=dtype))
    assert r.dtype == dtype
    assert torch.allclose(r.double(), torch.full((32,), 0.9, dtype=torch.float64), rtol=1e-4)


def test_spectral_radius_real_dominant_keeps_converging_with_ritz_guard():
    # real dominant eigenvalue next to a complex pair just below it: the answer is the real one
    A = _pair(rho=0.8)
    A[2, 2] = -0.95
    torch.manual_seed(0)
    r = wt.DEQ().spectral_radius(lambda z: z @ A.T, torch.zeros(8, 4, dtype=torch.float64),
                                 n_iter=200)
    assert torch.allclose(r, torch.full((8,), 0.95, dtype=torch.float64), rtol=1e-4)


@pytest.mark.parametrize("shape", [(0, 4), ()])
def test_spectral_radius_of_an_empty_batch_is_a_value_error(shape):
    with pytest.raises(ValueError, match="B >= 1"):
        wt.DEQ().spectral_radius(lambda z: 0.5 * z, torch.ones(shape))
