"""Time of one training step (forward, backward, AdamW) with the batch already on the device.

Where ``benchmarks.train_speed`` measures whole epochs through a DataLoader, this isolates the
model: random images and labels are made once on the device, and each step is timed after
warm-up steps (which also absorb ``torch.compile``). The variants of one (model, batch) are built
together and their timed steps interleaved (one step of each in turn, the order reversed every
other round), so a drift of the machine's speed reaches them alike. For each (model, variant,
batch) it reports the median step time, images/s and, from one profiled step, the GPU's busy
time (the sum of its kernels) over the step's wall time: a ratio well below 1 means the step
is bound by launching kernels (Python and framework overhead on the host), not by the GPU's
arithmetic, so larger batches come almost for free and bf16 or channels-last cannot help.

Variants: ``base``, ``channels_last``, ``amp`` (bf16 autocast), ``compile`` (``torch.compile``,
default mode) and ``compile_graphs`` (``mode="reduce-overhead"``: CUDA graphs, CUDA only).

Run: ``python -m benchmarks.step_time [--models wt_s,deq_s] [--batch-sizes 128,512]
[--image-size 32] [--variants base,amp,...] [--steps 20] [--threads N] [--device auto] [--tf32]
[--out DIR]``. Writes ``DIR/step_time_<device>_<models>.csv`` and ``.md`` with provenance; on
a shared CPU fix ``--threads`` (contention made one step 370x slower in a review run) and read
the load average that the table records.
"""

from __future__ import annotations

import csv
import io
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import wtmodels as wt
from benchmarks.provenance import (
    cpu_isa,
    describe_machine,
    git_sha,
    make_out_dir,
    threads_error,
)
from wtmodels.atomic import atomic_write_text
from wtmodels.cli import OneLineParser, UsageError, exit_with

