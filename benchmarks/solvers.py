"""Solver benchmark on conv DEQ cells: f-evaluations, wall time and overhead, ours vs torchdeq.

For each cell (batch B, channels C, size H; ``relu(GroupNorm(conv3x3(z) + x))``, conv weights
``N(0, gain^2 / (9 C))``) and each solver, repeated and interleaved:

- ``f_evals``: calls of ``f`` until every sample reached ``tol`` (or the budget ran out);
- ``wall_ms``: wall time of the solve (median over repeats);
- ``overhead``: ``solve time / (f_evals x time of one f)``, each repeat's solve timed next to
  ``f_evals`` plain calls of ``f`` at the same point, median of the per-repeat ratios;
  ``overhead_best``: the same from the fastest solve (per f-evaluation) and the fastest
  f-block (what a quiet machine approaches); ``overhead_cpu``: from the main thread's CPU
  time (``time.thread_time``, blind to preemption by other processes; with one thread it is
  all the work);
- ``f_slowdown`` + ``solver_ops`` ~ ``overhead`` (CPU only; medians of each, so not exactly
  equal): the time inside the calls of ``f`` during the solve and the time between them, each
  over ``f_evals x time of one f``;
- ``converged``: share of samples whose returned iterate has ``rel residual <= tol``, measured
  here on what each solver returns (one more call of ``f``, untimed), not taken from the
  solver's own statistics.

Then the IFT memory check: peak memory of one forward + backward of ``wt.DEQ(grad="ift")`` as
``f_max_iter`` goes 10 -> 40 (the solver never converges early), against ``grad="unroll"``; on
CPU the peak is replayed from ``torch.profiler`` memory events, on CUDA
``torch.cuda.max_memory_allocated``; also the bytes autograd saves for backward.

Run: ``python -m benchmarks.solvers [--quick] [--threads 2] [--repeats 7] [--device cpu|cuda]
[--out DIR]``.
Writes ``DIR/solvers.csv``, ``DIR/solvers_memory.csv`` and ``DIR/solvers.md`` (``--quick``:
``solvers_quick*``; ``--tag T``: ``solvers_T*``), each with provenance (git sha, torch version,
device, threads, date, 1-min load average and CPU count, malloc setting); ``solvers.csv`` rows
also carry the run's ``tol``, ``max_iter``, ``gain``, ``repeats`` and torchdeq's version.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import wtmodels as wt
from benchmarks.provenance import (
    describe_machine,
    git_sha,
    make_out_dir,
    package_version,
    threads_error,
)
from wtmodels.atomic import atomic_write_text
from wtmodels.cli import DashValueParser, exit_with
from wtmodels.solvers import anderson, broyden  # wt.solvers exists only once imported

TARGETS = {"anderson": 1.3, "broyden": 1.6}
# the range (batch 32-64, 16-64 channels, 8-16 px): both corners and cells between
FULL_CELLS = [(32, 16, 8), (64, 16, 16), (32, 32, 16), (64, 64, 8), (32, 64, 16), (64, 64, 16)]
QUICK_CELLS = [(32, 16, 8)]
MAX_ITER = 1000  # --max-iter's bound (see parse_args)


def tune_malloc() -> bool:
    """Make glibc keep freed memory (no trimming, no per-allocation mmap, a padded heap).

    On this kind of VM a page fault costs ~25 us, and with glibc's default thresholds the
    megabyte tensors that any solver (ours or torchdeq) keeps across calls of ``f`` make freed
    memory go back to the OS and fault back in, inside ``f`` too (up to 2x its cost). Applies
    to the whole process and to every solver alike; returns False where glibc is absent.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 2**30) == 1 or mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 2**30) == 1 and ok
    ok = mallopt(M_TOP_PAD, 256 * 2**20) == 1 and ok
    return ok


