"""Post-hoc test-time depth extrapolation of a sweep's saved checkpoints.

For every run in ``results.csv`` whose core has a test-time depth (unrolled: cell
applications; deq: solver iteration budget; ode: integration time scaled by depth / trained
depth, see ``ImplicitClassifier.set_depth``), the final checkpoint is rebuilt from the run's
``config.json``, ``model.set_depth(d)`` is called for ``d = round(factor * trained depth)`` for
each factor, and the test set (as the run used it, no augmentation) is evaluated. One row per
(run, test depth) goes to ``extrapolation.csv`` (appended atomically, keyed by
``run_id@depth``, so a rerun evaluates only what is missing). The trained depth is the model's
``depth`` for unrolled and ode cores and its eval solver budget for deq cores. At factor 1 the
accuracy equals the run's final test accuracy.

Example::

    python -m benchmarks.extrapolate results/quick --factors 0.5,1,2
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

from benchmarks.provenance import threads_error
from benchmarks.results_io import append_rows, check_unique, finished_ids, read_rows
from wtmodels.cli import DashValueParser, exit_with

EXTRAPOLATION = "extrapolation.csv"
KEY = "key"
CORES_WITH_DEPTH = ("unrolled", "deq", "ode")


def trained_depth(model_config: dict) -> int:
    """The depth a model was trained at, in the units of ``set_depth`` for its core.

    Example:
        >>> trained_depth({"core": "deq", "depth": 6, "f_max_iter": 20, "eval_f_max_iter": None})
        20
        >>> trained_depth({"core": "unrolled", "depth": 4})
        4
    """
    if model_config.get("core") == "deq":
        return int(model_config.get("eval_f_max_iter") or model_config["f_max_iter"])
    return int(model_config["depth"])


def depth_grid(depth: int, factors: Sequence[float]) -> list[int]:
    """Distinct test depths ``max(1, round(f * depth))``, sorted.

    Example:
        >>> depth_grid(4, (0.5, 1.0, 1.5, 2.0))
        [2, 4, 6, 8]
        >>> depth_grid(1, (0.5, 1.0))
        [1]
    """
    return sorted({max(1, round(f * depth)) for f in factors})


def read_run_config(run_dir: str) -> dict:
    """A run's parsed ``config.json``; ``ValueError`` naming the file if it is missing or
    damaged.

    Example:
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> with open(os.path.join(run_dir, "config.json"), "w") as f:
        ...     json.dump({"train": {"model": "wt_s"}, "data_info": {}}, f)
        >>> read_run_config(run_dir)["train"]
        {'model': 'wt_s'}
        >>> read_run_config(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: .../config.json: not a readable run config (FileNotFoundError(2, ...))
    """
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        if not isinstance(config, dict) or not {"train", "data_info"} <= set(config):
            raise ValueError("no 'train' and 'data_info' sections")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable run config ({err!r})") from None
    return config


def run_trained_depth(run_dir: str) -> int:
    """:func:`trained_depth` of a run directory's ``config.json``; ``ValueError`` naming the file
    when its ``model_config`` is missing or records no depth (a run written by older code, or a
    hand-edited file), not a ``KeyError`` traceback.

    Example:
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> with open(os.path.join(run_dir, "config.json"), "w") as f:
        ...     json.dump({"train": {}, "data_info": {},
        ...                "model_config": {"core": "deq", "depth": 6, "f_max_iter": 20}}, f)
        >>> run_trained_depth(run_dir)  # a deq core's depth: its solver budget
        20
    """
    config = read_run_config(run_dir)
    try:
        return trained_depth(config["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        path = os.path.join(run_dir, "config.json")
        raise ValueError(f"{path}: no trained depth in its 'model_config' section ({err!r})"
                         ) from None


def _example_run_dir():
    """``(run_dir, model)``: a hand-made run directory of the tiny ``test_wt`` model (depth 2,
    digits, 100 test images) with its checkpoint, for this module's examples."""
    import tempfile

    import torch

    import wtmodels as wt
    from wtmodels.checkpoint import save_checkpoint

    run_dir = tempfile.mkdtemp()
    torch.manual_seed(0)
    model = wt.create_model("test_wt", num_classes=10, in_chans=1)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": {"model": "test_wt", "dataset": "digits", "test_size": 100},
                   "data_info": {"num_classes": 10, "in_chans": 1},
                   "model_config": {"depth": 2}}, f)
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {"model": model.state_dict()})
    return run_dir, model


