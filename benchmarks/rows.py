"""Turn a finished run directory into one ``results.csv`` row.

A run directory (written by ``python -m wtmodels.train`` or a custom runner, plus the harness's
``spec.json`` and ``harness.json``) is read as follows:

=====================  ====================================================================
file                   row columns
=====================  ====================================================================
``spec.json``          ``run_id``, ``label``, and every argument the sweep gave the run
``config.json``        the resolved model fields (``core``, ``depth``, ``width``, masks, solver);
                       ``resumed_with``: what a resuming process ran with unlike the first
                       (``git_sha``, ``torch_version``, ``device``, ``threads``), if anything
``metrics.jsonl``      ``test_acc`` (last epoch), ``best_test_acc`` (max), final losses,
                       ``epoch_time_s`` / ``images_per_s`` (medians over epochs),
                       ``train_time_s`` (sum), ``peak_mem_mb`` (max), ``skipped_steps`` (sum),
                       solver statistics of the last epoch (``nstep``, ``rel_residual``,
                       ``converged``, ``diverged``, ``nfe``, ``cell_evals``), and
                       ``rel_residual_max`` / ``diverged_max`` (max over epochs)
``model_info.json``    ``params``, ``nonzero_params_per_iter``, ``cell_evals``, ``flops_per_image``
``done.json``          final metrics (fill what ``metrics.jsonl`` lacks; custom runners)
``stopped.json``       ``skipped_steps`` of the epoch a stopped run did not finish (added)
``harness.json``       ``status`` (``ok``, or ``diverged`` when the trainer stopped on
                       non-finite losses; ``nonfinite`` when it finished but its last epoch's
                       train or test loss was not finite), ``wall_s`` and ``cpu_s`` (wall and
                       CPU seconds of the run's process; a resumed run: of the last process only),
                       ``threads``, ``load_average_1min``. Without it (the sweep was killed
                       between the run's end and this file) ``status`` comes from
                       ``stopped.json``'s presence and the timings stay empty.
=====================  ====================================================================

plus the sweep's provenance (``git_sha`` with ``-dirty`` when the tree had changes, the
harness's where the run's ``config.json`` records none; ``git_sha`` / ``torch_version`` /
``device`` / ``threads`` as the run's ``config.json`` recorded them, its first process's) and
``date``.

Example:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> json.dump({"run_id": "r", "label": "WT", "config": {"model": "wt_s", "seed": 0}},
    ...           open(os.path.join(d, "spec.json"), "w"))
    >>> with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    ...     _ = f.write(json.dumps({"epoch": 1, "test_acc": 0.8, "epoch_time_s": 2.0}) + "\\n")
    ...     _ = f.write(json.dumps({"epoch": 2, "test_acc": 0.7, "epoch_time_s": 4.0}) + "\\n")
    >>> row = assemble_row(d)
    >>> row["test_acc"], row["best_test_acc"], row["train_time_s"]
    (0.7, 0.8, 6.0)
"""

from __future__ import annotations

import json
import math
import os
import statistics

from benchmarks.aggregate import FAILED
from benchmarks.presets import config_id_for

#: columns first in every results.csv, in this order (DESIGN.md's list, then the rest)
LEADING_COLUMNS = (
    "run_id", "label", "config_id", "status", "model", "dataset", "core", "depth", "width",
    "mask_k", "mask_density", "seed", "epochs", "test_acc", "best_test_acc", "train_acc",
    "train_loss", "test_loss",
    "epoch_time_s", "train_time_s", "images_per_s", "peak_mem_mb", "params",
    "nonzero_params_per_iter", "cell_evals", "flops_per_image", "nstep", "rel_residual",
    "rel_residual_max", "converged", "diverged", "diverged_max", "skipped_steps", "nfe",
    "git_sha", "torch_version", "device", "threads", "cpu_isa", "wall_s", "cpu_s", "date",
)

#: fields of the run's resolved config copied into the row when present
CONFIG_COLUMNS = (
    "model", "dataset", "core", "depth", "width", "stages", "mask_k", "mask_density", "mask_kind",
    "mask_schedule", "f_solver", "f_max_iter", "f_tol", "b_solver", "grad", "ode_method",
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "train_size",
    "test_size", "image_size", "device", "seed",
)

_LAST = ("test_acc", "train_acc", "train_loss", "test_loss", "nstep", "rel_residual",
         "converged", "diverged", "nfe", "cell_evals")
_MEDIAN = ("epoch_time_s", "images_per_s")
#: columns only the runs of that core read (blank in the others' rows, not their defaults)
_CORE_COLUMNS = {"deq": ("f_solver", "f_max_iter", "f_tol", "b_solver", "grad"),
                 "ode": ("ode_method",)}
