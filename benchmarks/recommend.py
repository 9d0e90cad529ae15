"""Pick a configuration for a budget from measured results: ``python -m benchmarks.recommend``.

``python -m benchmarks.recommend DIR --params N`` (or ``--time S``) reads ``DIR/results.csv``,
averages each configuration over its seeds, keeps those within the budget (mean trainable
parameters <= N, or mean total training time <= S seconds), and among the ones whose mean test
accuracy is within ``--tolerance`` points (default 0.5) of the best of them recommends the
smallest: fewest parameters, then fewest cell evaluations per forward pass (an unrolled model's
depth x stages, a DEQ's solver iterations; the depth where they are not recorded), then
narrowest width, then fewest masks, then least training time. Nothing is extrapolated: only
measured configurations are candidates, and only those whose every run finished cleanly: a
configuration with a seed that diverged (stopped on, or ended with, non-finite losses) or failed
(a run directory without a results row) is not considered, and the command lists it.

Example:
    >>> rows = [{"label": "WT", "config_id": c, "depth": d, "width": 32, "params": 1000 * d,
    ...          "seed": 0, "test_acc": a} for c, d, a in (("a", 2, .945), ("b", 4, .953),
    ...                                                      ("c", 8, .960))]
    >>> pick = recommend(rows, params=5000)
    >>> pick["choice"]["depth"], round(100 * pick["best_acc"], 1)
    (4, 95.3)
    >>> recommend(rows, params=2000, tolerance=1.0)["choice"]["depth"]
    2
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

from benchmarks.aggregate import aggregate, config_key, flags, number
from benchmarks.results_io import check_unique, read_rows
from benchmarks.rows import failed_rows
from benchmarks.summary import to_markdown
from wtmodels.cli import DashValueParser, exit_with

BUDGETS = {"params": "params", "time": "train_time_s"}


def _size_key(g: dict) -> tuple:
    def num(key):
        v = g.get(f"{key}_mean", g.get(key))
        return v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    # compute per forward pass: the cell evaluations (an unrolled model's depth x stages, a
    # DEQ's solver iterations), where recorded; a DEQ's "depth" is only its warm-up depth
    evals = num("cell_evals")
    return (num("params"), evals if math.isfinite(evals) else num("depth"), num("width"),
            num("mask_k"), num("train_time_s"))


def recommend(rows: Sequence[dict], *, params: float | None = None, time_s: float | None = None,
              tolerance: float = 0.5, dataset: str | None = None) -> dict:
    """The smallest measured configuration within ``tolerance`` points of the best under a budget.

    Args:
        rows: results rows (one per run).
        params: budget of trainable parameters (mean over seeds must be <= it).
        time_s: budget of total training time in seconds (mean over seeds must be <= it).
        tolerance: accuracy slack in percentage points.
        dataset: keep only the rows of this dataset; needed when the rows hold several
            (their accuracies are not comparable).

    Returns:
        ``{"choice": group, "best": group, "best_acc": float, "candidates": [groups],
        "feasible": int, "budget": str, "unstable": [groups], "unmeasured": [groups]}``
        (groups as :func:`benchmarks.aggregate.aggregate`; ``unstable``: configurations within
        the budget left out because a seed diverged or failed, smallest first;
        ``unmeasured``: configurations no run of which records the budget column (every run
        failed, or diverged before its first epoch ended, or the column is blank), so whether
        they fit is unknown).

    Raises:
        ValueError: not exactly one budget, a budget <= 0, a negative tolerance, no rows, rows
            of several datasets and no ``dataset``, or no measured configuration within the
            budget whose runs all finished cleanly.

    Example (two seeds each of depths 2 and 4; depth 2 is within 1 point of depth 4):
        >>> rows = [{"label": "WT", "depth": d, "width": 32, "params": 1000 * d, "seed": s,
        ...          "test_acc": a} for d, accs in ((2, (.94, .95)), (4, (.95, .96)))
        ...         for s, a in enumerate(accs)]
        >>> pick = recommend(rows, params=5000, tolerance=1.0)
        >>> pick["choice"]["depth"], pick["best"]["depth"], pick["feasible"]
        (2, 4, 2)
        >>> try:
        ...     recommend(rows, params=1000)
        ... except ValueError as err:
        ...     print(err)
        budget: no measured configuration has params <= 1000; the smallest measured is 2000
    """
    if (params is None) == (time_s is None):
        raise ValueError("budget: give exactly one of --params N or --time S")
    budget_key, limit = ("params", params) if params is not None else ("train_time_s", time_s)
    if not limit > 0:
        raise ValueError(f"budget: must be > 0, got {limit}")
    if not 0 <= tolerance < math.inf:  # nan too
        raise ValueError(f"tolerance: must be a finite number >= 0 points, got {tolerance}")
    datasets = sorted({str(r["dataset"]) for r in rows if r.get("dataset") not in (None, "")})
    if dataset is not None:
        if dataset not in datasets:
            raise ValueError(f"dataset: no runs on {dataset!r}; the results hold "
                             f"{', '.join(datasets) or 'no dataset column'}")
        rows = [r for r in rows if str(r.get("dataset")) == dataset]
    elif len(datasets) > 1:
        raise ValueError(f"dataset: the results hold runs on {', '.join(datasets)}, whose "
                         "accuracies are not comparable; choose one with dataset=NAME "
                         "(--dataset NAME on the command line)")
    groups = aggregate(rows)
    if not groups:
        raise ValueError("results: no finished runs to recommend from")
    # a configuration whose every seed diverged has no clean mean of the budget column: place
    # it by its runs' own values, so it is listed among the unstable ones, not lost
    recorded: dict[tuple, list[float]] = {}
    for row in rows:
        value = number(row.get(budget_key))
        if value is not None and math.isfinite(value):
            recorded.setdefault(config_key(row), []).append(value)

    def cost(g: dict) -> float:
        mean = g[f"{budget_key}_mean"]
        if math.isfinite(mean):
            return mean
        values = recorded.get(config_key(g))
        return sum(values) / len(values) if values else math.nan

    within = [g for g in groups if cost(g) <= limit  # nan (nothing recorded) is not
              and (math.isfinite(g[f"{budget_key}_mean"]) or g["n_stopped"] or g["n_failed"])]
    unstable = sorted((g for g in within if g["n_stopped"] or g["n_failed"]), key=_size_key)
    # a configuration whose every run failed, or diverged before recording the budget column
    # (no training time when it stopped in its first epoch), or whose rows leave it blank (a
    # hand-edited file) records no budget: whether it fits is unknown, so it is listed apart
    # rather than silently left out
    unmeasured = sorted((g for g in groups if math.isnan(cost(g))), key=_size_key)
    feasible = [g for g in within if g not in unstable and math.isfinite(g["test_acc_mean"])]
    if not feasible and unstable:
        raise ValueError(f"budget: every configuration with {budget_key} <= {limit:g} had a "
                         f"diverged or failed run ({len(unstable)} configuration(s); the "
                         f"smallest: {describe(unstable[0])})")
    if not feasible and not any(math.isfinite(number(r.get("test_acc")) or math.nan)
                                for r in rows):
        raise ValueError("results: no run records a finite test_acc, the accuracy a "
                         "recommendation is made on")
    if not feasible:
        measured = [g[f"{budget_key}_mean"] for g in groups
                    if math.isfinite(g[f"{budget_key}_mean"])]
        if not any(math.isfinite(number(r.get(budget_key)) or math.nan) for r in rows):
            raise ValueError(f"budget: no run in these results records {budget_key}, the "
                             f"column the budget is on")
        smallest = f"; the smallest measured is {min(measured):.4g}" if measured else ""
        raise ValueError(f"budget: no measured configuration has {budget_key} <= {limit:g}"
                         + smallest)
    best = max(feasible, key=lambda g: g["test_acc_mean"])
    floor = best["test_acc_mean"] - tolerance / 100.0
    candidates = sorted((g for g in feasible if g["test_acc_mean"] >= floor - 1e-12),
                        key=_size_key)
    return {"choice": candidates[0], "best": best, "best_acc": best["test_acc_mean"],
            "candidates": candidates, "feasible": len(feasible),
            "budget": f"{budget_key} <= {limit:g}", "unstable": unstable,
            "unmeasured": unmeasured}


def describe(group: dict) -> str:
    """A one-line description of a configuration and its measured numbers.

    Example:
        >>> describe({"label": "WT", "depth": 4, "width": 32, "n": 2, "test_acc_mean": 0.95,
        ...           "test_acc_std": 0.01, "params_mean": 1e5, "train_time_s_mean": 12.0})
        'WT, depth 4, width 32: 95.0 ± 1.0 % over 2 seed(s), 100000 params, 12 s training'
        >>> describe({"depth": 8, "test_acc_mean": 0.6, "n": 1})
        'depth 8: 60.0 % over 1 seed(s)'
    """
    parts = [str(group["label"]) if group.get("label") is not None else ""]
    if group.get("core") == "deq":
        parts.append(" / ".join(str(group[k]) for k in ("f_solver", "grad") if group.get(k)))
    elif group.get("depth") is not None:
        parts.append(f"depth {group['depth']}")
    if group.get("width") is not None:
        parts.append(f"width {group['width']}")
    if group.get("mask_k"):
        parts.append(f"{group['mask_k']} mask(s) at density {group.get('mask_density')}")
    text = ", ".join(p for p in parts if p) or "(no label, depth or width)"
    count = group.get("test_acc_count", group.get("n"))
    if math.isfinite(group.get("test_acc_mean", math.nan)):
        spread = f" ± {100 * group['test_acc_std']:.1f}" if count > 1 else ""  # none from one
        text += f": {100 * group['test_acc_mean']:.1f}{spread} % over {count} seed(s)"
    else:
        text += ": no clean run"
    if marks := flags(group):
        text += f" [{marks}]"
    if math.isfinite(group.get("params_mean", math.nan)):
        text += f", {group['params_mean']:.0f} params"
    if math.isfinite(group.get("train_time_s_mean", math.nan)):
        seconds = group["train_time_s_mean"]  # 0.042 s, 12.3 s, 1234 s
        text += f", {seconds:.3g} s training" if seconds < 100 else f", {seconds:.0f} s training"
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.recommend DIR --params N | --time S [--tolerance P] [--dataset D]``
    (exit 2 with one line on bad input).

    Example (a hand-made ``results.csv``: two seeds of one configuration):
        >>> import tempfile
        >>> from benchmarks.results_io import write_rows
        >>> sweep_dir = tempfile.mkdtemp()
        >>> write_rows(os.path.join(sweep_dir, "results.csv"),
        ...            [{"label": "WT", "depth": 4, "width": 32, "params": 4000, "seed": s,
        ...              "test_acc": a} for s, a in ((0, 0.95), (1, 0.96))])
        >>> main([sweep_dir, "--params", "5000"])
        budget params <= 5000: 1 measured configuration(s) fit; best 95.5 %.
        recommended (smallest within 0.5 points of the best):
          WT, depth 4, width 32: 95.5 ± 0.7 % over 2 seed(s), 4000 params
        <BLANKLINE>
        candidates within 0.5 points, smallest first:
        | label | depth | width | seeds | test acc % | params |
        | --- | --- | --- | --- | --- | --- |
        | WT | 4 | 32 | 2 | 95.5 ± 0.7 | 4000 |
        0
    """
    parser = DashValueParser(
        prog="python -m benchmarks.recommend",
        description="The smallest measured configuration within a tolerance of the best "
                    "accuracy under a parameter or training-time budget.")
    parser.add_argument("sweep_dir", help="a directory with results.csv")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params", type=float, help="trainable-parameter budget")
    budget.add_argument("--time", type=float, help="training-time budget in seconds (per run)")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="accuracy slack in percentage points (default 0.5)")
    parser.add_argument("--dataset", default=None,
                        help="only the runs on this dataset (needed when the results hold several)")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    args = parser.parse_args(argv)
    path = os.path.join(args.sweep_dir, "results.csv")
    if not os.path.exists(path):
        print(f"{parser.prog}: error: sweep_dir: no results.csv in {args.sweep_dir!r}",
              file=sys.stderr)
        return 2
    try:
        rows = read_rows(path)
        check_unique(path, rows)  # a run written twice is not two seeds
        rows += failed_rows(args.sweep_dir, {r.get("run_id") for r in rows})
        pick = recommend(rows, params=args.params, time_s=args.time, tolerance=args.tolerance,
                         dataset=args.dataset)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"budget {pick['budget']}: {pick['feasible']} measured configuration(s) fit; best "
          f"{100 * pick['best_acc']:.1f} %.")
    print(f"recommended (smallest within {args.tolerance:g} points of the best):")
    print("  " + describe(pick["choice"]))
    if pick["choice"] is not pick["best"]:
        print("best under the budget:")
        print("  " + describe(pick["best"]))
    print(f"\ncandidates within {args.tolerance:g} points, smallest first:")
    print(to_markdown(pick["candidates"]))
    if pick["unstable"]:
        print(f"\nnot considered: {len(pick['unstable'])} configuration(s) under the budget "
              "had a diverged or failed run (means over their clean runs):")
        for group in pick["unstable"]:
            print("  " + describe(group))
    if pick["unmeasured"]:
        print(f"\nnot considered: {len(pick['unmeasured'])} configuration(s) with no "
              f"{BUDGETS['params' if args.params is not None else 'time']} recorded (every run "
              "failed or diverged before recording it, or the column is blank; rerun the sweep "
              "for the failed ones):")
        for group in pick["unmeasured"]:
            print("  " + describe(group))
    return 0


if __name__ == "__main__":
    exit_with(main)
