"""Training-step throughput of ``wt_s``: the harness against a plain hand-written loop.

For each variant (``base``, ``channels_last``, ``amp`` (bf16 autocast), ``compile``, and
``workers``: 4 data-loader processes, not in the default set) two loops train the same network on
the same synthetic images with the same optimisation (AdamW, weight decay, gradient clipping at
1.0, per-step warm-up + cosine schedule, batch ``B``):

- ``plain``: a hand-written PyTorch loop (DataLoader -> forward -> loss -> backward -> clip ->
  step -> schedule), nothing else;
- ``harness``: ``wtmodels.train.run`` (its sampler, non-finite check, metrics, core stats ...).

Each loop runs one warm-up epoch (compilation happens there) and one timed epoch; the images/s
of the timed epoch are recorded. Repeats are interleaved (plain, harness, harness, plain, ...:
the order alternates per repeat, an even number of repeats balances it) and medians reported,
so the ratios come from one run on one machine:

- ``overhead_pct``: ``plain / harness - 1`` in percent (target < 5);
- ``speedup_vs_base``: the variant's images/s over the ``base`` variant's, per loop.

Run: ``python -m benchmarks.train_speed [--image-size 16] [--batch-size 64] [--train-size 512]
[--repeats 3] [--variants base,channels_last,amp,compile] [--threads N] [--out DIR]``.
Writes ``DIR/train_speed_<device>.csv`` and ``.md`` with provenance (git sha, torch version,
device, CPU vector ISA (``AVX2``, ``AVX512``, `` bf16`` where the CPU has native bf16), threads,
date, load).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

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
from wtmodels.data import SyntheticImages
from wtmodels.train import run

VARIANTS = {
    "base": {},
    "channels_last": {"channels_last": True},
    "amp": {"amp": True},
    "compile": {"compile": True},
    "workers": {"num_workers": 4},
}
WEIGHT_DECAY, LR, CLIP, WARMUP_EPOCHS = 0.05, 3e-3, 1.0, 0.5


def plain_loop(model_name: str, image_size: int, batch_size: int, train_size: int,
               device: torch.device, flags: dict, seed: int = 0) -> float:
    """Images/s of the second epoch of a hand-written training loop (the reference).

    Example (the tiny ``test_wt`` model, two batches of 8 synthetic 8x8 images per epoch):
        >>> plain_loop("test_wt", 8, 8, 16, torch.device("cpu"), {}) > 0
        True
    """
    torch.manual_seed(seed)
    model = wt.create_model(model_name, num_classes=10, in_chans=3).to(device)
    if flags.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": other, "weight_decay": 0.0}], lr=LR)
    data = SyntheticImages(train_size, 10, (3, image_size, image_size), seed=seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        num_workers=flags.get("num_workers", 0), pin_memory=device.type == "cuda")
    total, warm = 2 * len(loader), int(WARMUP_EPOCHS * len(loader))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    step_model = torch.compile(model) if flags.get("compile") else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(flags.get("amp")))
    rate = 0.0
    for _ in range(2):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if flags.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = step_model(x)  # (B, 10)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = seen / (time.perf_counter() - start)
    return rate


def harness_loop(model_name: str, image_size: int, batch_size: int, train_size: int,
                 device: torch.device, flags: dict, seed: int = 0) -> float:
    """Images/s of the second epoch of ``wtmodels.train.run`` with the same settings.

    Example (as :func:`plain_loop`'s; the harness writes no files without ``out``):
        >>> harness_loop("test_wt", 8, 8, 16, torch.device("cpu"), {}) > 0
        True
    """
    final = run({"model": model_name, "dataset": "synthetic", "train_size": train_size,
                 "test_size": batch_size, "image_size": image_size, "synthetic_channels": 3,
                 "synthetic_classes": 10, "batch_size": batch_size, "epochs": 2, "lr": LR,
                 "weight_decay": WEIGHT_DECAY, "grad_clip": CLIP, "warmup_epochs": WARMUP_EPOCHS,
                 "optimizer": "adamw", "seed": seed, "data_seed": seed, "progress": "none",
                 "device": device.type, **flags})
    return final["images_per_s"]


def measure(args) -> list[dict]:
    """Both loops for every variant of the parsed ``args``, interleaved ``args.repeats`` times;
    one row per variant and loop (medians, overhead, speed-up vs ``base``, provenance).

    It starts with ``git`` (the sha of the code measured) and then trains: see
    :func:`plain_loop` and :func:`harness_loop` for what one sample measures.
    """
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    image_size = args.image_size or (32 if device.type == "cuda" else 16)
    sha = git_sha()  # the code measured: the checkout as the run starts
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = {(v, loop): [] for v in args.variants for loop in ("plain", "harness")}
    for rep in range(args.repeats):
        for variant in args.variants:
            loops = (("plain", plain_loop), ("harness", harness_loop))
            # alternate which loop goes first: the first run in a process is slower (up to
            # 25% on a CPU), which must not always land on the same side of the ratio
            for loop, fn in loops if rep % 2 == 0 else loops[::-1]:
                rate = fn(args.model, image_size, args.batch_size, args.train_size, device,
                          VARIANTS[variant])
                samples[(variant, loop)].append(rate)
                print(f"rep {rep + 1}/{args.repeats}  {variant:14s} {loop:8s} {rate:9.1f} img/s",
                      file=sys.stderr, flush=True)
    machine = describe_machine(sha)
    isa = cpu_isa()
    rows = []
    for variant in args.variants:
        med = {loop: statistics.median(samples[(variant, loop)]) for loop in ("plain",
                                                                              "harness")}
        for loop in ("plain", "harness"):
            base = statistics.median(samples[("base", loop)]) if "base" in args.variants else None
            rows.append({
                "model": args.model, "variant": variant, "loop": loop,
                "images_per_s": round(med[loop], 2),
                "samples": " ".join(f"{r:.1f}" for r in samples[(variant, loop)]),
                "overhead_pct": (round(100 * (med["plain"] / med["harness"] - 1), 2)
                                 if loop == "harness" else ""),
                "speedup_vs_base": round(med[loop] / base, 3) if base else "",
                "batch_size": args.batch_size, "image_size": image_size,
                "train_size": args.train_size, "repeats": args.repeats,
                "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                       if device.type == "cuda"
                                                       else machine["cpu_model"]),
                "cpu_isa": isa,
                "threads": torch.get_num_threads(), "git_sha": machine["git_sha"],
                "torch_version": torch.__version__, "date": machine["date"],
                "load_average_1min": machine["load_average_1min"],
            })
    return rows


def write(rows: list[dict], out: Path, command: str) -> tuple[Path, Path]:
    """Write the CSV and a Markdown summary (atomically).

    Example (hand-made rows of the ``base`` variant: the harness 5% slower than the plain loop):
        >>> import tempfile
        >>> common = {"model": "wt_s", "variant": "base", "device": "cpu", "device_name": "x86",
        ...           "cpu_isa": "AVX2", "threads": 2, "git_sha": "abc1234",
        ...           "torch_version": "2.4", "date": "2024-01-01", "load_average_1min": 0.5,
        ...           "batch_size": 64, "image_size": 16, "train_size": 512, "repeats": 3}
        >>> rows = [{**common, "loop": "plain", "images_per_s": 1000.0, "overhead_pct": "",
        ...          "speedup_vs_base": 1.0},
        ...         {**common, "loop": "harness", "images_per_s": 950.0, "overhead_pct": 5.26,
        ...          "speedup_vs_base": 1.0}]
        >>> csv_path, md_path = write(rows, Path(tempfile.mkdtemp()), "python -m ...")
        >>> csv_path.name, md_path.read_text().splitlines()[-1]
        ('train_speed_cpu.csv', '| base | 1000.0 | 950.0 | +5.3% | 1.0 |')
    """
    out.mkdir(parents=True, exist_ok=True)
    tag = rows[0]["device"].split(":")[0]
    csv_path, md_path = out / f"train_speed_{tag}.csv", out / f"train_speed_{tag}.md"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    r0 = rows[0]
    lines = [f"# Training throughput: {r0['model']} ({r0['device_name']})", "",
             f"`{command}`", "",
             f"git {r0['git_sha']}, torch {r0['torch_version']}, device {r0['device']} "
             f"(CPU ISA {r0['cpu_isa']}), "
             f"{r0['threads']} threads, {r0['date']}, load average {r0['load_average_1min']}; "
             f"batch {r0['batch_size']}, images 3x{r0['image_size']}x{r0['image_size']}, "
             f"{r0['train_size']} images per epoch, median of {r0['repeats']} interleaved "
             "repeats (second epoch of each).", "",
             "| variant | plain img/s | harness img/s | harness overhead | speed-up vs base "
             "(harness) |", "| --- | ---: | ---: | ---: | ---: |"]
    by = {(r["variant"], r["loop"]): r for r in rows}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        p, h = by[(variant, "plain")], by[(variant, "harness")]
        lines.append(f"| {variant} | {p['images_per_s']:.1f} | {h['images_per_s']:.1f} | "
                     f"{h['overhead_pct']:+.1f}% | {h['speedup_vs_base'] or '-'} |")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.train_speed``: measure both loops, write the csv / md; exit status.

    Example (bad arguments: one line on stderr, exit status 2, before any training):
        >>> main(["--variants", "base,turbo"])
        2
    """
    parser = OneLineParser(prog="python -m benchmarks.train_speed",
                           description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wt_s", help="registered model (default wt_s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image size (default: 32 on a GPU, 16 on a CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=512, help="images per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="base,channels_last,amp,compile",
                        type=lambda s: list(dict.fromkeys(v for v in s.split(",") if v)),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results")
    try:
        args = parser.parse_args(argv)
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise UsageError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if not args.variants:
            raise UsageError(f"--variants names no variant; choose from {', '.join(VARIANTS)}")
        wt.get_config(args.model)  # ValueError listing the registered models
        for name in ("image_size", "batch_size", "train_size", "repeats", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.batch_size > args.train_size:  # the harness's test set is one batch: a huge
            # --batch-size generated that many test images (hours); an epoch is one batch anyway
            raise UsageError(f"--batch-size must be <= --train-size ({args.train_size}), got "
                             f"{args.batch_size}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA device")
        if message := threads_error(args.threads):
            raise UsageError(message)
        out = make_out_dir(args.out)
    except (ValueError, OSError) as err:  # UsageError is a ValueError
        print(f"train_speed: {err}", file=sys.stderr)
        return 2
    rows = measure(args)
    command = "python -m benchmarks.train_speed " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    csv_path, md_path = write(rows, out, command.strip())
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    exit_with(main)