class ConvCell(nn.Module):
    """``f(z) = relu(GroupNorm(conv3x3(z) + x))``: a conv-norm-relu cell with input injection.

    Example:
        >>> cell = ConvCell(8)
        >>> z = cell(torch.zeros(2, 8, 4, 4), torch.randn(2, 8, 4, 4))
        >>> tuple(z.shape), bool((z >= 0).all()), cell.norm.num_groups
        ((2, 8, 4, 4), True, 4)
    """

    def __init__(self, channels: int, gain: float = 1.25, groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        nn.init.normal_(self.conv.weight, std=gain / (9 * channels) ** 0.5)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(z) + x))  # (B, C, H, W)


class Counted:
    """``f`` with a call counter and, if ``timed``, the wall time spent inside it.

    Example:
        >>> f = Counted(lambda z: 2 * z, timed=True)
        >>> f(1), f(3), f.calls, f.seconds > 0
        (2, 6, 2, True)
    """

    def __init__(self, f, timed: bool = False):
        self.f, self.calls, self.timed, self.seconds = f, 0, timed, 0.0

    def __call__(self, z):
        self.calls += 1
        if not self.timed:
            return self.f(z)
        t0 = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - t0
        return out


def torchdeq_missing() -> str | None:
    """None where torchdeq imports, else a one-line note saying what the run leaves out.

    Example:
        >>> note = torchdeq_missing()
        >>> note is None or note.startswith("torchdeq is not installed")
        True
    """
    try:
        import torchdeq.solver  # noqa: F401
    except ImportError as err:
        return (f"torchdeq is not installed ({err}): this run has no torchdeq rows and the "
                "f-evals target reads n/a; pip install torchdeq (or the project's [dev] "
                "extra) to compare against it in the same run")
    return None


def solver_table(max_iter: int, tol: float) -> dict:
    """name -> (implementation, solve(f, z0) -> (z, converged (B,) bool)); torchdeq's solvers
    only where it is installed (see ``torchdeq_missing``).

    Example (``z = z / 2 + 1``: ``z* = 2``):
        >>> table = solver_table(max_iter=50, tol=1e-6)
        >>> [name for name, (impl, _) in table.items() if impl == "wtmodels"]
        ['anderson', 'broyden', 'fixed_point']
        >>> z, converged = table["anderson"][1](lambda z: 0.5 * z + 1, torch.zeros(2, 3))
        >>> bool(torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-5)), converged.tolist()
        (True, [True, True])
    """

    def ours(method):
        def run(f, z0):
            z, stats = wt.solve(f, z0, method=method, max_iter=max_iter, tol=tol)
            return z, stats.converged
        return run

    def theirs(method):
        from torchdeq.solver import get_solver as torchdeq_solver

        # the same budget in f-evaluations: torchdeq's Broyden evaluates f once before its
        # max_iter steps, its Anderson twice before its loop (max_iter calls in all)
        budget = max_iter - 1 if method == "broyden" else max_iter

        def run(f, z0):
            z, _, info = torchdeq_solver(method)(f, z0, max_iter=budget, tol=tol,
                                                 stop_mode="rel")
            return z, info["rel_lowest"] <= tol
        return run

    table = {
        "anderson": ("wtmodels", ours("anderson")),
        "broyden": ("wtmodels", ours("broyden")),
        "fixed_point": ("wtmodels", ours("fixed_point")),
    }
    if torchdeq_missing() is None:
        table["torchdeq_anderson"] = ("torchdeq", theirs("anderson"))
        table["torchdeq_broyden"] = ("torchdeq", theirs("broyden"))
    return table


def share_converged(f, z: torch.Tensor, tol: float) -> float:
    """Share of samples whose ``z`` has ``||f(z) - z|| / (||f(z)|| + 1e-8) <= tol``.

    Measured by the benchmark on what each solver returns, the same way for all: the solvers'
    own flags differ (torchdeq's ``rel_lowest`` is that of its best iterate ``x``, while its
    Anderson returns ``f(x)``).

    Example (``f(z) = z / 2 + 1``: the first sample is at ``z* = 2``, the second is not):
        >>> share_converged(lambda z: 0.5 * z + 1, torch.tensor([[2.0, 2.0], [0.0, 0.0]]), 1e-4)
        0.5
    """
    fz = f(z)
    rel = (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-8)
    return float((rel <= tol).float().mean())


