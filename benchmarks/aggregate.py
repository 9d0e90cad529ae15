"""Average results rows over seeds: one entry per configuration with mean, std and count.

Rows that share a ``config_id`` (the same label and arguments, different seed) form a group.
Rows written without a ``config_id`` are grouped by :data:`GROUP_COLUMNS` instead. Means are
over the group's clean runs only: a run the trainer stopped on non-finite losses, or that ended
with one (:data:`UNSTABLE`), and a run that failed without a row (:data:`FAILED`, see
:func:`benchmarks.rows.failed_rows`) are counted (``n_stopped``, ``n_failed``), not averaged.
A clean run without a finite ``test_acc`` (a hand-written or foreign row: missing, NaN, text)
is counted too (``n_noacc``), so a mean over fewer seeds than the group holds is flagged.

Example:
    >>> rows = [{"config_id": "a", "label": "WT", "depth": 2, "test_acc": 0.8},
    ...         {"config_id": "a", "label": "WT", "depth": 2, "test_acc": 0.9},
    ...         {"config_id": "b", "label": "WT", "depth": 4, "test_acc": 0.7}]
    >>> groups = aggregate(rows, ["test_acc"])
    >>> [(g["depth"], g["n"], round(g["test_acc_mean"], 2)) for g in groups]
    [(2, 2, 0.85), (4, 1, 0.7)]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

#: run statuses that mean the run's numbers are not a clean result: stopped on non-finite
#: losses, or finished with a non-finite loss in its last epoch
UNSTABLE = ("diverged", "nonfinite")

#: status of a run that has a directory but no results row (crashed, killed, or still running)
FAILED = "failed"

#: every status a row may hold (or none: a hand-written row counts as clean)
STATUSES = ("ok", *UNSTABLE, FAILED)

#: what defines a configuration when rows carry no ``config_id``
GROUP_COLUMNS = ("label", "model", "dataset", "core", "depth", "width", "stages", "mask_k",
                 "mask_density", "mask_kind", "mask_schedule", "f_solver", "f_max_iter", "f_tol",
                 "b_solver", "b_max_iter", "b_tol", "grad", "ode_method", "epochs", "batch_size",
                 "optimizer", "lr", "weight_decay", "schedule", "train_size", "test_size",
                 "image_size")

#: metrics averaged by default
METRICS = ("test_acc", "best_test_acc", "train_acc", "epoch_time_s", "train_time_s",
           "images_per_s", "peak_mem_mb", "params", "nonzero_params_per_iter", "cell_evals",
           "flops_per_image", "nstep", "rel_residual", "rel_residual_max", "converged",
           "diverged", "diverged_max", "skipped_steps", "nfe", "wall_s", "cpu_s")


def number(value) -> float | None:
    """``value`` as a finite-or-nan float, or None when it is not a number.

    Example:
        >>> number(3), number("x"), number(None), number(True)
        (3.0, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values.

    Example:
        >>> mean_std([1.0, 3.0, float("nan")])
        (2.0, 1.4142135623730951, 2)
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), std, len(finite)


def config_key(row: dict) -> tuple:
    """The grouping key of a row: its ``config_id``, else its :data:`GROUP_COLUMNS` values.

    Example:
        >>> config_key({"config_id": "x", "seed": 3})
        ('x',)
    """
    if row.get("config_id") is not None:
        return (row["config_id"],)
    return tuple(row.get(c) for c in GROUP_COLUMNS)


def clean(row: dict) -> bool:
    """Whether a run's numbers count in the means: it finished, and its losses stayed finite.

    Example:
        >>> clean({"status": "ok"}), clean({}), clean({"status": "diverged"}), clean(
        ...     {"status": FAILED})
        (True, True, False, False)
    """
    return row.get("status") not in (*UNSTABLE, FAILED)


def skipped_steps(row: dict) -> bool:
    """Whether a run skipped optimiser steps on non-finite losses (and still finished).

    Example:
        >>> skipped_steps({"skipped_steps": 3}), skipped_steps({"skipped_steps": 0})
        (True, False)
    """
    value = number(row.get("skipped_steps"))
    return value is not None and value > 0