VARIANTS = ("base", "channels_last", "amp", "compile", "compile_graphs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_busy_ms(step, device: torch.device) -> float:
    """Sum of the device kernels' times (ms) in one profiled call of ``step``; nan on the CPU."""
    if device.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1000.0


def build_step(model_name: str, variant: str, batch_size: int, image_size: int,
               device: torch.device, seed: int = 0):
    """One training step of ``model_name`` under ``variant``, warmed up: ``(step, model)``.

    ``step()`` runs forward, backward and AdamW on a batch made once on ``device``; three
    warm-up steps (cuDNN autotuning, compilation, graph capture) have run when it is returned.

    Example:
        >>> step, model = build_step("test_wt", "base", 4, 8, torch.device("cpu"))
        >>> step()
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    model = wt.create_model(model_name, num_classes=10, in_chans=3).to(device).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)  # (B, 3, H, W)
    labels = torch.randint(0, 10, (batch_size,), device=device)  # (B,)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    step_model = model
    if variant == "compile":
        step_model = torch.compile(model)
    elif variant == "compile_graphs":
        step_model = torch.compile(model, mode="reduce-overhead")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "amp")

    def step():
        with autocast:
            logits = step_model(images)  # (B, 10)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    return step, model


def time_variants(model_name: str, variants: list[str], batch_size: int, image_size: int,
                  steps: int, device: torch.device, seed: int = 0,
                  on_error=None) -> list[dict]:
    """Median step time of ``model_name`` under each variant, timed interleaved.

    Every variant is built and warmed up first; then timed step ``i`` of each variant runs
    before step ``i + 1`` of any (the order reversed every other round), so a drift of the
    machine's speed (thermal, other processes) reaches all variants alike. A variant that fails
    to build or to run is dropped, the others kept: ``on_error(variant, exception)`` is told
    (re-raised when ``on_error`` is None). Returns one row per surviving variant, in order.

    Example:
        >>> rows = time_variants("test_wt", ["base", "amp"], 4, 8, 2, torch.device("cpu"))
        >>> [r["variant"] for r in rows], rows[0]["img_per_s"] > 0
        (['base', 'amp'], True)
    """
    def failed(variant, err):
        if on_error is None:
            raise err
        on_error(variant, err)

    built = {}
    for variant in variants:
        try:
            built[variant] = build_step(model_name, variant, batch_size, image_size, device, seed)
        except Exception as err:  # one failing variant must not lose the others
            failed(variant, err)
    times = {variant: [] for variant in built}
    for i in range(steps):
        order = list(built) if i % 2 == 0 else list(built)[::-1]
        for variant in order:
            step, _ = built[variant]
            try:
                start = time.perf_counter()
                step()
                _sync(device)
            except Exception as err:
                del built[variant], times[variant]
                failed(variant, err)
                continue
            times[variant].append(time.perf_counter() - start)
    rows = []
    for variant, (step, model) in built.items():
        step_ms = 1000 * statistics.median(times[variant])
        busy_ms = _gpu_busy_ms(step, device)
        rows.append({
            "model": model_name, "variant": variant, "batch": batch_size,
            "image_size": image_size, "step_ms": round(step_ms, 3),
            "img_per_s": round(batch_size / step_ms * 1000, 1),
            "gpu_busy_ms": round(busy_ms, 3),
            "gpu_busy_frac": (round(busy_ms / step_ms, 3) if busy_ms == busy_ms
                              else float("nan")),
            "cell_evals": model.core_stats().get("cell_evals", float("nan")),
            "steps": len(times[variant])})  # timed steps behind the median
    return rows


def time_steps(model_name: str, variant: str, batch_size: int, image_size: int, steps: int,
               device: torch.device, seed: int = 0) -> dict:
    """Median step time of ``model_name`` under one ``variant``; a row for the results table.

    Example:
        >>> row = time_steps("test_wt", "base", 8, 8, 2, torch.device("cpu"))
        >>> row["model"], row["img_per_s"] > 0
        ('test_wt', True)
    """
    return time_variants(model_name, [variant], batch_size, image_size, steps, device, seed)[0]


def write(rows: list[dict], out: Path, command: str, device: torch.device,
          sha: str | None = None) -> Path:
    """Write ``step_time_<device>_<models>.csv`` and ``.md`` into ``out``; returns the ``.md``.
    ``sha``: the code's git sha when the run started (default: now).

    Example (one hand-made row):
        >>> import tempfile
        >>> rows = [{"model": "wt_s", "variant": "base", "batch": 64, "ms_per_step": 12.5}]
        >>> md = write(rows, Path(tempfile.mkdtemp()), "python -m benchmarks.step_time",
        ...            torch.device("cpu"), sha="abc1234")
        >>> md.name, md.read_text().splitlines()[-1]
        ('step_time_cpu_wt_s.md', '| wt_s | base | 64 | 12.5 |')
        >>> (md.parent / "step_time_cpu_wt_s.csv").read_text().splitlines()[1][:22]
        'wt_s,base,64,12.5,cpu,'
    """
    out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine(sha)
    # provenance on every CSV row too (the .md has it in its header line)
    prov = {"device": device.type, "cpu_isa": cpu_isa(), "threads": torch.get_num_threads(),
            "git_sha": machine["git_sha"], "torch_version": torch.__version__,
            "date": machine["date"], "load_average_1min": machine["load_average_1min"]}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*rows[0], *prov])
    writer.writeheader()
    writer.writerows({**row, **prov} for row in rows)
    stem = f"step_time_{device.type}_{'-'.join(dict.fromkeys(r['model'] for r in rows))}"
    atomic_write_text(out / f"{stem}.csv", buf.getvalue())
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{machine['cpu_model']}, CPU ISA {prov['cpu_isa']}")
    lines = [f"# Training step time ({where})", "", f"`{command}`", "",
             f"git {machine['git_sha']}, torch {torch.__version__}, {machine['date']}, "
             f"{torch.get_num_threads()} threads, load average {machine['load_average_1min']} on "
             f"{machine['cpu_count']} CPUs.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    md = out / f"{stem}.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.step_time``: time training steps, write the csv / md; exit status.

    Example (bad arguments: one line on stderr, exit status 2, before any timing):
        >>> main(["--variants", "base,fast"])
        2
    """
    parser = OneLineParser(prog="python -m benchmarks.step_time",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wt_s,deq_s", help="comma-separated model names")
    parser.add_argument("--batch-sizes", default="128,512", help="comma-separated batch sizes")
    parser.add_argument("--image-size", type=int, default=32, help="square image size")
    parser.add_argument("--variants", default="base,channels_last,amp,compile",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (compile_graphs: "
                             "CUDA only)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; fix it on a shared machine)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tf32", action="store_true",
                        help="let CUDA convolutions and matmuls use TF32 (off, as in training)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="writes OUT/step_time_<device>_<models>.{csv,md}")
    try:
        args = parser.parse_args(argv)
        variants = list(dict.fromkeys(args.variants.split(",")))  # each once
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise UsageError(f"unknown variant {bad[0]!r}; valid: {', '.join(VARIANTS)}")
        models = list(dict.fromkeys(args.models.split(",")))
        for name in models:
            wt.get_config(name)  # raises ValueError listing the models
        parts = args.batch_sizes.split(",")
        if not all(b.strip().isdigit() and int(b) > 0 for b in parts):
            raise UsageError("--batch-sizes must be positive integers separated by commas; "
                             f"got {args.batch_sizes!r}")
        batch_sizes = list(dict.fromkeys(int(b) for b in parts))
        for name in ("image_size", "steps", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA device")
        on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if not on_cuda and variants == ["compile_graphs"]:
            raise UsageError("variant compile_graphs (CUDA graphs) needs a CUDA device")
        if message := threads_error(args.threads):
            raise UsageError(message)
        out = make_out_dir(args.out)
    except (ValueError, OSError) as err:  # UsageError is a ValueError
        print(f"step_time: {err}", file=sys.stderr)
        return 2
    sha = git_sha()  # the code measured: the checkout as the run starts
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if on_cuda else "cpu")
    if not on_cuda and "compile_graphs" in variants:
        print("step_time: compile_graphs skipped (CUDA graphs need a CUDA device)",
              file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    rows = []
    for name in models:
        for batch in batch_sizes:
            runnable = [v for v in variants if v != "compile_graphs" or device.type == "cuda"]

            def report(variant, err, name=name, batch=batch):
                print(f"{name} {variant} {batch}: failed: {err!r}", file=sys.stderr)

            for row in time_variants(name, runnable, batch, args.image_size, args.steps, device,
                                     on_error=report):
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if not rows:
        return 1
    command = "python -m benchmarks.step_time " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write(rows, out, command, device, sha).read_text())
    return 0


if __name__ == "__main__":
    exit_with(main)