def bench_cell(B: int, C: int, H: int, repeats: int, max_iter: int, tol: float,
               gain: float, device: str = "cpu") -> list[dict]:
    """Time every solver on one cell; returns one row per solver.

    On CUDA every timed region starts and ends with ``torch.cuda.synchronize``.

    Example (a tiny cell, one repeat, a budget of 5 f-evaluations):
        >>> rows = bench_cell(1, 4, 4, repeats=1, max_iter=5, tol=1e-3, gain=1.0)
        >>> [(r["solver"], r["f_evals"] <= 5) for r in rows if r["impl"] == "wtmodels"]
        [('anderson', True), ('broyden', True), ('fixed_point', True)]
    """
    torch.manual_seed(0)
    cell = ConvCell(C, gain)
    x = torch.randn(B, C, H, H)
    cell, x = cell.to(device), x.to(device)
    z0 = torch.zeros(B, C, H, H, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    f = Counted(lambda z: cell(z, x), timed=device == "cpu")  # CUDA: launches are async
    solvers = solver_table(max_iter, tol)
    samples = {name: [] for name in solvers}
    with torch.no_grad():
        for _ in range(2):  # warm-up: allocator, kernels, the solvers' buffers
            for _, run in solvers.values():
                run(f, z0)
        for rep in range(repeats):
            order = list(solvers.items())
            if rep % 2:
                order.reverse()  # interleave: no solver always runs first
            for name, (_, run) in order:
                f.calls, f.seconds = 0, 0.0
                sync()
                t0, c0 = time.perf_counter(), time.thread_time()
                z, _ = run(f, z0)  # the solver's own claim is not used (see share_converged)
                sync()
                t_solve, c_solve = time.perf_counter() - t0, time.thread_time() - c0
                n, t_inside = f.calls, f.seconds
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(n):
                    f(z)
                sync()
                t_f, c_f = (time.perf_counter() - t0) / n, (time.thread_time() - c0) / n
                samples[name].append((n, t_solve, t_f, share_converged(f.f, z, tol),
                                      c_solve, c_f, t_inside))
    return [{"B": B, "C": C, "H": H, "solver": name, "impl": impl,
             **summarize(samples[name], device)} for name, (impl, _) in solvers.items()]


def summarize(s: list[tuple], device: str = "cpu") -> dict:
    """The row's measures from one solver's repeats ``s``: tuples ``(f_evals, solve s,
    one f s, converged share, solve cpu s, one f cpu s, s inside f during the solve)``.

    Every ratio divides a repeat by its own ``f_evals``; ``overhead_best`` is the lowest solve
    time per f-evaluation over the lowest time of one f.

    Example (one repeat: 10 f-evals in 20 ms, 1 ms per f, 12 ms of it inside f):
        >>> row = summarize([(10, 0.020, 0.001, 1.0, 0.020, 0.001, 0.012)])
        >>> row  # doctest: +NORMALIZE_WHITESPACE
        {'f_evals': 10, 'wall_ms': 20.0, 'f_ms': 1.0, 'overhead': 2.0, 'overhead_best': 2.0,
         'overhead_cpu': 2.0, 'f_slowdown': 1.2, 'solver_ops': 0.8, 'converged': 1.0}
    """
    cpu = device == "cpu"
    return {
        "f_evals": statistics.median_low(r[0] for r in s),
        "wall_ms": round(1e3 * statistics.median(r[1] for r in s), 2),
        "f_ms": round(1e3 * statistics.median(r[2] for r in s), 3),
        "overhead": round(statistics.median(r[1] / (r[0] * r[2]) for r in s), 3),
        "overhead_best": round(min(r[1] / r[0] for r in s) / min(r[2] for r in s), 3),
        "overhead_cpu": round(statistics.median(r[4] / (r[0] * r[5]) for r in s), 3),
        # the overhead split: f slower inside the solve (its data evicted by the
        # solver's) and the solver's own work between the calls of f
        "f_slowdown": (round(statistics.median(r[6] / (r[0] * r[2]) for r in s), 3)
                       if cpu else float("nan")),
        "solver_ops": (round(statistics.median((r[1] - r[6]) / (r[0] * r[2]) for r in s), 3)
                       if cpu else float("nan")),
        "converged": round(statistics.median(r[3] for r in s), 3),
    }


class SavedBytes:
    """The bytes autograd keeps for backward, as a ``saved_tensors_hooks`` pack hook: distinct
    storages, each counted once (a ReLU output the next conv saves again is one tensor), without
    the storages of ``held`` (parameters, inputs: in memory anyway).

    Example:
        >>> x = torch.ones(4, requires_grad=True)
        >>> count = SavedBytes(held=[x])
        >>> with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
        ...     y = torch.relu(x * 2.0).exp()
        >>> count.total  # the outputs of relu and exp, 16 bytes each (x is held)
        32
    """

    def __init__(self, held=()):
        self.held = {t.untyped_storage().data_ptr() for t in held}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.held:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def reset(self) -> None:
        self.storages.clear()

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def peak_memory_bytes(fn, device: str = "cpu") -> int:
    """Peak memory allocated on ``device`` while ``fn()`` runs, above what was allocated
    before it.

    Example (one 1 MiB float32 tensor):
        >>> peak_memory_bytes(lambda: torch.empty(2**18))
        1048576
    """
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # replay every allocation and free at its own time, from the profiler's raw memory
    # records; the op events' memory (prof.events()) is no substitute: an op carries its net
    # self allocation at its start, so a temporary allocated and freed inside one op, or a
    # free inside a scope (autograd's evaluate_function) before a child op's allocation, is
    # lost (the IFT step's peak read 5.0 MiB for a true 10.1 MiB)
    records = _memory_records(prof)
    current = peak = 0
    for _, d in sorted(records, key=lambda t: t[0]):
        current += d
        peak = max(peak, current)
    return peak


def _memory_records(prof) -> list[tuple[int, int]]:
    """``(time ns, bytes)`` of every CPU allocation (> 0) and free (< 0) the profiler saw."""
    from torch.autograd import DeviceType

    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("torch.profiler kept no raw memory records (kineto_results): "
                           "the CPU peak cannot be replayed with this torch version")
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    return [(e.start_ns(), e.nbytes()) for e in results.events()
            if e.name() == "[memory]" and e.device_type() in cpu]


def memory_check(budgets: list[int], B: int = 32, C: int = 32, H: int = 16,
                 device: str = "cpu") -> list[dict]:
    """Peak memory of forward + backward per gradient mode and forward budget.

    Example (IFT saves the same for backward at any budget; unrolling saves every step):
        >>> rows = memory_check([2, 8], B=2, C=8, H=8)
        >>> [(r["grad"], r["f_max_iter"], r["saved_for_backward_mb"]) for r in rows]
        [('ift', 2, 0.01), ('ift', 8, 0.01), ('unroll', 2, 0.02), ('unroll', 8, 0.09)]
    """
    torch.manual_seed(0)
    cell = ConvCell(C).to(device)
    x = torch.randn(B, C, H, H, device=device)
    z0 = torch.zeros(B, C, H, H, device=device)
    rows = []
    for grad in ("ift", "unroll"):
        for budget in budgets:
            deq = wt.DEQ(grad=grad, f_max_iter=budget, f_tol=1e-30, b_max_iter=20, b_tol=1e-30)
            saved = SavedBytes(held=[*cell.parameters(), x, z0])

            def step(deq=deq, saved=saved):
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                    z, _ = deq(lambda z: cell(z, x), z0)
                z.square().mean().backward()

            step()  # warm-up (and the solver's reusable buffers)
            cell.zero_grad(set_to_none=True)
            saved.reset()
            peak = peak_memory_bytes(step, device)
            cell.zero_grad(set_to_none=True)
            rows.append({"grad": grad, "f_max_iter": budget, "B": B, "C": C, "H": H,
                         "peak_mb": round(peak / 2**20, 2),
                         "saved_for_backward_mb": round(saved.total / 2**20, 2)})
    return rows


def to_csv(rows: list[dict], extra: dict) -> str:
    """``rows`` as CSV text, each with the columns of ``extra`` (the same values) appended.

    Example:
        >>> print(to_csv([{"solver": "anderson", "f_evals": 12}], {"git_sha": "abc"}), end="")
        solver,f_evals,git_sha
        anderson,12,abc
    """
    buf = io.StringIO()
    cols = list(rows[0]) + list(extra)
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **extra})
    return buf.getvalue()