def check_statuses(rows: Iterable[dict]) -> None:
    """``ValueError`` naming the first row whose ``status`` is not one of :data:`STATUSES` (or
    empty): a hand-typed ``"crashed"`` is neither averaged in as a clean seed nor dropped unseen.

    Example:
        >>> check_statuses([{"run_id": "a", "status": "ok"}, {"run_id": "b"}])
        >>> check_statuses([{"run_id": "a", "status": "okk"}])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: status: 'okk' (run 'a') is not one of ok, ...
    """
    for row in rows:
        if row.get("status") not in (None, *STATUSES):
            raise ValueError(f"status: {row['status']!r} (run {row.get('run_id')!r}) is not one "
                             f"of {', '.join(STATUSES)} (or empty)")


def aggregate(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
    """One dict per configuration: its config columns, ``n`` (runs, whatever their end),
    ``n_stopped`` (runs the trainer stopped on non-finite losses, or that ended with one:
    :data:`UNSTABLE`), ``n_failed`` (:data:`FAILED` runs), ``n_skipped`` (clean runs that
    skipped steps), ``n_noacc`` (clean runs without a finite ``test_acc``), ``seeds``, and
    for each metric ``<m>_mean``, ``<m>_std`` and ``<m>_count``
    (over the clean runs' finite values; nan when there are none).

    Raises:
        ValueError: a row whose ``status`` is not one of :data:`STATUSES` (or empty).

    Args:
        rows: results rows.
        metrics: the columns to average.

    Returns:
        Groups in the order their first row appears.

    Example:
        >>> g = aggregate([{"label": "DEQ", "test_acc": 0.5, "seed": 0},
        ...                {"label": "DEQ", "test_acc": 0.1, "seed": 1, "status": "diverged"}])[0]
        >>> g["n"], g["n_stopped"], g["test_acc_mean"]
        (2, 1, 0.5)
    """
    check_statuses(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(config_key(row), []).append(row)
    out = []
    for members in groups.values():
        # a failed run's columns come from its spec only: describe the group by a finished one
        first = next((m for m in members if m.get("status") != FAILED), members[0])
        entry = {c: first.get(c) for c in GROUP_COLUMNS if c in first}
        if "config_id" in first:
            entry["config_id"] = first["config_id"]
        entry["n"] = len(members)
        entry["n_stopped"] = sum(m.get("status") in UNSTABLE for m in members)
        entry["n_failed"] = sum(m.get("status") == FAILED for m in members)
        kept = [m for m in members if clean(m)]
        entry["n_skipped"] = sum(skipped_steps(m) for m in kept)
        entry["n_noacc"] = sum(not _finite(m.get("test_acc")) for m in kept)
        entry["seeds"] = sorted((m.get("seed") for m in members if m.get("seed") is not None),
                                key=_seed_order)
        for metric in metrics:
            mean, std, count = mean_std(number(m.get(metric)) for m in kept)
            entry[f"{metric}_mean"] = mean
            entry[f"{metric}_std"] = std
            entry[f"{metric}_count"] = count
        out.append(entry)
    return out


def _seed_order(seed) -> tuple:
    """Numbers first, in order, then any text (a hand-written ``s1``): no ``int < str`` error."""
    value = number(seed)
    return (0, value, "") if value is not None else (1, 0.0, str(seed))


def _finite(value) -> bool:
    value = number(value)
    return value is not None and math.isfinite(value)


def flags(group: dict) -> str:
    """What went wrong in a configuration's runs, as ``k/n`` counts (``""`` when nothing).

    Example:
        >>> flags({"n": 3, "n_stopped": 1, "n_failed": 0, "n_skipped": 2})
        '1/3 diverged, 2/3 skipped steps'
        >>> flags({"n": 2, "n_noacc": 1})
        '1/2 without accuracy'
    """
    n = group.get("n", 0)
    return ", ".join(f"{group[key]}/{n} {what}" for key, what in (
        ("n_stopped", "diverged"), ("n_failed", "failed"), ("n_skipped", "skipped steps"),
        ("n_noacc", "without accuracy")) if group.get(key))


def has(groups: Sequence[dict], metric: str) -> bool:
    """Whether any group has a finite mean of ``metric``.

    Example:
        >>> has([{"x_mean": float("nan")}], "x"), has([{"x_mean": 1.0}], "x")
        (False, True)
    """
    return any(math.isfinite(g.get(f"{metric}_mean", math.nan)) for g in groups)