def load_trained_model(run_dir: str):
    """Rebuild a run's model from ``config.json`` (its saved ``model_config``) and load
    ``checkpoint.pt`` (eval mode, CPU).

    Returns:
        ``(model, config)`` where ``config`` is the parsed ``config.json``.

    Example (a hand-made run directory of the tiny ``test_wt`` model):
        >>> import torch
        >>> run_dir, model = _example_run_dir()
        >>> loaded, config = load_trained_model(run_dir)
        >>> loaded.training, torch.equal(loaded.head.weight, model.head.weight)
        (False, True)
    """
    import wtmodels as wt
    from wtmodels.checkpoint import load_checkpoint

    config = read_run_config(run_dir)
    # the resolved settings the run trained with (a later edit of the registry must not change
    # the solver, tolerances or gradient of a trained model); older runs: registry + overrides
    overrides = dict(config.get("model_config") or config.get("model_overrides") or {})
    overrides.update(num_classes=config["data_info"]["num_classes"],
                     in_chans=config["data_info"]["in_chans"])
    model = wt.create_model(config["train"]["model"], **overrides)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    try:
        model.load_state_dict(load_checkpoint(ckpt)["model"])
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(f"{ckpt}: cannot load the run's weights ({err!r})") from None
    model.eval()
    return model, config


def _test_loader(config: dict):
    from torch.utils.data import DataLoader

    from wtmodels.data import get_datasets

    t = config["train"]
    _, test_ds, _ = get_datasets(t["dataset"], data_dir=t.get("data_dir"),
                                 train_size=t.get("train_size"), test_size=t.get("test_size"),
                                 seed=t.get("data_seed", 0), augment=False,
                                 image_size=t.get("image_size"),
                                 channels=t.get("synthetic_channels"),
                                 classes=t.get("synthetic_classes"))
    batch = t.get("test_batch_size") or 2 * t.get("batch_size", 64)
    return DataLoader(test_ds, batch_size=batch, shuffle=False)


def _device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_depths(run_dir: str, factors: Sequence[float], device: str | None = None
                    ) -> list[dict]:
    """Test accuracy (and solver statistics) of one run's checkpoint at each test depth.

    Args:
        run_dir: a finished run directory (``config.json``, ``checkpoint.pt``).
        factors: test depth / trained depth ratios.
        device: ``"cpu"``, ``"cuda"`` or None / ``"auto"`` (CUDA when available).

    Returns:
        One dict per test depth: ``train_depth``, ``test_depth``, ``factor``, ``test_acc``,
        ``test_loss`` and the model's averaged ``core_stats()`` (``nstep``, ``rel_residual``...).

    Example (a hand-made run directory of the tiny ``test_wt`` model, on 100 digits images):
        >>> run_dir, _ = _example_run_dir()
        >>> rows = evaluate_depths(run_dir, (0.5, 1.0), device="cpu")
        >>> [(r["train_depth"], r["test_depth"], r["factor"]) for r in rows]
        [(2, 1, 0.5), (2, 2, 1.0)]
        >>> all(0 <= r["test_acc"] <= 1 for r in rows)
        True
    """
    import torch
    import torch.nn.functional as F

    from wtmodels.metrics import EpochMeter

    model, config = load_trained_model(run_dir)
    dev = _device(device)
    model.to(dev)
    depth = trained_depth(config["model_config"])
    loader = _test_loader(config)
    out = []
    with torch.no_grad():
        for test_depth in depth_grid(depth, factors):
            model.set_depth(test_depth)
            meter = EpochMeter()
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)  # (B, C, H, W), (B,)
                logits = model(x).float()  # (B, num_classes)
                meter.update(float(F.cross_entropy(logits, y, reduction="sum")),
                             int((logits.argmax(1) == y).sum()), len(y), model.core_stats())
            stats = meter.reduce()
            row = {"train_depth": depth, "test_depth": test_depth, "factor": test_depth / depth,
                   "test_acc": stats.pop("acc"), "test_loss": stats.pop("loss")}
            stats.pop("count", None)
            row.update(stats)
            out.append(row)
    model.set_depth(depth)
    return out


