"""benchmarks.solvers as a user reads its files: csv rows say how and under what load they ran;
the memory check measures real growth."""

from __future__ import annotations

import csv
import re
from types import SimpleNamespace

import pytest
import torch

solvers_bench = pytest.importorskip("benchmarks.solvers")
from tests.bench.test_solver_benchmark_cli import tiny_run  # noqa: E402 (after the skip)


def test_csv_rows_carry_the_settings_and_the_load(monkeypatch, tmp_path):
    """Two runs with different --tol/--max-iter/--gain/--repeats wrote csv files with the
    same columns, and the load average the md warns about was in no csv."""
    rc = tiny_run(monkeypatch, tmp_path, "--repeats", "2", "--tol", "1e-3", "--max-iter", "30",
                  "--gain", "0.5")
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert rows
    for r in rows:
        assert (float(r["tol"]), int(r["max_iter"]), float(r["gain"]), int(r["repeats"])) == (
            1e-3, 30, 0.5, 2)
        assert int(r["f_evals"]) <= 30
    md = (tmp_path / "solvers_quick.md").read_text()
    load = re.search(r"load average (\S+) on (\d+) CPUs", md)
    memory = list(csv.DictReader((tmp_path / "solvers_quick_memory.csv").open()))
    for r in rows + memory:
        assert r["load_average_1min"] == load.group(1) and r["cpu_count"] == load.group(2)


def test_peak_memory_is_the_largest_live_total():
    """Three 1 MiB tensors alive at once at most (a, b, c; then c, d; then d, e): 3 MiB."""
    def fn():
        a, b = torch.ones(2**18), torch.ones(2**18)
        c = a + b
        del a, b
        d = c * 2
        del c
        e = d.exp()
        del d, e

    assert 3 * 2**20 <= solvers_bench.peak_memory_bytes(fn) <= 3 * 2**20 + 4096  # + scalars


def test_memory_target_fails_when_the_ift_peak_grows():
    """The check is not tautological: a peak that grows with f_max_iter reads NOT met, and a
    forward that keeps every iterate does grow in the measured peak."""
    args = SimpleNamespace(gain=1.25, tol=1e-4, max_iter=60, repeats=1, device="cpu",
                           allow_tf32=False)
    prov = {"git_sha": "x", "torch_version": "t", "device": "cpu", "threads": 1, "date": "d",
            "load_average_1min": 0.0, "cpu_count": 2, "cpu_model": "m", "malloc": "default"}
    mem = [{"grad": "ift", "f_max_iter": n, "peak_mb": p, "saved_for_backward_mb": 1.0}
           for n, p in ((10, 5.0), (40, 6.0))]
    md = solvers_bench.markdown([], mem, prov, args)
    assert "from f_max_iter 10 to 40: +20.0% (target within 10%: NOT met)" in md

    import wtmodels as wt

    torch.manual_seed(0)
    cell, x = solvers_bench.ConvCell(4), torch.randn(2, 4, 8, 8)
    z0 = torch.zeros(2, 4, 8, 8)
    peaks = []
    for budget in (10, 40):
        deq = wt.DEQ(grad="ift", f_max_iter=budget, f_tol=1e-30, b_max_iter=5, b_tol=1e-30)

        def step(deq=deq):
            kept = []

            def f(z):
                kept.append(cell(z, x))  # a leak: every iterate stays alive
                return kept[-1]

            z, _ = deq(f, z0)
            z.square().mean().backward()

        step()
        peaks.append(solvers_bench.peak_memory_bytes(step))
    # 30 more iterates of 2 * 4 * 8 * 8 float32 (2 KiB each) kept alive
    assert peaks[1] - peaks[0] >= 30 * 2 * 4 * 8 * 8 * 4


def test_a_reader_gone_away_does_not_cost_the_results(tmp_path):
    """``python -m benchmarks.solvers | head -2`` ended the run at the first progress line
    after head exited (BrokenPipeError, status 1) and wrote no files."""
    import subprocess
    import sys
    from pathlib import Path

    driver = (
        "import sys\n"
        "import benchmarks.solvers as s\n"
        "from wtmodels.cli import exit_with\n"
        "s.QUICK_CELLS = [(2, 4, 4), (2, 4, 4)]\n"
        "s.memory_check = lambda budgets, device='cpu': [{'grad': g, 'f_max_iter': n,\n"
        "    'peak_mb': 1.0, 'saved_for_backward_mb': 0.5} for g in ('ift', 'unroll')\n"
        "    for n in budgets]\n"
        "exit_with(lambda: s.main(sys.argv[1:]))\n"
    )
    root = Path(solvers_bench.__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, "--quick", "--repeats", "1", "--threads", "1",
         "--malloc", "default", "--out", str(tmp_path)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.close()  # the reader is gone before the first line
    assert proc.wait(timeout=120) == 0
    for name in ("solvers_quick.csv", "solvers_quick_memory.csv", "solvers_quick.md"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "solvers_quick.csv").open()))
    assert len(rows) >= 6  # both cells measured, not just the first


def test_markdown_renders_in_a_fresh_interpreter():
    """markdown() (solver_settings) read ``wt.solvers.anderson``: an AttributeError until
    something had imported wtmodels.solvers (the run's solves hid it; a standalone call, or
    the test above run alone, failed)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import benchmarks.solvers as s\n"
            "t = s.solver_settings()\n"
            "assert 'Anderson m=' in t and 'Broyden m=' in t, t\n")
    root = Path(solvers_bench.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
