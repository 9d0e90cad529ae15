"""Model benchmark: cost of distinct masks, DEQ memory vs forward budget, unrolled memory vs depth.

Three checks, each measured in one run:

1. ``masked/unmasked`` train-step time: the same model with K = D distinct masks (one per
   iteration) and without masks, at the same shapes; one SGD step (forward, backward, update)
   per call, warmed up, repeats interleaved, medians of wall time and of the main thread's CPU
   time (``time.thread_time``: blind to preemption by other processes; with one thread it is all
   the work). Target: ratio <= 1.15.
2. DEQ (IFT) peak memory of one forward + backward as the forward budget ``f_max_iter`` goes
   10 -> 40 (``f_tol`` so small that the solver uses the whole budget). Target: within 10%.
3. Unrolled weight-tied memory vs depth D (with and without K = D masks): least-squares slope
   in MiB per iteration.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak replayed from
``torch.profiler`` memory events (``benchmarks.solvers.peak_memory_bytes``) and the bytes
autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``: distinct storages,
each once, parameters and input excluded).

Run: ``python -m benchmarks.models [--quick] [--threads 1] [--repeats 15] [--out DIR]``.
Writes ``DIR/models.csv`` (one row per measurement) and ``DIR/models.md`` (``--quick``:
``models_quick.*``), with provenance (git sha, torch version, device, threads, date, load).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

import wtmodels as wt
from benchmarks.provenance import (
    cpu_isa,
    describe_machine,
    git_sha,
    make_out_dir,
    threads_error,
)
from benchmarks.results_io import rows_to_csv
from benchmarks.solvers import SavedBytes, peak_memory_bytes, tune_malloc
from wtmodels.atomic import atomic_write_text
from wtmodels.cli import DashValueParser, exit_with

MASK_TARGET = 1.15
DEQ_MEMORY_TARGET = 0.10

# (label, model, overrides, input (C, H, W), batch size)
SPEED_CASES = [
    ("digits", "wt_s", dict(in_chans=1, depth=6), (1, 8, 8), 64),
    ("cifar", "wt_s", dict(in_chans=3, depth=8), (3, 32, 32), 32),
    ("cifar-nm", "wt_s", dict(in_chans=3, depth=8, mask_kind="nm"), (3, 32, 32), 32),
]
QUICK_SPEED_CASES = [SPEED_CASES[0]]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def mask_speed(case, repeats: int, warmup: int = 3) -> dict:
    """Median step times of the masked (K = D) and unmasked model of one case.

    Example (the tiny ``test_wt`` model, one timed step each):
        >>> case = ("tiny", "test_wt", {"depth": 2, "in_chans": 1}, (1, 8, 8), 2)
        >>> row = mask_speed(case, repeats=1, warmup=0)
        >>> row["input"], row["mask_k"], row["masked_ms"] > 0 and row["unmasked_ms"] > 0
        ('1x8x8', 2, True)
    """
    label, name, overrides, shape, batch = case
    device = _device()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    depth = overrides["depth"]
    models, opts = {}, {}
    for key, k in (("unmasked", 0), ("masked", depth)):
        torch.manual_seed(0)
        models[key] = wt.create_model(name, **{**overrides, "mask_k": k}).to(device)
        opts[key] = torch.optim.SGD(models[key].parameters(), lr=1e-3)
    times = {key: ([], []) for key in models}  # wall, cpu
    for _ in range(warmup):
        for key in models:
            _train_step(models[key], x, y, opts[key])
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # interleave, alternate
        for key in order:
            _sync()
            w0, c0 = time.perf_counter(), time.thread_time()
            _train_step(models[key], x, y, opts[key])
            _sync()
            times[key][0].append(time.perf_counter() - w0)
            times[key][1].append(time.thread_time() - c0)
    med = {key: (statistics.median(w), statistics.median(c)) for key, (w, c) in times.items()}
    best = {key: min(w) for key, (w, _) in times.items()}
    return {
        "check": "mask_speed",
        "case": label,
        "model": name,
        "batch": batch,
        "input": "x".join(map(str, shape)),
        "depth": depth,
        "mask_k": depth,
        "mask_kind": models["masked"].config.mask_kind,
        "unmasked_ms": round(1e3 * med["unmasked"][0], 2),
        "masked_ms": round(1e3 * med["masked"][0], 2),
        "ratio_wall": round(med["masked"][0] / med["unmasked"][0], 3),
        "ratio_best": round(best["masked"] / best["unmasked"], 3),
        "ratio_cpu": round(med["masked"][1] / med["unmasked"][1], 3),
        "repeats": repeats,
    }


def _memory_row(check: str, net: torch.nn.Module, x: torch.Tensor, **info) -> dict:
    """Peak and saved-for-backward bytes of one forward + backward of ``net`` on ``x``.

    Saved bytes: the distinct storages autograd keeps for backward, each counted once (a
    ReLU's output that the next conv saves again is one tensor), without the parameters and
    ``x`` (held anyway). Summing every saved tensor counted such tensors twice (35% more).
    """
    saved = SavedBytes(held=[*net.parameters(), x])

    def step():
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = net(x).logsumexp(1).mean()
        loss.backward()

    step()  # warm-up (solver buffers, allocator)
    net.zero_grad(set_to_none=True)
    saved.reset()
    peak = peak_memory_bytes(step, x.device.type)  # on CUDA: max_memory_allocated
    net.zero_grad(set_to_none=True)
    return {"check": check, **info, "peak_mb": round(peak / 2**20, 3),
            "saved_for_backward_mb": round(saved.total / 2**20, 3)}


def deq_memory(budgets: list[int], batch: int = 32, size: int = 16) -> list[dict]:
    """DEQ (IFT) peak memory per forward budget (the solver never stops early).

    Example (IFT keeps no solver iterates for backward: the same memory at any budget):
        >>> rows = deq_memory([2, 6], batch=1, size=4)
        >>> [r["nstep"] for r in rows]
        [2.0, 6.0]
        >>> rows[0]["saved_for_backward_mb"] == rows[1]["saved_for_backward_mb"]
        True
    """
    device = _device()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for budget in budgets:
        torch.manual_seed(0)
        model = wt.create_model("deq_s", in_chans=3, stages=1, f_max_iter=budget, f_tol=1e-30,
                                b_max_iter=20, b_tol=1e-30).to(device)
        row = _memory_row("deq_memory", model, x, model="deq_s", batch=batch,
                          input=f"3x{size}x{size}", f_max_iter=budget)
        row["nstep"] = model.core_stats()["nstep"]
        rows.append(row)
    return rows


def unrolled_memory(depths: list[int], batch: int = 32, size: int = 16) -> list[dict]:
    """Unrolled weight-tied peak memory per depth, without and with K = D masks.

    Example (backprop through the unrolled cell keeps each application's activations):
        >>> rows = unrolled_memory([1, 2], batch=1, size=4)
        >>> [(r["depth"], r["mask_k"]) for r in rows]
        [(1, 0), (2, 0), (1, 1), (2, 2)]
        >>> rows[1]["saved_for_backward_mb"] > rows[0]["saved_for_backward_mb"]
        True
    """
    device = _device()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for masked in (False, True):
        for depth in depths:
            torch.manual_seed(0)
            model = wt.create_model("wt_s", in_chans=3, stages=1, depth=depth,
                                    mask_k=depth if masked else 0).to(device)
            rows.append(_memory_row("unrolled_memory", model, x, model="wt_s", batch=batch,
                                    input=f"3x{size}x{size}", depth=depth,
                                    mask_k=depth if masked else 0))
    return rows


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ``ys`` against ``xs``.

    Example:
        >>> slope([1, 2, 3], [2, 4, 6])
        (2.0, 0.0)
    """
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return round(b, 4), round(my - b * mx, 4)


def summarise(speed: list[dict], deq: list[dict], unrolled: list[dict]) -> dict:
    """The headline figures: worst mask ratio, DEQ memory spread, unrolled slopes.

    Example (hand-made rows):
        >>> deq = [{"peak_mb": 2.0, "saved_for_backward_mb": 1.0},
        ...        {"peak_mb": 2.2, "saved_for_backward_mb": 1.0}]
        >>> unrolled = [{"depth": d, "mask_k": 0, "peak_mb": 1.0 + 0.5 * d,
        ...              "saved_for_backward_mb": 0.25 * d} for d in (2, 4, 8)]
        >>> summarise([{"ratio_cpu": 1.05, "ratio_wall": 1.2}], deq, unrolled)
        ... # doctest: +NORMALIZE_WHITESPACE
        {'mask_ratio_cpu_max': 1.05, 'mask_ratio_wall_max': 1.2, 'deq_peak_spread': 0.1,
         'deq_saved_spread': 0.0, 'unrolled_peak_mb_per_iter': 0.5,
         'unrolled_saved_mb_per_iter': 0.25}
    """
    out: dict = {}
    if speed:
        out["mask_ratio_cpu_max"] = max(r["ratio_cpu"] for r in speed)
        out["mask_ratio_wall_max"] = max(r["ratio_wall"] for r in speed)
    if deq:
        peaks = [r["peak_mb"] for r in deq]
        out["deq_peak_spread"] = round(max(peaks) / min(peaks) - 1, 4)
        saved = [r["saved_for_backward_mb"] for r in deq]
        out["deq_saved_spread"] = round(max(saved) / min(saved) - 1, 4)
    for k_label, masked in (("", False), ("_masked", True)):
        rows = [r for r in unrolled if bool(r["mask_k"]) == masked]
        if len(rows) >= 2:
            d = [r["depth"] for r in rows]
            out[f"unrolled{k_label}_peak_mb_per_iter"] = slope(d, [r["peak_mb"] for r in rows])[0]
            out[f"unrolled{k_label}_saved_mb_per_iter"] = slope(
                d, [r["saved_for_backward_mb"] for r in rows])[0]
    return out


def markdown(speed, deq, unrolled, summary, prov: dict, threads: int, command: str) -> str:
    """The Markdown report.

    Example (the summary and verdict of hand-made figures; no measured rows):
        >>> prov = {"git_sha": "abc1234", "torch_version": "2.4", "device": "cpu",
        ...         "date": "2024-01-01", "load_average_1min": 0.5, "cpu_count": 4,
        ...         "cpu_model": "x86"}
        >>> md = markdown([], [], [], {"mask_ratio_cpu_max": 1.2, "deq_peak_spread": 0.05},
        ...               prov, 1, "python -m benchmarks.models")
        >>> print(md.splitlines()[-1])
        Verdict: masks MISS the 1.15x target (cpu ratio); DEQ memory meets the 10% target.
    """
    lines = [
        "# Model benchmark (benchmarks/models.py)",
        "",
        f"Provenance: git `{prov['git_sha']}`, torch {prov['torch_version']}, device "
        f"{prov['device']}, threads {threads}, {prov['date']}, load average "
        f"{prov['load_average_1min']} on {prov['cpu_count']} CPUs ({prov['cpu_model']}, CPU ISA "
        f"{prov.get('cpu_isa', '?')}).",
        f"Command: `{command}`",
        "",
        "## Distinct masks: train-step time, K = D masks vs none (target <= "
        f"{MASK_TARGET}x)",
        "",
        "Medians of interleaved repeats; `ratio cpu` from the main thread's CPU time "
        "(robust to other processes on a shared machine), `ratio best` from the fastest steps.",
        "",
        "| case | model | batch | input | D = K | kind | unmasked ms | masked ms | ratio wall "
        "| ratio best | ratio cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        lines.append(
            f"| {r['case']} | {r['model']} | {r['batch']} | {r['input']} | {r['depth']} | "
            f"{r['mask_kind']} | {r['unmasked_ms']} | {r['masked_ms']} | {r['ratio_wall']} | "
            f"{r['ratio_best']} | {r['ratio_cpu']} |")
    lines += [
        "",
        "## DEQ (IFT) memory vs forward budget (target: within "
        f"{int(DEQ_MEMORY_TARGET * 100)}%)",
        "",
        "One forward + backward of `deq_s` (one stage); the solver runs the whole budget.",
        "",
        "| f_max_iter | nstep | peak MiB | saved for backward MiB |",
        "|---|---|---|---|",
    ]
    for r in deq:
        lines.append(f"| {r['f_max_iter']} | {r['nstep']} | {r['peak_mb']} | "
                     f"{r['saved_for_backward_mb']} |")
    lines += [
        "",
        "## Unrolled weight-tied memory vs depth",
        "",
        "| depth | masks K | peak MiB | saved for backward MiB |",
        "|---|---|---|---|",
    ]
    for r in unrolled:
        lines.append(f"| {r['depth']} | {r['mask_k']} | {r['peak_mb']} | "
                     f"{r['saved_for_backward_mb']} |")
    lines += ["", "## Summary", ""]
    lines += [f"- `{k}`: {v}" for k, v in summary.items()]
    verdicts = []
    if "mask_ratio_cpu_max" in summary:
        ok = summary["mask_ratio_cpu_max"] <= MASK_TARGET
        verdicts.append(f"masks {'meet' if ok else 'MISS'} the {MASK_TARGET}x target (cpu ratio)")
    if "deq_peak_spread" in summary:
        ok = summary["deq_peak_spread"] <= DEQ_MEMORY_TARGET
        verdicts.append(f"DEQ memory {'meets' if ok else 'MISSES'} the "
                        f"{int(DEQ_MEMORY_TARGET * 100)}% target")
    lines += ["", "Verdict: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


class _Parser(DashValueParser):
    def error(self, message):  # one line on stderr, exit status 2
        sys.stderr.write(f"benchmarks.models: error: {message}\n")
        sys.exit(2)


def parse_args(argv):
    """The command-line arguments of ``python -m benchmarks.models``; creates ``--out``.

    Example (a bad value: one line on stderr, exit status 2):
        >>> import tempfile
        >>> args = parse_args(["--quick", "--out", tempfile.mkdtemp()])
        >>> args.quick, args.threads, args.repeats
        (True, 1, 15)
        >>> parse_args(["--repeats", "0"])
        Traceback (most recent call last):
            ...
        SystemExit: 2
    """
    p = _Parser(prog="python -m benchmarks.models", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one speed case, fewer budgets/depths")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per model")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    args = p.parse_args(argv)
    if message := threads_error(args.threads):
        p.error(message)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    try:  # before measuring: a bad --out must not cost the whole run
        args.out = str(make_out_dir(args.out))
    except (ValueError, OSError) as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    """``python -m benchmarks.models``: measure, then write the csv / md files; exit status.

    Example (a run takes minutes; bad arguments stop it before any work, with exit status 2):
        >>> try:
        ...     main(["--threads", "0"])
        ... except SystemExit as stop:
        ...     print("exit status", stop.code)
        exit status 2
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sha = git_sha()  # the code measured: the checkout as the run starts
    torch.set_num_threads(args.threads)
    tune_malloc()
    cases = QUICK_SPEED_CASES if args.quick else SPEED_CASES
    budgets = [10, 40] if args.quick else [10, 20, 30, 40]
    depths = [2, 8] if args.quick else [2, 4, 8, 16]
    speed = [mask_speed(c, args.repeats) for c in cases]
    for r in speed:
        print(f"masks {r['case']}: {r['masked_ms']} vs {r['unmasked_ms']} ms, ratio cpu "
              f"{r['ratio_cpu']} wall {r['ratio_wall']}", flush=True)
    deq = deq_memory(budgets)
    unrolled = unrolled_memory(depths)
    summary = summarise(speed, deq, unrolled)
    machine = describe_machine(sha)
    prov = {**machine, "device": _device(), "torch_version": torch.__version__,
            "cpu_isa": cpu_isa()}
    extra = {"git_sha": machine["git_sha"], "torch_version": prov["torch_version"],
             "device": prov["device"], "cpu_isa": prov["cpu_isa"], "threads": args.threads,
             "date": machine["date"],
             "load_average_1min": machine["load_average_1min"]}
    rows = [{**r, **extra} for r in speed + deq + unrolled]
    stem = "models_quick" if args.quick else "models"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.models " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(out / f"{stem}.csv", rows_to_csv(rows))
    atomic_write_text(out / f"{stem}.md",
                      markdown(speed, deq, unrolled, summary, prov, args.threads, command))
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    exit_with(main)
