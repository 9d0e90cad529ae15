"""benchmarks.solvers as a new user runs it: without torchdeq, misused flags, the f-evals target."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

solvers_bench = pytest.importorskip("benchmarks.solvers")


def tiny_run(monkeypatch, tmp_path, *extra):
    """A --quick run on one tiny cell, without the (slow) memory check."""
    monkeypatch.setattr(solvers_bench, "QUICK_CELLS", [(2, 4, 4)])
    mem = [{"grad": g, "f_max_iter": n, "B": 2, "C": 4, "H": 4, "peak_mb": 1.0,
            "saved_for_backward_mb": 0.5} for g in ("ift", "unroll") for n in (10, 40)]
    monkeypatch.setattr(solvers_bench, "memory_check", lambda budgets, device="cpu": mem)
    threads = torch.get_num_threads()
    try:
        return solvers_bench.main(["--quick", "--repeats", "1", "--threads", "1", "--malloc",
                                   "default", "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)


def test_without_torchdeq_the_run_says_so_and_still_writes_our_rows(monkeypatch, tmp_path,
                                                                    capsys):
    for name in ("torchdeq", "torchdeq.solver", "torchdeq.solver.anderson"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert tiny_run(monkeypatch, tmp_path) == 0  # was a ModuleNotFoundError traceback
    out, err = capsys.readouterr()
    assert "note: torchdeq is not installed" in err and "pip install torchdeq" in err
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert [r["solver"] for r in rows] == ["anderson", "broyden", "fixed_point"]
    md = (tmp_path / "solvers_quick.md").read_text()
    assert "No torchdeq comparison" in md
    assert "| 2 | 4 | 4 | anderson |" in md and "no torchdeq" in md and "| n/a |" in md
    assert out.count("f-evals") >= 3


def test_with_torchdeq_every_row_of_the_cell_is_printed(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torchdeq")
    assert tiny_run(monkeypatch, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "not installed" not in err
    assert out.count("torchdeq_") >= 2 and out.count("fixed_point") == 1


@pytest.mark.parametrize("argv, says", [
    (["--out", ""], "--out must name a directory"),  # silently wrote into the cwd
    (["--out", "  "], "--out must name a directory"),
    (["--allow-tf32"], "--allow-tf32 applies to --device cuda only"),  # silently ignored
    (["--allow-tf32", "--device", "cpu"], "--allow-tf32 applies to --device cuda only"),
    (["--tag", ""], "--tag must be"),
    (["--threads", "-2"], "--threads must be >= 1"),
    (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    (["--max-iter", "1e3"], "invalid int value"),
    (["--gain", "-1"], "must be finite and > 0, got 0.0001 and -1.0"),
    (["--malloc", "fast"], "invalid choice"),
])
def test_misused_flags_exit_2_with_one_line(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(solvers_bench, "bench_cell", lambda *a: pytest.fail("benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        solvers_bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def _row(solver, f_evals, converged, overhead=1.0):
    return {"B": 2, "C": 4, "H": 8, "solver": solver, "f_evals": f_evals, "wall_ms": 1.0,
            "f_ms": 0.05, "overhead": overhead, "overhead_best": overhead,
            "overhead_cpu": overhead, "f_slowdown": 0.5, "solver_ops": 0.5,
            "converged": converged}


def _targets(rows):
    args = solvers_bench.parse_args([])
    prov = {"git_sha": "x", "torch_version": "t", "device": "cpu", "threads": 2, "date": "d",
            "load_average_1min": 0.1, "cpu_count": 2, "cpu_model": "c", "malloc": "default"}
    mem = [{"grad": "ift", "f_max_iter": 10, "peak_mb": 1.0, "saved_for_backward_mb": 0.5}]
    md = solvers_bench.markdown(rows, mem, prov, args)
    line = next(x for x in md.splitlines()
                if x.startswith("| 2 | 4 | 8 | anderson |") and "(<=" in x)
    return [c.strip() for c in line.split("|")][-3:-1]  # overhead met, f-evals met


def test_f_evals_target_needs_the_tolerance_reached():
    # neither side reached tol within the budget (60 / 60): that is not "no more f-evals to tol"
    assert _targets([_row("anderson", 60, 0.0), _row("torchdeq_anderson", 60, 0.0)]) == [
        "yes", "NO"]
    assert _targets([_row("anderson", 60, 0.5), _row("torchdeq_anderson", 60, 0.0)]) == [
        "yes", "NO"]
    # the usual cases keep their marks
    assert _targets([_row("anderson", 24, 1.0, 1.31), _row("torchdeq_anderson", 25, 1.0)]) == [
        "NO", "yes"]
    assert _targets([_row("anderson", 26, 1.0, 1.3), _row("torchdeq_anderson", 25, 1.0)]) == [
        "yes", "NO"]
    assert _targets([_row("anderson", 30, 1.0), _row("torchdeq_anderson", 60, 0.0)]) == [
        "yes", "yes"]
