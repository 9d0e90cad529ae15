"""Realistic fake sweep results for testing the plotting, recommend and notebook code.

These rows are made up (a smooth accuracy model plus seeded noise); the committed results under
benchmarks/results/ come from real runs only.
"""

from __future__ import annotations

import math
import os
import random

from benchmarks.presets import config_id_for
from benchmarks.results_io import write_rows

LABELS = ("WT", "WT + distinct masks", "WT + shared mask", "untied", "DEQ")


def _acc(label: str, depth: int, width: int, k: int, density: float, rng) -> float:
    base = 0.80 + 0.03 * math.log2(depth) + 0.02 * math.log2(width / 8)
    bonus = {"WT": 0.0, "WT + distinct masks": 0.01 * math.log2(max(k, 1)) * density,
             "WT + shared mask": -0.01, "untied": 0.02, "DEQ": -0.01}[label]
    return min(0.995, base + bonus + rng.gauss(0, 0.005))


def fake_rows(seeds=(0, 1, 2), depths=(1, 2, 4), widths=(8, 16),
              masks=((1, 0.5), (2, 0.5), (8, 0.5), (1, 0.25), (2, 0.25), (8, 0.25)),
              deq_diverged=0.05) -> list[dict]:
    """Rows shaped like benchmarks.rows.assemble_row's output: a depth x width grid of WT,
    WT + distinct masks (K = depth), untied and DEQ, plus a masks grid at depth 4, width 8."""
    rng = random.Random(0)
    rows = []

    def add(label, core, depth, width, k, density, seed, **extra):
        config = {"label": label, "depth": depth, "width": width, "mask_k": k,
                  "mask_density": density}
        tied_params = 2 * 9 * width * width + 1000
        params = tied_params * (depth if core == "untied" else 1)
        time_s = 2.0 * depth * (width / 8) ** 2 * (3 if core == "deq" else 1) + rng.random()
        row = {"run_id": f"{label}-{depth}-{width}-{k}-{density}-{seed}",
               "label": label, "config_id": config_id_for(label, config), "model": "wt_s",
               "dataset": "digits", "core": core, "depth": depth, "width": width,
               "mask_k": k, "mask_density": density if k else None, "seed": seed, "epochs": 3,
               "test_acc": _acc(label, depth, width, k, density, rng),
               "params": params, "nonzero_params_per_iter": int(params * (density if k else 1)),
               "flops_per_image": 2 * 9 * width * width * 64 * depth,
               "cell_evals": depth, "train_time_s": time_s, "epoch_time_s": time_s / 3,
               "images_per_s": 1437 * 3 / time_s, "peak_mem_mb": 100 + 5 * depth * width / 8,
               "skipped_steps": 0, "git_sha": "abc123", "torch_version": "2.x",
               "device": "cpu", "threads": 1, **extra}
        row["best_test_acc"] = row["test_acc"] + 0.003
        rows.append(row)

    for seed in seeds:
        for width in widths:
            for depth in depths:
                add("WT", "unrolled", depth, width, 0, 0.5, seed)
                add("untied", "untied", depth, width, 0, 0.5, seed)
                add("WT + distinct masks", "unrolled", depth, width, depth, 0.5, seed)
            add("DEQ", "deq", 6, width, 0, 0.5, seed, nstep=14 + seed,
                rel_residual=10 ** rng.uniform(-4, -2), rel_residual_max=0.05,
                converged=0.9, diverged=deq_diverged, skipped_steps=seed)
        for k, density in masks:
            label = "WT + shared mask" if k == 1 else "WT + distinct masks"
            if (k, density) != (4, 0.5) and 4 in depths and 8 in widths:
                add(label, "unrolled", 4, 8, k, density, seed)
    return rows


def fake_extrapolation(rows: list[dict]) -> list[dict]:
    """Extrapolation rows (test depth / training depth) for the unrolled runs of ``rows``."""
    out = []
    for r in rows:
        if r["core"] not in ("unrolled", "deq"):
            continue
        for test_depth in sorted({max(1, round(r["depth"] * f)) for f in (0.5, 1.0, 2.0)}):
            factor = test_depth / r["depth"]
            drop = 0.0 if factor == 1.0 else 0.1 * abs(math.log2(factor))
            out.append({"key": f"{r['run_id']}@{test_depth}", "run_id": r["run_id"],
                        "label": r["label"], "config_id": r["config_id"], "seed": r["seed"],
                        "core": r["core"], "train_depth": r["depth"], "test_depth": test_depth,
                        "factor": test_depth / r["depth"], "test_acc": r["test_acc"] - drop})
    return out


def write_fake_sweep(directory: str, **kwargs) -> list[dict]:
    """Write results.csv and extrapolation.csv of a fake sweep into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    rows = fake_rows(**kwargs)
    write_rows(os.path.join(directory, "results.csv"), rows)
    write_rows(os.path.join(directory, "extrapolation.csv"), fake_extrapolation(rows))
    return rows


def train_runner(config: dict, out_dir: str) -> dict:
    """A custom runner for the harness tests: trains in-process with wtmodels.train.run and
    returns its final metrics plus a marker of where it ran."""
    from wtmodels.train import run

    final = run({**config, "progress": "none"})
    return {**final, "runner_out_dir": out_dir}


def write_failed_run(sweep_dir: str, row: dict) -> str:
    """A run directory as a failed run leaves it (``spec.json`` and a log, no ``done.json``,
    no results row) for the run that would have written ``row``; returns its directory."""
    import json

    # the arguments fake_rows hashed into the row's config_id, as a sweep's spec.json holds them
    config = {"label": row["label"], "depth": row["depth"], "width": row["width"],
              "mask_k": row["mask_k"], "mask_density": row["mask_density"] or 0.5,
              "seed": row["seed"]}
    run_dir = os.path.join(sweep_dir, "runs", row["run_id"])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump({"run_id": row["run_id"], "label": row["label"], "config": config,
                   "runner": None}, f)
    with open(os.path.join(run_dir, "train.log"), "w") as f:
        f.write("RuntimeError: out of memory\n")
    return run_dir