def solver_settings() -> str:
    """What each side runs with and what the f-evaluation comparison holds equal, read from
    the solvers' signatures (each with its defaults; the two ``lam`` differ in kind).

    Example (the text depends on whether torchdeq is installed; ours is always described):
        >>> "ours Anderson m=5, lam=0.0001" in solver_settings()
        True
    """
    import inspect

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    a, b = defaults(anderson), defaults(broyden)
    missing = torchdeq_missing()
    if missing is not None:
        return (f"Each solver with its defaults: ours Anderson m={a['m']}, lam={a['lam']:g} x "
                f"each residual's norm x the smallest in its history, Broyden m={b['m']} "
                f"secant pairs. **No torchdeq comparison**: {missing}.")
    from torchdeq.solver.anderson import anderson_solver

    t = defaults(anderson_solver)
    return (
        f"Against torchdeq {package_version('torchdeq')}. Each solver with its defaults: "
        f"ours Anderson m={a['m']}, lam={a['lam']:g} x each residual's norm x the smallest "
        f"in its history, Broyden m={b['m']} secant pairs; "
        f"torchdeq Anderson m={t['m']}, lam={t['lam']:g} absolute (added to the Gram matrix "
        "of the residuals, whose entries near tol are far smaller), Broyden full memory "
        "(max_iter secant pairs, allocated and zeroed in every solve). Both use the relative "
        "residual ||f(z)-z|| / (||f(z)|| + eps) (eps 1e-8 ours, 1e-9 torchdeq) and stop when "
        "it is within tol for every sample: f-evals counts the calls of f until every sample "
        "is (ours stops each sample when it gets there, torchdeq iterates all until the last "
        "one, keeping each sample's best; torchdeq's Anderson returns f of that iterate). "
        "Every solver gets max_iter f-evaluations. converged: share of samples whose returned "
        "z is within tol, measured here the same way for all."
    )