_MODEL_INFO = ("params", "nonzero_params_per_iter", "cell_evals", "flops_per_image")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_metrics(run_dir: str) -> list[dict]:
    """The epochs of ``run_dir/metrics.jsonl`` (a torn last line, if any, is ignored).

    Example:
        >>> read_metrics("/nonexistent")
        []
    """
    rows = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
    except FileNotFoundError:
        pass
    return rows


def _flatten(config: dict) -> dict:
    """``{"model": {"depth": 4}, "epochs": 2} -> {"depth": 4, "epochs": 2}`` (one level)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, dict)})
        else:
            flat[key] = value
    return flat


def _numbers(epochs: list[dict], key: str) -> list[float]:
    values = []
    for e in epochs:
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values.append(float(v))
    return values


def summarise_metrics(epochs: list[dict]) -> dict:
    """Per-run summary of the per-epoch metrics (see the module table).

    Example:
        >>> s = summarise_metrics([{"test_acc": 0.5, "peak_mem_mb": 9}, {"test_acc": 0.6}])
        >>> s["test_acc"], s["best_test_acc"], s["peak_mem_mb"]
        (0.6, 0.6, 9.0)
    """
    out: dict = {}
    if not epochs:
        return out
    last = epochs[-1]
    for key in _LAST:
        if key in last:
            out[key] = last[key]
    accs = _numbers(epochs, "test_acc")
    if accs:
        out["best_test_acc"] = max(accs)
    for key in _MEDIAN:
        values = _numbers(epochs, key)
        if values:
            out[key] = statistics.median(values)
    times = _numbers(epochs, "epoch_time_s")
    if times:
        out["train_time_s"] = sum(times)
    for key, source in (("peak_mem_mb", "peak_mem_mb"), ("rel_residual_max", "rel_residual_max"),
                        ("diverged_max", "diverged")):
        values = [v for v in _numbers(epochs, source) if not math.isnan(v)]
        if values:
            out[key] = max(values)
    skipped = _numbers(epochs, "skipped_steps")
    if skipped:
        out["skipped_steps"] = int(sum(skipped))
    out["epochs_done"] = len(epochs)
    return out


#: what a resumed process may change that the row's provenance columns describe
_RESUME_ENV = ("git_sha", "torch_version", "device", "threads", "world_size", "cpu_isa")


def _resumed_with(env: dict, resumes) -> str | None:
    """What the processes that resumed a run ran with unlike its first (``config.json``'s
    ``resumes``), e.g. ``"epoch 3-: threads 2"``; None when nothing differed.

    Example:
        >>> _resumed_with({"threads": 1, "device": "cpu"},
        ...               [{"from_epoch": 2, "env": {"threads": 2, "device": "cpu"}}])
        'epoch 3-: threads 2'
    """
    parts = []
    for resume in resumes if isinstance(resumes, list) else []:
        other = resume.get("env") if isinstance(resume, dict) else None
        if not isinstance(other, dict):
            continue
        # a key the first process did not record (cpu_isa before it was recorded) is unknown,
        # not different
        diff = [f"{k} {other[k]}" for k in _RESUME_ENV
                if k in other and k in env and other[k] != env[k]]
        if diff:
            parts.append(f"epoch {int(resume.get('from_epoch') or 0) + 1}-: {', '.join(diff)}")
    return "; ".join(parts) or None


def assemble_row(run_dir: str, provenance: dict | None = None) -> dict:
    """One results row for a finished run directory.

    Args:
        run_dir: the run's directory (with ``spec.json``; see the module table).
        provenance: sweep-wide columns (``git_sha``, ``torch_version``, ...) to add.

    Returns:
        The row: every one of :data:`LEADING_COLUMNS` first (None where the run has no value,
        e.g. no accuracy for a run stopped before its first epoch ended), then the rest.

    Example:
        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> json.dump({"run_id": "r", "label": "DEQ", "config": {"seed": 1}},
        ...           open(os.path.join(d, "spec.json"), "w"))
        >>> json.dump({"test_acc": 0.9}, open(os.path.join(d, "done.json"), "w"))
        >>> assemble_row(d, {"git_sha": "abc"})["git_sha"]
        'abc'
    """
    spec = _read_json(os.path.join(run_dir, "spec.json")) or {}
    config = _flatten(_read_json(os.path.join(run_dir, "config.json")) or {})
    info = _read_json(os.path.join(run_dir, "model_info.json")) or {}
    done = _read_json(os.path.join(run_dir, "done.json")) or {}
    harness = _read_json(os.path.join(run_dir, "harness.json")) or {}

    row: dict = {"run_id": spec.get("run_id", os.path.basename(os.path.normpath(run_dir))),
                 "label": spec.get("label"),
                 "config_id": config_id_for(spec.get("label"), spec.get("config") or {})}
    row.update({k: v for k, v in (spec.get("config") or {}).items() if not isinstance(v, dict)})
    row.update({k: config[k] for k in CONFIG_COLUMNS if k in config})
    run_config = _read_json(os.path.join(run_dir, "config.json")) or {}
    env = run_config.get("env") or {}
    row.update(provenance or {})
    row.update({k: env[k] for k in ("device", "threads", "torch_version", "cpu_isa")
                if k in env})
    if env.get("git_sha"):  # the code the run trained at (its first process), not the code
        # of the sweep recording it: a rerun records a run finished before a kill, maybe
        # after the code moved on; a resumed run's later processes: resumed_with
        row["git_sha"] = row["run_git_sha"] = env["git_sha"]
    changed = _resumed_with(env, run_config.get("resumes"))
    if changed:
        row["resumed_with"] = changed
    if row.get("mask_k") == 0:  # no mask: the density setting means nothing
        row["mask_density"] = None
    for core, keys in _CORE_COLUMNS.items():  # a core's settings mean nothing to the others
        if row.get("core") not in (None, core):
            row.update(dict.fromkeys(keys))
    row.update({k: info[k] for k in _MODEL_INFO if k in info})
    summary = summarise_metrics(read_metrics(run_dir))
    for key, value in _flatten(done).items():  # done.json fills what the epochs lack
        if key not in summary and key not in row and key not in ("lr", "epoch", "steps"):
            summary[key] = value
    if "best_test_acc" not in summary and "test_acc" in summary:
        summary["best_test_acc"] = summary["test_acc"]
    row.update(summary)
    stopped = _read_json(os.path.join(run_dir, "stopped.json")) or {}
    if isinstance(stopped.get("skipped_steps"), int):  # the unfinished epoch's, not in metrics
        row["skipped_steps"] = (row.get("skipped_steps") or 0) + stopped["skipped_steps"]
    row.update(harness)
    if "threads" in env:  # what the run's first process used (harness.json: the last one's;
        row["threads"] = env["threads"]  # later processes that differed: resumed_with)
    if row.get("status") is None:  # killed after the run finished, before harness.json
        stopped = os.path.exists(os.path.join(run_dir, "stopped.json"))
        row["status"] = "diverged" if stopped else "ok"
    epochs = read_metrics(run_dir)
    if row["status"] == "ok" and epochs and any(
            key in epochs[-1] and epochs[-1][key] is None for key in ("train_loss", "test_loss")):
        row["status"] = "nonfinite"  # finished, but its last epoch's loss was not finite
    ordered = {k: row.get(k) for k in LEADING_COLUMNS}  # every leading column, maybe empty
    ordered.update({k: v for k, v in row.items() if k not in ordered})
    return ordered


def failed_rows(sweep_dir: str, recorded: set | frozenset = frozenset()) -> list[dict]:
    """Rows for the runs of a sweep that have a directory but no results row and no
    ``done.json``: crashed or killed runs (or, during a sweep, runs still training). Each holds
    ``run_id``, ``label``, ``config_id``, the sweep's arguments and ``status = "failed"``, so
    tables and plots can count them beside the configuration's finished seeds.

    Args:
        sweep_dir: the sweep directory (its ``runs/<run_id>/spec.json`` are read).
        recorded: the ``run_id`` values present in ``results.csv``.

    Example:
        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(d, "runs", "r1"))
        >>> json.dump({"run_id": "r1", "label": "WT", "config": {"depth": 2, "seed": 0}},
        ...           open(os.path.join(d, "runs", "r1", "spec.json"), "w"))
        >>> [(r["run_id"], r["depth"], r["status"]) for r in failed_rows(d)]
        [('r1', 2, 'failed')]
        >>> failed_rows(d, {"r1"})
        []
    """
    runs = os.path.join(sweep_dir, "runs")
    out = []
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else ():
        run_dir = os.path.join(runs, name)
        if name in recorded or os.path.exists(os.path.join(run_dir, "done.json")):
            continue
        try:
            spec = _read_json(os.path.join(run_dir, "spec.json"))
        except (OSError, ValueError):  # a damaged spec: not a run this table can place
            continue
        if not isinstance(spec, dict) or spec.get("run_id", name) in recorded:
            continue
        config = spec.get("config") or {}
        row = {"run_id": spec.get("run_id", name), "label": spec.get("label"),
               "config_id": config_id_for(spec.get("label"), config), "status": FAILED}
        row.update({k: v for k, v in config.items() if not isinstance(v, dict)})
        out.append(row)
    return out
