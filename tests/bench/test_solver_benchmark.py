"""benchmarks.solvers: a quick run writes the table with torchdeq's rows; bad input exits 2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

solvers_bench = pytest.importorskip("benchmarks.solvers")
pytest.importorskip("torchdeq")


def test_quick_run_writes_every_solver_torchdeq_and_the_memory_check(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = solvers_bench.main(["--quick", "--repeats", "1", "--threads", "1", "--malloc",
                                 "default", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert [r["solver"] for r in rows] == ["anderson", "broyden", "fixed_point",
                                           "torchdeq_anderson", "torchdeq_broyden"]
    for row in rows:
        assert float(row["converged"]) == 1.0 and int(row["f_evals"]) > 1
        assert float(row["overhead"]) > 0.5  # a ratio of measured times, not a constant
    ours = {r["solver"]: int(r["f_evals"]) for r in rows}
    assert ours["anderson"] <= ours["torchdeq_anderson"]
    memory = list(csv.DictReader((tmp_path / "solvers_quick_memory.csv").open()))
    assert {(r["grad"], r["f_max_iter"]) for r in memory} == {
        ("ift", "10"), ("ift", "40"), ("unroll", "10"), ("unroll", "40")}
    md = (tmp_path / "solvers_quick.md").read_text()
    assert "## Targets" in md and "IFT peak memory from f_max_iter 10 to 40" in md
    assert "## Targets" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--tol", "inf"], ["--gain", "nan"], ["--tol", "0"], ["--repeats", "0"], ["--threads", "0"],
    ["--max-iter", "0"], ["--max-iter", "1"], ["--tag", "../x"], ["--device", "tpu"], ["--bogus"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        solvers_bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_out_is_created_and_a_file_in_the_way_is_refused(tmp_path, capsys,
                                                                  monkeypatch):
    """``--out`` is created like every other script's (it had to exist before); a file in the
    way is one line and exit status 2, before any solve."""
    ran = []
    monkeypatch.setattr(solvers_bench, "bench_cell", lambda *a: ran.append(a) or [])
    monkeypatch.setattr(solvers_bench, "memory_check", lambda *a, **k: [])
    monkeypatch.setattr(solvers_bench, "markdown", lambda *a: "## Targets\n")
    monkeypatch.setattr(solvers_bench, "to_csv", lambda *a: "")
    assert solvers_bench.main(["--quick", "--out", str(tmp_path / "new" / "dir")]) == 0
    assert ran and (tmp_path / "new" / "dir" / "solvers_quick.md").is_file()
    (tmp_path / "file").write_text("x")
    ran.clear()
    assert solvers_bench.main(["--quick", "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert not ran and "--out" in err and err.count("\n") == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_that_takes_no_files_fails_before_the_run(capsys, monkeypatch):
    monkeypatch.setattr(solvers_bench, "bench_cell", lambda *a: pytest.fail("benchmark ran"))
    assert solvers_bench.main(["--quick", "--out", "/proc"]) == 2  # root may write elsewhere
    err = capsys.readouterr().err
    assert "--out /proc is not writable" in err and err.count("\n") == 1


def test_markdown_marks_the_cpu_only_split_on_other_devices():
    row = {"B": 2, "C": 4, "H": 8, "solver": "fixed_point", "f_evals": 10, "wall_ms": 1.0,
           "f_ms": 0.05, "overhead": 2.0, "overhead_best": 1.9, "overhead_cpu": 2.0,
           "f_slowdown": float("nan"), "solver_ops": float("nan"), "converged": 1.0}
    args = solvers_bench.parse_args(["--device", "cpu"])
    prov = {"git_sha": "x", "torch_version": "t", "device": "gpu", "threads": 2, "date": "d",
            "load_average_1min": 0.1, "cpu_count": 2, "cpu_model": "c", "malloc": "default"}
    mem = [{"grad": "ift", "f_max_iter": 10, "peak_mb": 1.0, "saved_for_backward_mb": 0.5}]
    md = solvers_bench.markdown([row], mem, prov, args)
    assert "n/a (CPU only)" in md and "nan + nan" not in md
    md = solvers_bench.markdown([{**row, "f_slowdown": 1.1, "solver_ops": 0.9}], mem, prov, args)
    assert "1.1 + 0.9" in md


def test_every_solver_keeps_to_the_same_f_evaluation_budget():
    # torchdeq's Broyden evaluates f once before its max_iter steps: max_iter + 1 calls
    torch.manual_seed(0)
    for name, (_, run) in solvers_bench.solver_table(max_iter=10, tol=1e-4).items():
        calls = [0]

        def f(z, calls=calls):
            calls[0] += 1
            return torch.randn_like(z)  # never converges

        run(f, torch.zeros(3, 8))
        assert calls[0] <= 10, (name, calls[0])


def test_converged_is_measured_on_the_returned_iterate_for_every_solver(monkeypatch):
    # a solver's own claim is not taken: torchdeq's rel_lowest is that of the iterate before
    # its last f (its Anderson returns f of it), so both sides are measured the same way
    def liar(f, z0):
        f(z0)
        f(z0)
        return z0.clone(), torch.ones(z0.shape[0], dtype=torch.bool)  # claims convergence

    monkeypatch.setattr(solvers_bench, "solver_table",
                        lambda max_iter, tol: {"liar": ("fake", liar)})
    (row,) = solvers_bench.bench_cell(2, 4, 4, repeats=1, max_iter=10, tol=1e-4, gain=1.25)
    assert row["converged"] == 0.0 and row["f_evals"] == 2


def test_overhead_best_divides_each_repeat_by_its_own_f_evals():
    # (f_evals, solve s, one f s, converged, solve cpu s, one f cpu s, inside s)
    samples = [(20, 1.2, 0.05, 1.0, 1.2, 0.05, 1.0), (10, 1.0, 0.05, 1.0, 1.0, 0.05, 0.5)]
    row = solvers_bench.summarize(samples, "cpu")
    # fastest solve per f-evaluation 1.2 s / 20 against the fastest f 0.05 s
    assert row["overhead_best"] == 1.2
    assert row["f_evals"] in (10, 20)


def test_markdown_states_what_each_side_ran_with_and_what_is_compared():
    import inspect

    from torchdeq.solver.anderson import anderson_solver

    import wtmodels as wt

    row = {"B": 2, "C": 4, "H": 8, "solver": "fixed_point", "f_evals": 10, "wall_ms": 1.0,
           "f_ms": 0.05, "overhead": 2.0, "overhead_best": 1.9, "overhead_cpu": 2.0,
           "f_slowdown": 1.0, "solver_ops": 1.0, "converged": 1.0}
    prov = {"git_sha": "x", "torch_version": "t", "device": "cpu", "threads": 2, "date": "d",
            "load_average_1min": 0.1, "cpu_count": 2, "cpu_model": "c", "malloc": "default"}
    mem = [{"grad": "ift", "f_max_iter": 10, "peak_mb": 1.0, "saved_for_backward_mb": 0.5}]
    md = solvers_bench.markdown([row], mem, prov, solvers_bench.parse_args([]))
    ours = inspect.signature(wt.solvers.anderson).parameters
    theirs = inspect.signature(anderson_solver).parameters
    # both sides' settings, read from the code that runs (the two lam differ in kind)
    assert f"ours Anderson m={ours['m'].default}" in md
    m, lam = theirs["m"].default, theirs["lam"].default
    assert f"torchdeq Anderson m={m}, lam={lam:g} absolute" in md
    # the stopping rule both share, and what the memory peak leaves out
    assert "until every sample" in md and "returns f" in md
    assert "history buffers" in md


def test_saved_bytes_counts_each_storage_once_without_held_tensors():
    import torch

    from benchmarks.solvers import SavedBytes

    w = torch.ones(8, 8, requires_grad=True)
    x = torch.ones(2, 8)
    count = SavedBytes(held=[w, x])
    with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
        h = torch.relu(x @ w)  # relu saves h; the next matmul saves h again (and w: held)
        (h @ w).sum()
    assert count.total == h.numel() * h.element_size()
