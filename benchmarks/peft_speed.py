"""Speed of CapaBoost-LoRA: train step vs plain LoRA, merged inference vs the base model.

Measures, in one process with the variants interleaved (repeat r runs every variant once) and
medians over the repeats:

- train step (forward, cross-entropy, backward, Adam step) of CapaBoost-LoRA with ``d`` copies
  at density 0.5 divided by plain LoRA at the same rank (target <= 1.2), with the default
  per-layer implementation choice (``impl="auto"``) and with the factorised path forced;
- inference (eval, no grad) of a model whose CapaBoost update is merged, divided by the base
  model without wrappers (target ~1.0).

Writes ``OUT/peft_speed.csv`` (one row per measurement, with provenance) and
``OUT/peft_speed.md`` (the table) atomically, and prints the table.

Usage::

    python -m benchmarks.peft_speed [--out benchmarks/results] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import Counter

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
from benchmarks.results_io import rows_to_csv
from wtmodels.atomic import atomic_write_text
from wtmodels.cli import OneLineParser, UsageError, exit_with
from wtmodels.peft import add_lora, merge_lora, peft_layers

#: models measured: name -> (create_model overrides, image size)
CASES = {
    "wt_s": ({"model": "wt_s"}, 28),
    "capaboost_model": ({"model": "wt_s", "width": 16, "depth": 4, "stages": 2,
                         "norm_groups": 4, "weight_norm": True}, 28),
}
TRAIN_TARGET = 1.2
INFERENCE_TARGET = 1.05


def _model(overrides: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(overrides)
    return wt.create_model(kw.pop("model"), num_classes=10, in_chans=1, **kw)


def _variants(rank: int) -> dict[str, dict]:
    return {
        "lora": dict(rank=rank),
        "capaboost_d2": dict(rank=rank, copies=2, density=0.5),
        "capaboost_d4": dict(rank=rank, copies=4, density=0.5),
        "lora_factorized": dict(rank=rank, impl="factorized"),
        "capaboost_d4_factorized": dict(rank=rank, copies=4, density=0.5, impl="factorized"),
    }


def _impls(model: torch.nn.Module) -> str:
    counts = Counter(layer.impl for layer in peft_layers(model))
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved per repeat (in
    reversed order every other repeat: no function always runs first)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for rep in range(repeats):
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _check_case(name: str) -> None:
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; valid cases: {', '.join(CASES)}")


def measure_case(name: str, rank: int, batch: int, repeats: int) -> list[dict]:
    """Train-step and inference rows of one model (see the module docstring).

    Example (a measurement takes seconds: five LoRA variants warmed up and timed, then
    inference; the name must be a key of :data:`CASES`):
        >>> sorted(CASES)
        ['capaboost_model', 'wt_s']
        >>> measure_case("wt_m", rank=4, batch=8, repeats=1)
        Traceback (most recent call last):
            ...
        ValueError: unknown case 'wt_m'; valid cases: wt_s, capaboost_model
    """
    _check_case(name)
    overrides, size = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen)  # (B, 1, H, W)
    y = torch.randint(0, 10, (batch,), generator=gen)
    variants = _variants(rank)
    models, steps = {}, {}
    for label, kw in variants.items():
        model = _model(overrides)
        add_lora(model, train_head=True, **kw)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        models[label], steps[label] = model, step
    train = _interleaved(steps, repeats)
    rows = []
    for label, kw in variants.items():
        ref = "lora_factorized" if label.endswith("_factorized") else "lora"
        rows.append({
            "case": name, "measure": "train_step", "variant": label, "rank": rank,
            "copies": kw.get("copies", 1), "density": kw.get("density", 1.0),
            "impl": _impls(models[label]), "batch": batch, "repeats": repeats,
            "median_ms": 1e3 * train[label],
            "ratio": train[label] / train[ref], "ratio_to": ref,
            "target": TRAIN_TARGET if label.startswith("capaboost") else None,
        })

    base = _model(overrides).eval()
    merged = copy.deepcopy(base)
    layers = add_lora(merged, train_head=True, **variants["capaboost_d4"])
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()  # a non-zero update, merged below
    merge_lora(merged)
    merged.eval()

    def infer(model):
        with torch.no_grad():
            model(x)

    infer_repeats = 3 * repeats  # cheap: more repeats against the noise
    inference = _interleaved({"base": lambda: infer(base), "merged": lambda: infer(merged)},
                             infer_repeats)
    for label in ("base", "merged"):
        rows.append({
            "case": name, "measure": "inference", "variant": f"capaboost_d4_{label}"
            if label == "merged" else "base", "rank": rank, "copies": 4 if label == "merged"
            else 0, "density": 0.5 if label == "merged" else None, "impl": "merged"
            if label == "merged" else "", "batch": batch, "repeats": infer_repeats,
            "median_ms": 1e3 * inference[label], "ratio": inference[label] / inference["base"],
            "ratio_to": "base", "target": INFERENCE_TARGET if label == "merged" else None,
        })
    for row in rows:
        row["meets_target"] = None if row["target"] is None else row["ratio"] <= row["target"]
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    """The rows as a Markdown table with a provenance line.

    Example (one hand-made train-step row):
        >>> machine = {"git_sha": "abc1234", "torch_version": "2.4", "cpu_model": "x86",
        ...            "date": "2024-01-01", "load_average_1min": 0.5, "cpu_count": 4}
        >>> row = {"case": "wt_s", "measure": "train_step", "variant": "capaboost_d4",
        ...        "impl": "dense:6", "batch": 64, "median_ms": 12.34, "ratio": 1.1,
        ...        "ratio_to": "lora", "target": 1.2, "meets_target": True, "threads": 1}
        >>> print(markdown([row], machine).splitlines()[-1])
        | wt_s | train_step | capaboost_d4 | dense:6 | 64 | 12.3 | 1.100 | lora | <= 1.2 ok |
    """
    lines = [
        "# CapaBoost-LoRA speed (`python -m benchmarks.peft_speed`)",
        "",
        f"git {machine['git_sha']}, torch {machine['torch_version']}, device cpu "
        f"({machine['cpu_model']}, CPU ISA {rows[0].get('cpu_isa', '?')}), threads "
        f"{rows[0]['threads']}, {machine['date']}, "
        f"1-min load {machine['load_average_1min']} on {machine['cpu_count']} cores. "
        "Medians over interleaved repeats; ratios within one run.",
        "",
        "| case | measure | variant | impl (layers) | batch | median ms | ratio | to | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']}" + (
            " ok" if r["meets_target"] else " MISSED")
        lines.append(
            f"| {r['case']} | {r['measure']} | {r['variant']} | {r['impl']} | {r['batch']} | "
            f"{r['median_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_to']} | {target} |"
        )
    return "\n".join(lines) + "\n"


def run_speed(out_dir: str, cases=tuple(CASES), rank: int = 4, batch: int = 64,
              repeats: int = 7, threads: int = 1) -> list[dict]:
    """Measure every case and write ``peft_speed.csv`` / ``peft_speed.md`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        cases: names among :data:`CASES`.
        rank: LoRA rank shared by every variant.
        batch: images per step.
        repeats: interleaved repeats (medians over them).
        threads: torch intra-op threads.

    Returns:
        The rows written.

    Example (a run takes tens of seconds; bad arguments are refused before any folder or
    measurement):
        >>> run_speed("benchmarks/results", cases=("wt_m",))
        Traceback (most recent call last):
            ...
        ValueError: unknown case 'wt_m'; valid cases: wt_s, capaboost_model
        >>> run_speed("benchmarks/results", repeats=0)
        Traceback (most recent call last):
            ...
        ValueError: repeats must be an integer >= 1, got 0
    """
    if not cases:
        raise ValueError(f"no case given; valid cases: {', '.join(CASES)}")
    for case in cases:
        _check_case(case)
    for field, value in (("rank", rank), ("batch", batch), ("repeats", repeats),
                         ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
    if message := threads_error(threads):
        raise ValueError(message)
    out_dir = make_out_dir(out_dir)  # before measuring: a bad folder fails at once
    sha = git_sha()  # the code measured: the checkout as the run starts
    torch.set_num_threads(threads)
    rows = [row for case in cases for row in measure_case(case, rank, batch, repeats)]
    machine = {**describe_machine(sha), "torch_version": torch.__version__}
    isa = cpu_isa()
    for row in rows:
        row.update(threads=threads, device="cpu", cpu_isa=isa, git_sha=machine["git_sha"],
                   torch_version=torch.__version__, date=machine["date"],
                   load_average_1min=machine["load_average_1min"])
    atomic_write_text(os.path.join(out_dir, "peft_speed.csv"), rows_to_csv(rows))
    atomic_write_text(os.path.join(out_dir, "peft_speed.md"), markdown(rows, machine))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.peft_speed``; returns the exit status (1: a target missed).

    Example (bad arguments: one line on stderr, exit status 2, no folder made):
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "speed")
        >>> main(["--out", out, "--rank", "0"]), os.path.exists(out)
        (2, False)
    """
    parser = OneLineParser(prog="python -m benchmarks.peft_speed", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated among {', '.join(CASES)}")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    try:
        args = parser.parse_args(argv)
        cases = tuple(dict.fromkeys(c for c in args.cases.split(",") if c))  # each once
        # ~ expanded: the .md is read back from there; run_speed makes the folder once every
        # argument is checked (made here first, a bad case or --rank 0 left an empty folder)
        args.out = os.path.expanduser(args.out)
        rows = run_speed(args.out, cases, args.rank, args.batch, args.repeats, args.threads)
    except (UsageError, ValueError, OSError) as err:
        print(f"python -m benchmarks.peft_speed: error: {err}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "peft_speed.md")) as f:
        print(f.read(), end="")
    return 0 if all(r["meets_target"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    exit_with(main)