def extrapolate_sweep(sweep_dir: str, factors: Sequence[float], threads: int | None = None,
                      device: str | None = None, echo=print) -> int:
    """Evaluate every eligible finished run of a sweep at the factors' depths (missing rows only).

    Args:
        sweep_dir: the sweep directory (``results.csv``, ``runs/``).
        factors: test depth / trained depth ratios.
        threads: torch threads for the evaluation (default: torch's).
        device: where to evaluate (None / ``"auto"``: CUDA when available).
        echo: progress output.

    Returns:
        The number of rows added.

    Example (a run in ``results.csv`` whose ``runs/<run_id>`` was not copied: skipped, said so):
        >>> import tempfile
        >>> from benchmarks.results_io import write_rows
        >>> sweep_dir = tempfile.mkdtemp()
        >>> write_rows(os.path.join(sweep_dir, "results.csv"),
        ...            [{"run_id": "wt_d2_s0", "core": "unrolled", "status": "ok"}])
        >>> extrapolate_sweep(sweep_dir, (0.5, 1.0))
          skipped 1 run(s) without runs/<run_id>/checkpoint.pt (e.g. wt_d2_s0)
        0
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    path = os.path.join(sweep_dir, EXTRAPOLATION)
    done = finished_ids(path, KEY)
    added = 0
    no_checkpoint = []
    results = os.path.join(sweep_dir, "results.csv")
    rows = read_rows(results)
    check_unique(results, rows)  # a run on two rows (files merged by hand): name both lines
    for row in rows:
        # an empty status (a hand-written row) is a clean run, as in benchmarks.aggregate
        if row.get("core") not in CORES_WITH_DEPTH or row.get("status") not in (None, "ok"):
            continue
        if row.get("run_id") is None:  # a hand-written row: no run directory to find
            no_checkpoint.append("a row without run_id")
            continue
        run_dir = os.path.join(sweep_dir, "runs", str(row["run_id"]))
        if not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            no_checkpoint.append(str(row["run_id"]))
            continue
        depth = run_trained_depth(run_dir)
        wanted = [d for d in depth_grid(depth, factors) if f"{row['run_id']}@{d}" not in done]
        if not wanted:
            continue
        base = {k: row.get(k) for k in ("run_id", "label", "config_id", "model", "core", "width",
                                        "mask_k", "mask_density", "seed", "dataset", "epochs",
                                        "train_size")}
        new = [{KEY: f"{row['run_id']}@{r['test_depth']}", **base, **r}
               for r in evaluate_depths(run_dir, [d / depth for d in wanted], device)]
        added += append_rows(path, new, KEY)
        echo(f"  extrapolated {row['run_id']}: " + ", ".join(
            f"depth {r['test_depth']}: {100 * r['test_acc']:.1f}%" for r in new))
    if no_checkpoint:  # e.g. results.csv copied without runs/: say why nothing was evaluated
        echo(f"  skipped {len(no_checkpoint)} run(s) without runs/<run_id>/checkpoint.pt "
             f"(e.g. {no_checkpoint[0]})")
    return added


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.extrapolate DIR --factors 0.5,1,2``; returns the exit status.

    Example (bad factors: one line on stderr, exit status 2):
        >>> main(["results/quick", "--factors", "0,1"])
        2
    """
    parser = DashValueParser(prog="python -m benchmarks.extrapolate",
                                     description="Test-time depth extrapolation of a sweep.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--factors", default="0.5,1,1.5,2",
                        help="test depth / trained depth ratios, comma-separated")
    parser.add_argument("--threads", type=int)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    args = parser.parse_args(argv)
    try:
        factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError:
        factors = []
    if not factors or any(not (0 < f < math.inf) for f in factors):
        print(f"{parser.prog}: error: factors: expected positive numbers like 0.5,1,2, got "
              f"{args.factors!r}", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(args.sweep_dir, "results.csv")):
        print(f"{parser.prog}: error: sweep_dir: no results.csv in {args.sweep_dir!r}",
              file=sys.stderr)
        return 2
    if message := threads_error(args.threads):  # --threads 1000000 was a segfault
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    try:
        added = extrapolate_sweep(args.sweep_dir, factors, threads=args.threads)
    except ValueError as err:  # a damaged results file, run config or checkpoint
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    # say so when nothing was added (every depth already there, or no run with a checkpoint)
    if added:
        print(f"{added} row(s) added to {os.path.join(args.sweep_dir, EXTRAPOLATION)}; redraw "
              f"the panel with python -m benchmarks.plot {args.sweep_dir}")
    else:
        print(f"no row added to {os.path.join(args.sweep_dir, EXTRAPOLATION)} (every depth "
              "already there, or no run with a checkpoint)")
    return 0


if __name__ == "__main__":
    exit_with(main)
