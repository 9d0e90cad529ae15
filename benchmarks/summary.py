"""The summary table of a sweep: one line per configuration, averaged over seeds.

``seeds`` counts every run of a configuration; the means are over its clean runs only, and the
columns ``runs stopped`` (stopped on non-finite losses, or ended with one), ``runs failed`` (a
run directory without a results row), ``runs with skipped steps`` (kept in the means) and
``runs without accuracy`` (no finite ``test_acc``: hand-written rows) show where any run has
them (see :func:`benchmarks.aggregate.aggregate`).

Written as ``summary.csv`` (raw means and sample standard deviations, n - 1) and ``summary.md``
(rounded, ``mean ± std``, with a line saying which std), and printed at the end of
``python -m benchmarks.run``.

Example:
    >>> rows = [{"config_id": "a", "label": "WT", "depth": 2, "width": 8, "seed": s,
    ...          "test_acc": acc, "params": 100} for s, acc in ((0, 0.80), (1, 0.90))]
    >>> print(to_markdown(summary_table(rows)).splitlines()[2])
    | WT | 2 | 8 | 2 | 85.0 ± 7.1 | 100 |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.aggregate import GROUP_COLUMNS, aggregate

#: (column title, group key, kind) of the table, in order; a column shows when any row has it
COLUMNS = (
    ("label", "label", "text"),
    ("model", "model", "hidden"),
    ("dataset", "dataset", "text"),  # shown, as every text column, only where it varies
    ("depth", "depth", "text"),
    ("width", "width", "text"),
    ("masks", "mask_k", "text"),
    ("density", "mask_density", "text"),
    ("solver", "f_solver", "text"),
    ("grad", "grad", "text"),
    ("epochs", "epochs", "text"),
    ("train size", "train_size", "text"),
    ("seeds", "n", "text"),
    ("runs stopped", "n_stopped", "nonzero"),
    ("runs failed", "n_failed", "nonzero"),
    ("runs with skipped steps", "n_skipped", "nonzero"),
    ("runs without accuracy", "n_noacc", "nonzero"),
    ("test acc %", "test_acc", "pct"),
    ("best acc %", "best_test_acc", "pct_mean"),
    ("params", "params", "int"),
    ("train time s", "train_time_s", "num"),
    ("epoch s", "epoch_time_s", "num"),
    ("img/s", "images_per_s", "int"),
    ("peak MiB", "peak_mem_mb", "int"),  # peak_mem_mb is in MiB (2**20 bytes)
    ("cell evals", "cell_evals", "num"),
    ("solver steps", "nstep", "num"),
    ("rel residual", "rel_residual", "sci"),
    ("converged %", "converged", "pct_mean"),
    ("diverged %", "diverged", "pct_mean"),
    ("skipped steps", "skipped_steps", "num"),
)


def _only_for(core_values: set, key: str) -> bool:
    """Solver columns matter only when a DEQ is in the table."""
    return key not in ("f_solver", "grad") or "deq" in core_values


def summary_table(rows: Sequence[dict]) -> list[dict]:
    """Aggregate rows into the summary's entries (see :func:`benchmarks.aggregate.aggregate`).

    Args:
        rows: results rows.

    Returns:
        One dict per configuration, sorted by label (first appearance), depth, width, masks.

    Example:
        >>> summary_table([{"label": "DEQ", "test_acc": 0.5}])[0]["test_acc_mean"]
        0.5
    """
    groups = aggregate(rows)
    order = {}
    for g in groups:
        order.setdefault(g.get("label"), len(order))

    def key(g):
        return (order[g.get("label")], *(g.get(k) if isinstance(g.get(k), (int, float)) else -1
                                         for k in ("depth", "width", "mask_k", "mask_density")))

    return sorted(groups, key=key)


def _visible(table: Sequence[dict]) -> list[tuple[str, str, str]]:
    cores = {g.get("core") for g in table}
    shown = []
    for title, key, kind in COLUMNS:
        if kind == "hidden" or not _only_for(cores, key):
            continue
        if kind == "nonzero":
            if any(g.get(key) for g in table):
                shown.append((title, key, "text"))
            continue
        if kind == "text":
            present = any(g.get(key) is not None for g in table)
            varies = len({g.get(key) for g in table}) > 1 or key in ("label", "n", "depth", "width")
            if present and varies:
                shown.append((title, key, kind))
        elif any(math.isfinite(g.get(f"{key}_mean", math.nan)) for g in table):
            shown.append((title, key, kind))
    at = next((i for i, c in enumerate(shown) if c[1] == "n"), 0)  # settings, then "seeds"
    return shown[:at] + _telling_apart(table, [key for _, key, _ in shown[:at]]) + shown[at:]


def _telling_apart(table: Sequence[dict], keys: Sequence[str]) -> list[tuple[str, str, str]]:
    """Columns for the settings (of :data:`GROUP_COLUMNS`) that differ between configurations
    whose shown settings ``keys`` are identical (e.g. two learning rates of one label), which
    would otherwise read as one configuration listed twice."""
    alike: dict[tuple, list[dict]] = {}
    for g in table:
        alike.setdefault(tuple(_cell(g, key, "text") for key in keys), []).append(g)
    extra = []
    for members in alike.values():
        extra += [key for key in GROUP_COLUMNS if key not in keys and key not in extra
                  and len({repr(g.get(key)) for g in members}) > 1]
    # a setting outside GROUP_COLUMNS (e.g. capaboost's LoRA rank, jac_reg_weight) is not in
    # the entries: configurations still alike are told apart by their config_id
    seen = [tuple(_cell(g, key, "text") for key in [*keys, *extra]) for g in table]
    if len(set(seen)) < len(seen) and any(g.get("config_id") is not None for g in table):
        extra.append("config_id")
    titles = {key: title for title, key, _ in COLUMNS}
    titles["config_id"] = "config"
    return [(titles.get(key, key.replace("_", " ")), key, "text") for key in extra]


def _cell(g: dict, key: str, kind: str) -> str:
    if kind == "text":
        value = g.get(key)
        if key == "depth" and g.get("core") == "deq":
            return "–"  # a DEQ has a solver budget, not a depth
        if key in ("f_solver", "grad") and g.get("core") not in (None, "deq"):
            return ""  # other cores carry the defaults of these settings but never use them
        return "" if value is None else str(value)
    mean, std = g.get(f"{key}_mean", math.nan), g.get(f"{key}_std", math.nan)
    if not math.isfinite(mean):
        return ""
    if kind == "pct":
        if g.get(f"{key}_count", g.get("n", 1)) > 1:
            return f"{100 * mean:.1f} ± {100 * std:.1f}"
        return f"{100 * mean:.1f}"
    if kind == "pct_mean":
        return f"{100 * mean:.1f}"
    if kind == "int":
        return f"{mean:.0f}"
    if kind == "sci":
        return f"{mean:.1e}"
    return f"{mean:.3g}" if abs(mean) < 100 else f"{mean:.0f}"


def to_markdown(table: Sequence[dict]) -> str:
    """The table as GitHub Markdown, showing only columns with data (and text columns that vary).

    Example:
        >>> print(to_markdown([{"label": "WT", "n": 1, "test_acc_mean": 0.5, "test_acc_std": 0.0}]))
        | label | seeds | test acc % |
        | --- | --- | --- |
        | WT | 1 | 50.0 |
    """
    if not table:
        return "(no finished runs)"
    columns = _visible(table)
    lines = ["| " + " | ".join(t for t, _, _ in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for g in table:
        lines.append("| " + " | ".join(_cell(g, k, kind) for _, k, kind in columns) + " |")
    return "\n".join(lines)


def to_csv_rows(table: Sequence[dict]) -> list[dict]:
    """The table's entries as flat CSV rows (means, stds and counts; the seed list joined).

    A sample standard deviation (n - 1) of fewer than two values is undefined: its ``_std``
    cell is left empty (not 0, which would read as a measured zero spread).

    Example:
        >>> to_csv_rows([{"label": "WT", "seeds": [0, 1]}])[0]["seeds"]
        '0 1'
        >>> to_csv_rows([{"test_acc_mean": 0.5, "test_acc_std": 0.0, "test_acc_count": 1}])[0][
        ...     "test_acc_std"]
        nan
    """
    out = []
    for g in table:
        row = dict(g)
        row["seeds"] = " ".join(str(s) for s in g.get("seeds", []))
        for key in g:
            if key.endswith("_std") and g.get(key[:-4] + "_count", 2) < 2:
                row[key] = math.nan  # written as an empty cell
        out.append(row)
    return out