def markdown(rows: list[dict], mem: list[dict], prov: dict, args) -> str:
    """The results as Markdown tables, with the targets checked.

    Example (hand-made rows: one solver row, IFT memory at two budgets):
        >>> row = {"B": 32, "C": 16, "H": 8, "solver": "anderson", "f_evals": 12,
        ...        "wall_ms": 5.0, "f_ms": 0.3, "overhead": 1.2, "overhead_best": 1.1,
        ...        "overhead_cpu": 1.2, "f_slowdown": 1.05, "solver_ops": 0.15, "converged": 1.0}
        >>> mem = [{"grad": "ift", "f_max_iter": n, "peak_mb": mb, "saved_for_backward_mb": 1.0}
        ...        for n, mb in ((10, 2.0), (40, 2.1))]
        >>> prov = {"git_sha": "abc1234", "torch_version": "2.4", "device": "cpu", "threads": 2,
        ...         "date": "2024-01-01", "load_average_1min": 0.5, "cpu_count": 4,
        ...         "cpu_model": "x86", "malloc": "tuned"}
        >>> md = markdown([row], mem, prov, parse_args(["--quick"]))
        >>> print(md.splitlines()[-1])
        IFT peak memory from f_max_iter 10 to 40: +5.0% (target within 10%: met).
        >>> [line for line in md.splitlines() if line.startswith("| 32 | 16 | 8 | anderson | 1.2")]
        ['| 32 | 16 | 8 | anderson | 1.2 / 1.1 (<= 1.3; no torchdeq) | nan | 12 / - | yes | n/a |']
    """
    by = {(r["B"], r["C"], r["H"], r["solver"]): r for r in rows}
    lines = [
        "# Solver benchmark (benchmarks/solvers.py)", "",
        f"Provenance: git `{prov['git_sha']}`, torch {prov['torch_version']}, device "
        f"{prov['device']}, threads {prov['threads']}, {prov['date']}, load average "
        f"{prov['load_average_1min']} on {prov['cpu_count']} CPUs ({prov['cpu_model']}), "
        f"glibc malloc {prov['malloc']}.", "",
        *([f"**Warning**: the load average ({prov['load_average_1min']}) exceeds the CPU count: "
           "other processes dominate these timings; compare ratios within this run only.", ""]
          if (prov["load_average_1min"] or 0) > prov["cpu_count"] else []),
        f"Cells `relu(GroupNorm(conv3x3(z) + x))`, gain {args.gain}; tol {args.tol} (relative), "
        f"max_iter {args.max_iter}; {args.repeats} interleaved repeats, medians"
        f"{'' if args.device == 'cpu' else ', TF32 ' + ('on' if args.allow_tf32 else 'off')}"
        f". {solver_settings()}", "",
        "overhead = solve time / (f-evals x time of one f), measured next to each solve: "
        "median of per-repeat ratios (wall), from the fastest repeat (best), and from the main "
        "thread's CPU time (cpu). The overhead splits into `f inside` (the calls of f during "
        "the solve over f-evals x time of one f: above 1 when the solver's history evicts f's "
        "data from the caches) and `solver ops` (the time between those calls, same unit). "
        "wall ms and f ms are each a median over the repeats on its own, so wall ms / "
        "(f-evals x f ms) can differ from the overhead where f's speed drifted between "
        "repeats.",
        "",
        "| B | C | H | solver | f-evals | wall ms | f ms | overhead | overhead best | "
        "overhead cpu | ≈ f inside + solver ops | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = (f"{r['f_slowdown']} + {r['solver_ops']}" if math.isfinite(r["f_slowdown"])
                 else "n/a (CPU only)")
        lines.append(f"| {r['B']} | {r['C']} | {r['H']} | {r['solver']} | {r['f_evals']} | "
                     f"{r['wall_ms']} | {r['f_ms']} | {r['overhead']} | {r['overhead_best']} | "
                     f"{r['overhead_cpu']} | {split} | {r['converged']} |")
    lines += ["", "## Targets", "",
              "The floor is plain fixed-point iteration's overhead in the same cell: its steps do "
              "only what every solver must (the residual, its norms, the per-sample "
              "bookkeeping).", "",
              "| B | C | H | solver | overhead / best (target) | floor | f-evals ours / "
              "torchdeq | overhead met | f-evals met |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (B, C, H, solver), r in by.items():
        if solver not in TARGETS:
            continue
        ref = by.get((B, C, H, "torchdeq_" + solver))
        fast = r["overhead"] <= TARGETS[solver]
        # f-evaluations *to the tolerance*: met only where every sample of ours reached it
        # (both at the budget without reaching tol is no evidence either way)
        few = (r["converged"] >= 1.0 and r["f_evals"] <= ref["f_evals"]) if ref else None
        floor = by.get((B, C, H, "fixed_point"), {}).get("overhead", float("nan"))
        theirs = (f"torchdeq {ref['overhead']} / {ref['overhead_best']}" if ref
                  else "no torchdeq")
        lines.append(f"| {B} | {C} | {H} | {solver} | {r['overhead']} / {r['overhead_best']} "
                     f"(<= {TARGETS[solver]}; {theirs}) | {floor} | {r['f_evals']} / "
                     f"{ref['f_evals'] if ref else '-'} | {'yes' if fast else 'NO'} | "
                     f"{'n/a' if few is None else 'yes' if few else 'NO'} |")
    lines += ["", "## IFT memory (forward + backward peak)", "",
              "Peak above the memory held before the step (after a warm-up step)"
              + (": the solvers' history buffers, kept from the warm-up on CPU and the same "
                 "for every f_max_iter, are not in it." if args.device == "cpu" else "."), "",
              "| grad | f_max_iter | peak MiB | saved for backward MiB |", "|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['grad']} | {r['f_max_iter']} | {r['peak_mb']} | "
                     f"{r['saved_for_backward_mb']} |")
    ift = [r["peak_mb"] for r in mem if r["grad"] == "ift"]
    growth = max(ift) / min(ift) - 1 if min(ift) > 0 else float("inf")
    lines += ["", f"IFT peak memory from f_max_iter {mem[0]['f_max_iter']} to "
              f"{mem[len(ift) - 1]['f_max_iter']}: {100 * growth:+.1f}% "
              f"(target within 10%: {'met' if growth <= 0.10 else 'NOT met'}).", ""]
    return "\n".join(lines)


class _Parser(DashValueParser):
    """Bad arguments: one line on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    """The command-line arguments of ``python -m benchmarks.solvers``, checked.

    Example (a bad value: one line on stderr, exit status 2):
        >>> args = parse_args(["--quick", "--max-iter", "30"])
        >>> args.repeats, args.max_iter, args.tol, args.device
        (3, 30, 0.0001, 'cpu')
        >>> parse_args(["--allow-tf32"])
        Traceback (most recent call last):
            ...
        SystemExit: 2
    """
    p = _Parser(prog="python -m benchmarks.solvers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one small cell, 3 repeats, memory check at f_max_iter 10 and 40 "
                        "(full: 6 cells, 7 repeats, 10 / 20 / 40)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the cells run (the overhead targets are for 2 CPU threads)")
    p.add_argument("--allow-tf32", action="store_true",
                   help="CUDA: let convolutions use TF32 (default off: TF32's ~1e-3 relative "
                        "precision stalls the solvers near tol 1e-4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timed repeats per solver (default 7; 3 with --quick)")
    p.add_argument("--max-iter", type=int, default=60,
                   help=f"most f-evaluations per solve, for every solver (default 60; 2 to "
                        f"{MAX_ITER})")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="per-sample relative residual every solver must reach (default 1e-4)")
    p.add_argument("--gain", type=float, default=1.25,
                   help="conv weight scale of the cells (default 1.25)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the csv/md files, created if missing (default "
                        "benchmarks/results: a full run there replaces the committed results)")
    p.add_argument("--tag", default=None,
                   help="output files DIR/solvers_TAG*.{csv,md} (default: none; 'quick' "
                        "with --quick)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="tuned: glibc keeps freed memory (see tune_malloc); default: as is")
    args = p.parse_args(argv)
    if message := threads_error(args.threads):
        p.error(message)
    # >= 2: torchdeq's Anderson evaluates f twice before it checks; <= MAX_ITER: torchdeq pads
    # its traces to max_iter in Python and its Broyden allocates max_iter secant pairs per
    # sample (8.4 MB each on the largest cell): 1e20 hung the run without a word
    if not 2 <= args.max_iter <= MAX_ITER:
        p.error(f"--max-iter must be >= 2 and <= {MAX_ITER}, got {args.max_iter}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 < args.tol < math.inf or not 0 < args.gain < math.inf:
        p.error(f"--tol and --gain must be finite and > 0, got {args.tol} and {args.gain}")
    if not args.out.strip():
        p.error("--out must name a directory (an empty one would write into the current one)")
    if args.allow_tf32 and args.device != "cuda":
        p.error("--allow-tf32 applies to --device cuda only")
    if args.tag is not None and not args.tag.replace("_", "").replace("-", "").isalnum():
        p.error(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    return args


def say(line: str) -> None:
    """Print a progress line; a reader gone away (``| head``) must not cost the results: stdout
    goes to ``os.devnull`` from then on and the run still writes its files.

    Example:
        >>> say("B= 32 C= 16 H=  8 anderson")
        B= 32 C= 16 H=  8 anderson
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv=None) -> int:
    """``python -m benchmarks.solvers``: benchmark, then write the csv / md files; exit status.

    Example (a run takes minutes; bad arguments stop it before any work, with exit status 2):
        >>> try:
        ...     main(["--max-iter", "1"])
        ... except SystemExit as stop:
        ...     print("exit status", stop.code)
        exit status 2
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # before --out is created
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:  # created like every other script's --out; one that takes no files fails now,
        out = make_out_dir(args.out)  # not after the whole run
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sha = git_sha()  # the code measured: the checkout as the run starts
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    missing = torchdeq_missing()
    if missing is not None:
        print(f"note: {missing}", file=sys.stderr, flush=True)
    cells = QUICK_CELLS if args.quick else FULL_CELLS
    rows = []
    for B, C, H in cells:
        cell_rows = bench_cell(B, C, H, args.repeats, args.max_iter, args.tol, args.gain,
                               args.device)
        rows += cell_rows
        for r in cell_rows:
            say(f"B={B:3d} C={C:3d} H={H:3d} {r['solver']:18s} f-evals {r['f_evals']:3d}  "
                f"wall {r['wall_ms']:9.2f} ms  f {r['f_ms']:7.3f} ms  overhead "
                f"{r['overhead']:5.2f} best {r['overhead_best']:5.2f} cpu "
                f"{r['overhead_cpu']:5.2f} ~ f inside {r['f_slowdown']:5.2f} + ops "
                f"{r['solver_ops']:5.2f}  converged {r['converged']:.2f}")
    mem = memory_check([10, 40] if args.quick else [10, 20, 40], device=args.device)
    for r in mem:
        say(f"memory grad={r['grad']:6s} f_max_iter={r['f_max_iter']:3d} peak "
            f"{r['peak_mb']:8.2f} MiB  saved for backward {r['saved_for_backward_mb']:8.2f} MiB")
    machine = describe_machine(sha)
    prov = {"git_sha": machine["git_sha"], "torch_version": torch.__version__,
            "device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
            "threads": torch.get_num_threads(), "date": machine["date"],
            "load_average_1min": machine["load_average_1min"],
            "cpu_count": machine["cpu_count"], "cpu_model": machine["cpu_model"],
            "malloc": malloc}
    # provenance in every csv row (load too: the md's warning, otherwise lost), and in the
    # solver rows the settings their numbers depend on (two runs' csv files were the same
    # columns whatever --tol, --max-iter, --gain or --repeats they ran with)
    extra = {k: prov[k] for k in ("git_sha", "torch_version", "device", "threads", "date",
                                  "load_average_1min", "cpu_count", "malloc")}
    settings = {"tol": args.tol, "max_iter": args.max_iter, "gain": args.gain,
                "repeats": args.repeats,
                "torchdeq_version": package_version("torchdeq") if missing is None else "absent"}
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    stem = f"solvers_{tag}" if tag else "solvers"
    md = markdown(rows, mem, prov, args)
    atomic_write_text(out / f"{stem}.csv", to_csv(rows, {**settings, **extra}))
    atomic_write_text(out / f"{stem}_memory.csv", to_csv(mem, extra))
    atomic_write_text(out / f"{stem}.md", md)
    say(md[md.index("## Targets"):])
    return 0


if __name__ == "__main__":
    exit_with(main)
