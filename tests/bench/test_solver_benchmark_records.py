"""The solver benchmark's files: what they record for a reader."""

from __future__ import annotations

import csv
import sys
from importlib import metadata

import pytest
import torch

sb = pytest.importorskip("benchmarks.solvers")


def _fake_run(monkeypatch, tmp_path) -> int:
    """A --quick run with the measuring stubbed (the files are what is checked here)."""
    def rows(B, C, H, *args):
        return [{"B": B, "C": C, "H": H, "solver": s, "impl": "wtmodels", "f_evals": 10,
                 "wall_ms": 2.0, "f_ms": 0.1, "overhead": 2.0, "overhead_best": 2.0,
                 "overhead_cpu": 2.0, "f_slowdown": 1.0, "solver_ops": 1.0, "converged": 1.0}
                for s in ("anderson", "broyden", "fixed_point")]

    monkeypatch.setattr(sb, "bench_cell", rows)
    monkeypatch.setattr(sb, "memory_check", lambda budgets, device="cpu": [
        {"grad": "ift", "f_max_iter": b, "B": 1, "C": 1, "H": 1, "peak_mb": 1.0,
         "saved_for_backward_mb": 1.0} for b in budgets])
    threads = torch.get_num_threads()
    try:
        return sb.main(["--quick", "--threads", "1", "--malloc", "default",
                        "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)


def test_the_torchdeq_version_compared_against_is_recorded(monkeypatch, tmp_path, capsys):
    # the README quotes "torchdeq 0.1.0 in the same runs", but no file said which torchdeq ran
    pytest.importorskip("torchdeq")
    version = metadata.version("torchdeq")  # pip's own record, not the benchmark's
    assert _fake_run(monkeypatch, tmp_path) == 0
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert rows and {r["torchdeq_version"] for r in rows} == {version}
    assert f"torchdeq {version}" in (tmp_path / "solvers_quick.md").read_text()


def test_without_torchdeq_its_version_reads_absent(monkeypatch, tmp_path, capsys):
    for name in ("torchdeq", "torchdeq.solver", "torchdeq.solver.anderson"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert _fake_run(monkeypatch, tmp_path) == 0
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert {r["torchdeq_version"] for r in rows} == {"absent"}


def test_table_says_overhead_is_not_wall_over_f_evals_times_f_ms():
    # (f_evals, solve s, one f s, converged, solve cpu s, one f cpu s, inside s); per-repeat
    # ratios 1.0 / 4.0 / 2.5: median 2.5, while the medians 2.0 s / (10 x 0.1 s) give 2.0
    samples = [(10, 1.0, 0.1, 1.0, 1.0, 0.1, 0.5), (10, 2.0, 0.05, 1.0, 2.0, 0.05, 0.5),
               (10, 3.0, 0.12, 1.0, 3.0, 0.12, 0.5)]
    row = sb.summarize(samples, "cpu")
    assert (row["overhead"], row["wall_ms"], row["f_ms"]) == (2.5, 2000.0, 100.0)
    prov = {"git_sha": "x", "torch_version": "t", "device": "cpu", "threads": 2, "date": "d",
            "load_average_1min": 0.1, "cpu_count": 2, "cpu_model": "c", "malloc": "default"}
    mem = [{"grad": "ift", "f_max_iter": 10, "peak_mb": 1.0, "saved_for_backward_mb": 0.5}]
    md = sb.markdown([{"B": 2, "C": 4, "H": 8, "solver": "anderson", **row}], mem, prov,
                     sb.parse_args([]))
    # a reader recomputing wall / (f-evals x f ms) got 2.0 against the table's 2.5 (the
    # committed 2-thread table: 1.135 against 1.433) with nothing saying why
    assert "wall ms / (f-evals x f ms) can differ from the overhead" in md
