"""benchmarks.deq_layer: its files, its float64 reference against closed forms, our gradients
against that reference, torchdeq's settings read back, and its refusals of bad input."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from benchmarks import deq_layer as bench

ROW_COLUMNS = {"B", "C", "H", "impl", "solver", "step_ms", "fwd_ms", "bwd_ms", "f_evals",
               "bwd_f_evals", "vjps", "fwd_res", "z_err", "relu_flips", "dW_err", "dW_cos",
               "dx_err", "dx_cos", "f_max_iter", "f_tol", "b_max_iter", "b_tol", "stop_mode",
               "git_sha", "torch_version", "torchdeq_version", "device", "threads", "date"}
MEMORY_COLUMNS = {"impl", "solver", "f_max_iter", "b_max_iter", "B", "C", "H", "f_calls",
                  "vjps", "peak_mb", "git_sha", "torch_version", "device"}


def _quick(tmp_path, *argv: str) -> int:
    """``main(--quick ...)`` at one thread, one repeat, into ``tmp_path``; torch's thread
    count is put back (the benchmark sets it)."""
    threads = torch.get_num_threads()
    try:
        return bench.main(["--quick", "--threads", "1", "--malloc", "default", "--repeats", "1",
                           *argv, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)


def test_quick_run_writes_its_files(tmp_path, capsys):
    # gain 0.6: a cell contractive enough for 12 iterations to come close
    assert _quick(tmp_path, "--gain", "0.6", "--f-max-iter", "12", "--b-max-iter", "12") == 0
    rows = list(csv.DictReader((tmp_path / "deq_layer_quick.csv").open()))
    memory = list(csv.DictReader((tmp_path / "deq_layer_quick_memory.csv").open()))
    impls = {"wtmodels"} | ({"torchdeq"} if bench.torchdeq_missing() is None else set())
    assert ROW_COLUMNS <= set(rows[0]) and MEMORY_COLUMNS <= set(memory[0])
    assert {(r["impl"], r["solver"]) for r in rows} == {(i, s) for i in impls
                                                       for s in ("anderson", "broyden")}
    for r in rows:
        assert int(r["f_max_iter"]) == 12 and r["stop_mode"] == "rel"
        # the budget bounds the counted calls: 12 steps (+1 for torchdeq's Broyden) + f(z*)
        assert 2 <= int(r["f_evals"]) <= 14 and 2 <= int(r["vjps"]) <= 14
        assert float(r["step_ms"]) > 0
        # a contractive tiny cell: every implementation's gradient is close to the reference
        assert float(r["fwd_res"]) <= 1e-3
        assert float(r["dW_cos"]) > 0.9999 and float(r["dx_cos"]) > 0.9999
        assert float(r["dW_err"]) < 1e-2 and float(r["dx_err"]) < 1e-2
    # the memory check's tolerances are never reached: the whole budget is used
    for r in memory:
        assert int(r["f_calls"]) >= int(r["f_max_iter"])
    assert [int(r["f_max_iter"]) for r in memory if r["impl"] == "wtmodels"
            and r["solver"] == "anderson"] == [10, 40]
    md = (tmp_path / "deq_layer_quick.md").read_text()
    assert "| B | C | H | impl | solver | step ms |" in md and "peak MiB" in md
    assert "git `" in md


def test_reference_matches_the_dense_solve_of_a_linear_problem():
    """z = A z + b, L = sum(z* w): z* = (I - A)^-1 b, dL/db = (I - A)^-T w, dL/dA = u z*^T."""
    rng = np.random.default_rng(0)
    n, B = 6, 3
    A_np = rng.standard_normal((n, n))
    A_np *= 0.6 / np.abs(np.linalg.eigvals(A_np)).max()  # spectral radius 0.6
    b_np, w_np = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    A = torch.tensor(A_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True)
    ref = bench.reference_gradients(lambda z: z @ A.T + b, torch.zeros(B, n, dtype=torch.float64),
                                    [b, A], torch.tensor(w_np))
    M = np.eye(n) - A_np
    z_exact = np.linalg.solve(M, b_np.T).T  # (B, n)
    u_exact = np.linalg.solve(M.T, w_np.T).T  # (B, n)
    np.testing.assert_allclose(ref.z.numpy(), z_exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.grads[0].numpy(), u_exact, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.grads[1].numpy(), u_exact.T @ z_exact, rtol=1e-10,
                               atol=1e-12)
    assert ref.fwd_iters > 10 and ref.bwd_iters > 10  # it iterated, not a lucky start


def test_reference_refuses_a_map_that_is_not_contractive():
    A = torch.tensor([[1.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    b = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not contractive"):
        bench.reference_gradients(lambda z: z @ A.T + b, torch.zeros(1, 2, dtype=torch.float64),
                                  [b], torch.ones(1, 2, dtype=torch.float64), max_iter=200)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_our_gradients_agree_with_the_float64_reference(solver):
    """A contractive conv cell (gain 0.6) and tight tolerances: ours matches the reference."""
    cell, x, w, z0 = bench._cell_problem(2, 8, 6, 0.6, "cpu")
    ref = bench.cell_reference(cell, x, w, z0)
    assert ref is not None
    layer = bench.ours_layer(solver, bench.Settings(f_max_iter=60, f_tol=1e-6, b_max_iter=60,
                                                    b_tol=1e-6))
    z = layer(lambda z: cell(z, x), z0)
    (z * w).sum().backward()
    dW_err, dW_cos = bench.grad_error(cell.conv.weight.grad, ref.grads[0])
    dx_err, dx_cos = bench.grad_error(x.grad, ref.grads[1])
    assert dW_cos > 0.99999 and dx_cos > 0.99999
    assert dW_err < 1e-4 and dx_err < 1e-4
    # and the check can fail: the one-step (Jacobian-free) gradient is measurably off
    cell.zero_grad(set_to_none=True)
    x.grad = None
    with torch.no_grad():
        z_star = z.detach()
    (cell(z_star, x) * w).sum().backward()
    assert bench.grad_error(x.grad, ref.grads[1])[0] > 1e-2


def test_counts_calls_and_vector_jacobian_products():
    f = bench.CountedVJP(lambda z: 3.0 * z)
    z = torch.ones(2, requires_grad=True)
    out = f(z)
    with torch.no_grad():
        f(z)  # no graph: a call, no hook
    for _ in range(3):
        torch.autograd.grad(out, z, torch.ones(2), retain_graph=True)
    assert (f.calls, f.vjps) == (2, 3)


@pytest.mark.skipif(bench.torchdeq_missing() is not None, reason="needs torchdeq")
def test_torchdeq_gets_every_setting():
    s = bench.Settings(f_max_iter=7, f_tol=1e-5, b_max_iter=9, b_tol=1e-7)
    layer = bench.torchdeq_layer("broyden", s)
    cell, x, w, z0 = bench._cell_problem(2, 4, 4, 0.6, "cpu")
    f = bench.CountedVJP(lambda z: cell(z, x))
    z = layer(f, z0)
    assert f.calls <= 7 + 1 + 1  # Broyden: f(z0), 7 steps, then f(z*) with autograd
    (z * w).sum().backward()
    assert x.grad is not None and cell.conv.weight.grad is not None
    # what torchdeq does with a keyword it does not know: nothing (why the read-back exists)
    from torchdeq import get_deq

    assert get_deq(stop_mode="rel").f_stop_mode == "abs"


@pytest.mark.parametrize(("argv", "needle"), [
    (["--solvers", "newton"], "--solvers: unknown solver(s) ['newton']; valid: anderson, broyden"),
    (["--solvers", "anderson,"], "--solvers: unknown solver(s) ['']"),
    (["--f-max-iter", "0"], "--f-max-iter must be >= 2 and <= 1000, got 0"),
    (["--b-max-iter", "5000"], "--b-max-iter must be >= 2 and <= 1000, got 5000"),
    (["--f-tol", "0"], "--f-tol must be finite and > 0"),
    (["--b-tol", "inf"], "--b-tol must be finite and > 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--f-max-iter", "ten"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--out", str(tmp_path / "never"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not (tmp_path / "never").exists()


def test_without_torchdeq_it_runs_ours_and_says_so(monkeypatch, tmp_path, capsys):
    import sys

    for name in ("torchdeq", "torchdeq.solver"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert _quick(tmp_path, "--solvers", "anderson", "--f-max-iter", "5", "--b-max-iter", "5") == 0
    assert "torchdeq is not installed" in capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "deq_layer_quick.csv").open()))
    assert [(r["impl"], r["solver"], r["torchdeq_version"]) for r in rows] == [
        ("wtmodels", "anderson", "absent")]
    assert "**No torchdeq comparison**" in (tmp_path / "deq_layer_quick.md").read_text()
