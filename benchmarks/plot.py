"""Guideline plots and the summary table of a sweep: ``python -m benchmarks.plot DIR``.

Reads ``DIR/results.csv`` (and ``DIR/extrapolation.csv`` when present) and writes
``DIR/plots/<panel>.png``, ``DIR/summary.csv`` and ``DIR/summary.md``. Each panel function
takes the rows and returns a matplotlib ``Figure``, or ``None`` when the rows cannot support it
(for example no sweep over width): only supported panels are drawn. Points are means over the
clean runs' seeds with error bars of one sample standard deviation (n - 1); a point some of
whose runs diverged, failed, skipped steps or have no finite accuracy carries a red cross and
its ``k/n`` counts (all but the skipped-step runs are left out of the mean), and configurations
with no clean run are named under the panels. The notebook ``notebooks/guidelines.ipynb``
calls the same functions.

=========================  =================================================================
panel                      drawn when
=========================  =================================================================
``accuracy_vs_depth``      some label has two depths or more (a line per width)
``accuracy_vs_width``      some label has two widths or more (a line per depth)
``masks``                  distinct masks and one shared mask or none at some depth (a
                           dot per arm and depth, a panel per mask density, titled with it;
                           ``--mask-density D`` keeps one), three mask counts or two
                           densities at one depth and width (curves)
``capacity``               two labels or more with parameter counts (tied, tied + masks,
                           untied: the capacity frontier), and FLOPs per image when known
``time_memory``            training time for two labels or more (WT vs DEQ), peak memory
``stability``              solver residuals, divergence / skipped steps, seed spread
``extrapolation``          ``extrapolation.csv`` exists (test-time depth / training depth)
=========================  =================================================================

Example:
    >>> rows = [{"label": "WT", "config_id": f"c{d}", "depth": d, "width": 8, "seed": s,
    ...          "test_acc": 0.7 + 0.02 * d + 0.01 * s} for d in (1, 2, 4) for s in (0, 1)]
    >>> fig = plot_accuracy_vs_depth(rows)
    >>> fig.axes[0].get_xlabel()
    'depth (cell applications)'
    >>> plot_accuracy_vs_width(rows) is None      # one width only: nothing to draw
    True
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence

from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy

from benchmarks.aggregate import (
    FAILED,
    GROUP_COLUMNS,
    UNSTABLE,
    aggregate,
    config_key,
    flags,
    has,
    mean_std,
    number,
)
from benchmarks.results_io import SETTING, check_unique, read_rows, setting_note, write_rows
from benchmarks.rows import failed_rows
from benchmarks.summary import summary_table, to_csv_rows, to_markdown
from wtmodels.atomic import atomic_write, atomic_write_text
from wtmodels.cli import DashValueParser, exit_with

RESULTS = "results.csv"
EXTRAPOLATION = "extrapolation.csv"
PLOTS = "plots"

#: Okabe & Ito's colour-blind-safe palette (Color Universal Design), by name
OKABE_ITO = {"blue": "#0072B2", "orange": "#E69F00", "sky blue": "#56B4E9",
             "bluish green": "#009E73", "vermillion": "#D55E00", "reddish purple": "#CC79A7",
             "yellow": "#F0E442", "black": "#000000"}
#: fixed colours of the presets' labels, the model families: the same in every figure
LABEL_COLORS = {"WT": OKABE_ITO["blue"], "WT + distinct masks": OKABE_ITO["bluish green"],
                "WT + shared mask": OKABE_ITO["sky blue"], "untied": OKABE_ITO["vermillion"],
                "DEQ": OKABE_ITO["orange"], "ODE": OKABE_ITO["reddish purple"]}
#: fixed markers of the families (told apart in grey print and by colour-blind readers too)
LABEL_MARKERS = {"WT": "o", "WT + distinct masks": "^", "WT + shared mask": "s", "untied": "D",
                 "DEQ": "v", "ODE": "P"}
#: colours of labels outside every family (Paul Tol's colour-blind-safe "muted" set)
_SPARE_COLORS = ("#332288", "#882255", "#44AA99", "#999933", "#AA4499", "#117733", "#661100",
                 "#888888")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: markers of a family's variants and of labels outside every family, after the family's own
_VARIANT_MARKERS = ("X", "*", "<", ">", "p", "h", "d", "8")
_LINESTYLES = ("-", "--", ":", "-.")
#: how a family's variants (e.g. ``DEQ anderson / ift``) shade its colour: mixed with black
#: (> 0) or white (< 0) by this share
_SHADES = (0.3, -0.3, 0.55, 0.15, -0.15)
#: label -> colour given to labels outside the presets' (kept for the process)
_ASSIGNED: dict[str, str] = {}

#: matplotlib settings of every figure: fonts that stay legible when a panel is printed at
#: single-column width (about 3.3 in), TrueType fonts in the PDFs (Type 3 fonts are refused by
#: some publishers), thin spines
STYLE = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
         "figure.titlesize": 8.5, "figure.labelsize": 8, "lines.linewidth": 1.3,
         "lines.markersize": 4.5, "errorbar.capsize": 2.5, "axes.linewidth": 0.7,
         "axes.spines.top": False, "axes.spines.right": False, "grid.linewidth": 0.5,
         "legend.framealpha": 0.85, "pdf.fonttype": 42, "ps.fonttype": 42,
         "svg.fonttype": "none", "savefig.dpi": 200}
#: inches of one panel: a single-panel figure prints at its own size in one column
PANEL_SIZE = (3.4, 2.7)
#: resolution of the PNGs (dots per inch); each PNG has a vector PDF beside it
PNG_DPI = 200


def _styled(fn=None, *, bars: bool = True):
    """Draw ``fn``'s figure under :data:`STYLE` (fonts and sizes are fixed when drawn) and
    title it with the setting of its rows (:func:`describe_setting`; ``bars``: it draws error
    bars, and the title says what they are)."""
    import functools

    if fn is None:
        return functools.partial(_styled, bars=bars)

    @functools.wraps(fn)
    def wrapper(rows, *args, context: Sequence[dict] = (), note: str = "", **kwargs):
        # context: rows the title reads the columns ``rows`` lack from (the results rows, for
        # the extrapolation rows, which hold no image size); note: the sweep's setting
        # (:func:`benchmarks.results_io.setting_note`), ending the title
        import matplotlib

        with matplotlib.rc_context(STYLE):
            fig = fn(rows, *args, **kwargs)
            if fig is not None:
                title = describe_setting(rows, context, bars=bars)
                _suptitle(fig, f"{title}; {note}" if note else title)
                _cap_accuracy(fig)
        return fig

    return wrapper


#: y label of every accuracy axis (in percent)
ACC_LABEL = "test accuracy (%)"


def _cap_accuracy(fig: Figure) -> None:
    """Accuracy axes (and those sharing their y axis) end at 100 % and start at 0 % at most:
    an error bar of mean + std past 100 had the axis labelled 100.25 %, an accuracy no model
    can reach."""
    accuracy = [ax for ax in fig.axes if ax.get_ylabel() == ACC_LABEL]
    for ax in list(accuracy):
        accuracy += [a for a in ax.get_shared_y_axes().get_siblings(ax) if a not in accuracy]
    for ax in accuracy:
        low, high = ax.get_ylim()
        if high > 100.0 or low < 0.0:
            ax.set_ylim(max(low, 0.0), min(high, 100.0))


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, broken into lines that fit its width (a clipped title says
    nothing): at a break after "; " or ", " where it can."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 15))  # characters of 8.5 pt per inch, roughly
    lines = []
    for part in text.split("; "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "; " + part
        else:
            lines += textwrap.wrap(part, width) or [""]
    fig.suptitle("\n".join(lines))


#: dataset names as a paper writes them
DATASET_NAMES = {"digits": "digits (sklearn, 8×8)", "mnist": "MNIST",
                 "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "imagefolder": "image folder", "synthetic": "synthetic"}


def _values(rows: Sequence[dict], column: str) -> list:
    found = {r.get(column) for r in rows} - {None, ""}
    return sorted(found, key=lambda v: (number(v) is None, number(v) or 0, str(v)))


def _span(values: Sequence, unit: str) -> str:
    if not values:
        return ""
    if len(values) == 1:
        if values[0] == 1:
            unit = {"epochs": "epoch", "training images": "training image"}.get(unit, unit)
        return f"{values[0]:g} {unit}" if isinstance(values[0], float) else f"{values[0]} {unit}"
    return f"{values[0]}–{values[-1]} {unit}"


def describe_setting(rows: Sequence[dict], context: Sequence[dict] = (),
                     bars: bool = True) -> str:
    """One line naming what a figure shows: dataset, training images and image size (when set),
    epochs, seeds per point and what the error bars are; columns ``rows`` lack are read from
    ``context`` (the results rows, for the extrapolation rows).

    Example:
        >>> describe_setting([{"dataset": "fashion_mnist", "epochs": 6, "config_id": "a",
        ...                    "seed": s} for s in (0, 1, 2)])
        'Fashion-MNIST, 6 epochs; mean ± 1 sample std (n − 1) over 3 seeds'
        >>> describe_setting([{"dataset": "digits", "config_id": "a", "seed": 0}])
        'digits (sklearn, 8×8); 1 seed per configuration (no error bars)'
    """
    def values(column):
        return _values(rows, column) or _values(context, column)

    parts = [", ".join(DATASET_NAMES.get(str(d), str(d)) for d in values("dataset"))]
    sizes = values("train_size")
    if sizes:
        parts.append(_span([int(number(v)) for v in sizes], "training images"))
    pixels = values("image_size")
    if len(pixels) == 1:
        parts.append(f"{int(number(pixels[0]))}×{int(number(pixels[0]))} px")
    epochs = values("epochs")
    if epochs:
        parts.append(_span([int(number(v)) for v in epochs], "epochs"))
    seeds: dict = {}
    for r in rows:
        if r.get("seed") not in (None, ""):
            # per configuration, as the points average them (hand-written rows without a
            # config_id: by their configuration columns, not by label)
            seeds.setdefault(config_key(r), set()).add(r.get("seed"))
    counts = sorted({len(v) for v in seeds.values()})
    text = ", ".join(p for p in parts if p)
    if counts:
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        what = (f"mean ± 1 sample std (n − 1) over {n} seeds" if bars
                else f"{n} seeds per configuration")
        if counts == [1]:  # one seed: no mean, no std, no error bar ('over 1 seeds' said one)
            what = "1 seed per configuration" + (" (no error bars)" if bars else "")
        text = f"{text}; {what}" if text else what
    return text


def label_family(label) -> str | None:
    """The preset family a label belongs to: the longest name of :data:`LABEL_COLORS` it equals
    or starts with as a word (``"DEQ anderson / ift"`` is a DEQ, ``"DEQs"`` is not), None for
    other labels.

    Example:
        >>> [label_family(x) for x in ("DEQ broyden / phantom", "WT + shared mask", "MLP")]
        ['DEQ', 'WT + shared mask', None]
    """
    label = str(label)
    names = [n for n in LABEL_COLORS if label == n or (label.startswith(n)
                                                        and label[len(n)] in " ,;(/")]
    return max(names, key=len) if names else None


def _shade(color: str, share: float) -> str:
    from matplotlib.colors import to_hex, to_rgb

    target = 0.0 if share > 0 else 1.0
    return to_hex([c + abs(share) * (target - c) for c in to_rgb(color)])


def label_color(label: str, _assigned: dict = _ASSIGNED) -> str:
    """A colour per label, the same in every figure: fixed (colour-blind safe) for the
    presets' labels, a shade of the family's colour for a family's variants (``"DEQ anderson /
    ift"``: a shade of the DEQ's orange), a spare colour for other labels, kept once given.

    Example:
        >>> label_color("WT"), label_color("DEQ")
        ('#0072B2', '#E69F00')
    """
    if label in LABEL_COLORS:
        return LABEL_COLORS[label]
    if label not in _assigned:
        family = label_family(label)
        if family is None:
            spare = [k for k in _assigned if label_family(k) is None]
            _assigned[label] = _SPARE_COLORS[len(spare) % len(_SPARE_COLORS)]
        else:
            kin = [k for k in _assigned if label_family(k) == family]
            _assigned[label] = _shade(LABEL_COLORS[family], _SHADES[len(kin) % len(_SHADES)])
    return _assigned[label]


def label_marker(label: str) -> str:
    """A marker per label, the same in every figure: fixed for each family (a DEQ variant takes
    one by its position among the DEQ variants seen so far), cycled for other labels.

    Example:
        >>> label_marker("WT"), label_marker("untied")
        ('o', 'D')
    """
    if label in LABEL_MARKERS:
        return LABEL_MARKERS[label]
    label_color(label)  # register it: its position among its kin picks the marker
    family = label_family(label)
    kin = [k for k in _ASSIGNED if label_family(k) == family]
    # markers no other family wears (a DEQ variant with WT's circle could be told from WT by
    # its colour only, not in grey print), the family's own first
    own = LABEL_MARKERS.get(family)  # None for a label outside every family
    others = [m for m in _VARIANT_MARKERS if m not in LABEL_MARKERS.values()]
    others = [own, *others] if own is not None else others
    return others[kin.index(label) % len(others)]


def load_results(sweep_dir: str, failed: bool = True) -> list[dict]:
    """The rows of ``sweep_dir/results.csv`` (``[]`` when there are none), and with ``failed``
    one row with ``status = "failed"`` per run directory that has no row (see
    :func:`benchmarks.rows.failed_rows`): panels and table count them, means leave them out.

    Example:
        >>> load_results("/nonexistent")
        []
    """
    rows = read_rows(os.path.join(sweep_dir, RESULTS))
    check_unique(os.path.join(sweep_dir, RESULTS), rows)  # a run twice is not two seeds
    check_numeric(os.path.join(sweep_dir, RESULTS), rows)
    if failed:
        rows += failed_rows(sweep_dir, {r.get("run_id") for r in rows})
    for row in rows:  # a hand-written file without a label column: name lines by the model
        if row.get("label") is None:
            row["label"] = str(row.get("model") or "(no label)")
    return rows


def load_extrapolation(sweep_dir: str) -> list[dict]:
    """The rows of ``sweep_dir/extrapolation.csv`` (``[]`` when there are none).

    Example:
        >>> load_extrapolation("/nonexistent")
        []
    """
    path = os.path.join(sweep_dir, EXTRAPOLATION)
    return check_numeric(path, read_rows(path))


#: configuration columns the panels place points by: a number (or empty) in every row
NUMERIC_COLUMNS = ("depth", "width", "mask_k", "mask_density", "epochs", "train_size",
                   "image_size", "train_depth", "test_depth", "factor")


def check_numeric(path: str, rows: Sequence[dict]) -> list[dict]:
    """``rows`` when every cell of :data:`NUMERIC_COLUMNS` is a finite number or empty; a
    ``ValueError`` naming the file, line and column otherwise (a hand-edited ``depth`` of
    ``"x"`` cannot be placed on an axis, and would stop the plotting with a traceback).

    Example:
        >>> check_numeric("r.csv", [{"depth": 2}, {"mask_k": 0}, {"depth": None}])
        [{'depth': 2}, {'mask_k': 0}, {'depth': None}]
        >>> check_numeric("r.csv", [{"depth": "deep"}])
        Traceback (most recent call last):
        ...
        ValueError: r.csv: line 2: depth is 'deep', not a finite number: a damaged results file
    """
    for line, row in enumerate(rows, start=2):
        for column in NUMERIC_COLUMNS:
            value = row.get(column)
            parsed = number(value)
            if value is not None and (parsed is None or not math.isfinite(parsed)):
                raise ValueError(f"{path}: line {line}: {column} is {value!r}, not a finite "
                                 "number: a damaged results file")
    return list(rows)


def _labels(groups: Sequence[dict]) -> list[str]:
    """The labels of ``groups``, the presets' families first in one fixed order (so legends
    and axes list them alike in every figure), other labels after them as they come."""
    seen: list[str] = []
    for g in groups:
        if g.get("label") not in seen:
            seen.append(g.get("label"))
    order = list(LABEL_COLORS)
    return sorted(seen, key=lambda lab: order.index(label_family(lab))
                  if label_family(lab) is not None else len(order))


def _pct(value: float) -> float:
    return 100.0 * value


def _errorbar(ax, xs, groups, metric, shift_points: float = 0.0, **style):
    """Means in percent with one-std bars (none from a single clean run); flagged points
    (:func:`benchmarks.aggregate.flags`) marked. ``shift_points`` draws the whole series that
    many points to the right (a dodge: the data, and so the axis ticks, keep their values)."""
    ys = [_pct(g[f"{metric}_mean"]) for g in groups]
    es = [_pct(g[f"{metric}_std"]) if g.get(f"{metric}_count", g["n"]) > 1 else 0.0
          for g in groups]
    if shift_points:
        style["transform"] = offset_copy(ax.transData, fig=ax.figure, x=shift_points,
                                         units="points")
    ax.errorbar(xs, ys, yerr=es, elinewidth=0.9, **style)
    if shift_points:  # autoscaling skips the bars of a shifted series: their ends, unshifted
        ax.update_datalim([(x, y + s * e) for x, y, e in zip(xs, ys, es) for s in (-1, 1)])
        ax.autoscale_view()
    _mark_flagged(ax, xs, ys, groups, style.get("transform"))


#: legend entry of the flagged points
FLAG_LEGEND = ("x: k/n runs diverged, failed or without accuracy\n"
               "(excluded from the mean) or skipped steps (kept)")


def _mark_flagged(ax, xs, ys, groups, transform=None) -> None:
    """A red cross and a ``k/n ...`` note on each point whose runs diverged, failed or skipped
    steps (at the point as drawn: ``transform``, default data coordinates), and one legend
    entry per axis saying what the marks mean."""
    from matplotlib.lines import Line2D

    transform = transform or ax.transData
    flagged = [(x, y, text) for x, y, g in zip(xs, ys, groups) if (text := flags(g))]
    for x, y, text in flagged:
        ax.plot([x], [y], marker="x", color="red", markersize=7, linestyle="none", zorder=5,
                transform=transform)
        ax.annotate(text, (x, y), xycoords=transform, xytext=(4, -9),
                    textcoords="offset points", fontsize=6, color="red")
    if flagged and FLAG_LEGEND not in ax.get_legend_handles_labels()[1]:
        ax.add_line(Line2D([], [], marker="x", color="red", linestyle="none",
                           label=FLAG_LEGEND))


def _lost(groups: Sequence[dict]) -> list[str]:
    """Configurations with runs but no clean accuracy (every seed diverged, failed or has no
    finite ``test_acc``)."""
    out = []
    for g in groups:
        if g.get("test_acc_count", 1) == 0 and (g.get("n_stopped") or g.get("n_failed")
                                                or g.get("n_noacc")):
            parts = [str(g.get("label"))]
            parts += [f"{name} {g[key]}" for key, name in (
                ("depth", "depth"), ("width", "width"), ("mask_k", "K"),
                ("mask_density", "density")) if g.get(key) not in (None, 0)
                and not (key == "depth" and g.get("core") == "deq")]
            out.append(f"{', '.join(parts)} ({flags(g)})")
    return out


def _footnote(fig: Figure, groups: Sequence[dict]) -> None:
    """Name under the panels the configurations that no clean run could place on them."""
    lost = _lost(groups)
    if lost:
        more = f"; + {len(lost) - 4} more" if len(lost) > 4 else ""
        fig.supxlabel("not drawn, no clean run: " + "; ".join(lost[:4]) + more, fontsize=6.5,
                      color="red", wrap=True)


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _log2_axis(ax, values: Sequence[float]) -> None:
    values = sorted({v for v in values if v is not None and math.isfinite(v)})
    if len(values) >= 3 and values[0] > 0 and values[-1] / values[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.minorticks_off()


def _reference_line(ax, g: dict, label: str, metric: str = "test_acc",
                    linestyle: str = "--") -> None:
    """A configuration without the x-axis variable (e.g. a DEQ on a depth axis): a band."""
    mean = _pct(g[f"{metric}_mean"])
    std = _pct(g[f"{metric}_std"]) if g.get(f"{metric}_count", g["n"]) > 1 else 0.0
    color = label_color(g.get("label"))
    if marks := flags(g):
        label += f" [{marks}]"
    ax.axhline(mean, color=color, linestyle=linestyle, linewidth=1.3, label=label)
    if std > 0:
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)


def _setting(g: dict, follows: bool = True) -> tuple:
    """What else distinguishes configurations of one label along a depth or width axis: the
    mask count (``"D"`` when it follows the depth, as in ``mask_k = depth``, and ``follows``:
    the label has K = depth at two depths or more; a fixed K = 4 is K 4 at depth 4 too),
    density, solver, gradient."""
    k = g.get("mask_k")
    if follows and k and k == g.get("depth"):
        k = "D"
    return (k, g.get("mask_density") if g.get("mask_k") else None, g.get("f_solver"),
            g.get("grad"))


def _setting_name(setting: tuple) -> str:
    k, density, solver, grad, *extra = setting
    parts = []
    if k:
        parts.append(f"K={k}")
    if density is not None:
        parts.append(f"density {density:g}")
    parts += [str(v) for v in (solver, grad) if v]
    parts += [f"{column} {value}" for column, value in (extra[0] if extra else ())]
    return " ".join(parts)


#: configuration columns that can tell two configurations of one line apart at one x
_SPLIT_COLUMNS = tuple(c for c in GROUP_COLUMNS
                       if c not in ("label", "mask_k", "mask_density", "f_solver", "grad"))


def _distinguishing(members: Sequence[dict], skip: Sequence[str] = ()) -> tuple[str, ...]:
    """The configuration columns (not in ``skip``) whose values differ across ``members``:
    what tells apart configurations that one line would otherwise join (a directory shared by
    presets that differ in, e.g., epochs or dataset); ``("config_id",)`` when none do."""
    return tuple(c for c in _SPLIT_COLUMNS if c not in skip
                 and len({str(m.get(c)) for m in members}) > 1) or ("config_id",)


def _tags(row: dict, columns: Sequence[str]) -> tuple:
    """``(column, value)`` pairs of ``row`` for a legend entry."""
    return tuple((c.replace("_", " "), row.get(c)) for c in columns)


def _split_duplicates(lines: dict[tuple, list[dict]], x: str) -> dict[tuple, list[dict]]:
    """Split a line that holds two configurations at one x (a directory shared by presets
    that differ in, e.g., epochs or dataset) by the columns that differ, so no line joins
    points of different experiments; the setting then carries ``(column, value)`` pairs."""
    out: dict[tuple, list[dict]] = {}
    for (label, value, setting), pts in lines.items():
        xs = [g[x] for g in pts]
        if len(set(xs)) == len(xs):
            out[(label, value, setting)] = pts
            continue
        varying = _distinguishing(pts, skip=(x,))
        for g in pts:
            out.setdefault((label, value, (*setting, _tags(g, varying))), []).append(g)
    return out


def _family_legend(ax) -> None:
    """The axes' legend with its entries in the families' order of every figure (lines and
    bands alike: matplotlib lists bands, plain lines, before error-bar lines), beside the axes
    (off the data)."""
    handles, texts = ax.get_legend_handles_labels()
    if not handles:
        return
    order = list(LABEL_COLORS)
    rank = sorted(range(len(texts)), key=lambda i: (
        order.index(label_family(texts[i])) if label_family(texts[i]) is not None
        else len(order), i))
    # beside the axes, never on them: with four entries "best" put it over the DEQ band
    ax.legend([handles[i] for i in rank], [texts[i] for i in rank], loc="upper left",
              bbox_to_anchor=(1.02, 1.0))


def _shared_entries(axes: Sequence) -> dict:
    """Legend text -> handle over ``axes`` (each text once); their own legends removed."""
    entries: dict[str, object] = {}
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
        for handle, text in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    return entries


def _legend_under(ax) -> None:
    """The panel's legend under its x-axis label, in two columns (never on the data)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def _figure_legend(fig: Figure, axes: Sequence, where: str = "lower center") -> None:
    """One legend under the panels for entries the panels share (each label once), instead of
    a legend inside each panel that covers its points."""
    entries = _shared_entries(axes)
    if entries:
        ncol = 1 if where.endswith("upper") else min(len(entries), 4 if len(axes) > 1 else 2)
        fig.legend(list(entries.values()), list(entries), loc=f"outside {where}", ncol=ncol)


#: dodge of the lines of an accuracy-vs-depth (width) plot: points between neighbours, and the
#: most points between the outermost two
DODGE_STEP, DODGE_SPAN = 5.0, 24.0


def _sweep_plot(rows: Sequence[dict], x: str, line: str, xlabel: str, title: str,
                line_name: str) -> Figure | None:
    """Accuracy vs ``x`` with a line per (label, ``line`` value, other setting); labels without
    a sweep over ``x`` drawn as reference bands."""
    everything = aggregate(rows, ["test_acc"])
    groups = [g for g in everything if has([g], "test_acc")]
    lines: dict[tuple, list[dict]] = {}
    depth_k: dict = {}  # label -> the depths where its mask count equals the depth
    for g in groups:
        if g.get("mask_k") and g.get("mask_k") == g.get("depth"):
            depth_k.setdefault(g.get("label"), set()).add(g.get("depth"))
    for g in groups:
        if g.get(x) is not None:
            follows = len(depth_k.get(g.get("label"), ())) >= 2
            lines.setdefault((g.get("label"), g.get(line), _setting(g, follows)),
                             []).append(g)
    lines = _split_duplicates(lines, x)
    lines = {k: v for k, v in lines.items() if len({g[x] for g in v}) >= 2}
    if not lines:
        return None
    swept_labels = {k[0] for k in lines}
    line_values = sorted({k[1] for k in lines if k[1] is not None})
    settings = {}
    for label, value, setting in lines:
        settings.setdefault((label, value), set()).add(setting)
    fig = Figure(figsize=(PANEL_SIZE[0] * 1.5, PANEL_SIZE[1] * 1.15), layout="constrained")
    ax = fig.add_subplot()
    order = _labels([{"label": k[0]} for k in lines])
    # lines meeting at one x would hide each other's error bars: each is drawn a few points
    # apart (at most DODGE_SPAN points for all), centred on the true x
    step = min(DODGE_STEP, DODGE_SPAN / max(len(lines) - 1, 1))
    for n, ((label, value, setting), pts) in enumerate(sorted(lines.items(), key=lambda item: (
            order.index(item[0][0]), line_values.index(item[0][1])
            if item[0][1] in line_values else -1, str(item[0][2])))):
        pts = sorted(pts, key=lambda g: g[x])
        i = line_values.index(value) if value in line_values else 0
        name = label
        if len(line_values) > 1 and not (line == "depth" and pts[0].get("core") in ("deq", "ode")):
            name += f", {line_name} {value}"
        color = label_color(label)
        if len(settings[(label, value)]) > 1:
            name += f" ({_setting_name(setting)})"
            # the label's other settings (mask density, epochs of another preset ...): shades
            # of its colour, or their lines could not be told apart but by the legend text
            j = sorted(settings[(label, value)], key=str).index(setting)
            color = _shade(color, _SHADES[(j - 1) % len(_SHADES)]) if j else color
        # colour and marker: the family; line style (and open markers): the width (depth)
        _errorbar(ax, [g[x] for g in pts], pts, "test_acc",
                  shift_points=step * (n - (len(lines) - 1) / 2), color=color,
                  marker=label_marker(label), markerfacecolor="white" if i % 2 else None,
                  linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=name)
    bands = [g for g in groups  # implicit / continuous cores have no depth or are not swept
             if g.get("label") not in swept_labels and g.get("core") in ("deq", "ode")]
    for g in bands:
        name = f"{g.get('label')} (no {x} axis)"
        i = line_values.index(g.get(line)) if g.get(line) in line_values else 1
        if len(line_values) > 1 and g.get(line) is not None:
            name = f"{g.get('label')}, {line_name} {g.get(line)} (no {x} axis)"
        kin = [b for b in bands if b.get("label") == g.get("label")
               and b.get(line) == g.get(line)]
        if len(kin) > 1:  # one label, several settings (e.g. grad ift / phantom): name each
            setting = _setting(g)
            if len({_setting(b) for b in kin}) < len(kin):
                setting = (*setting, _tags(g, _distinguishing(kin)))
            name = name.replace(" (no", f" ({_setting_name(setting)}; no", 1)
            i = kin.index(g)
        _reference_line(ax, g, name, linestyle=_LINESTYLES[i % len(_LINESTYLES)])
    _log2_axis(ax, [g[x] for pts in lines.values() for g in pts])
    ax.margins(x=0.08)  # room for the outermost dodged series
    if len(line_values) == 1:  # the legend names no width (depth): say it in the title
        value = line_values[0]
        value = f"{value:g}" if isinstance(value, (int, float)) else value
        title = f"{title}, {line_name} {value}"
    _finish(ax, xlabel, ACC_LABEL, title, legend=False)
    _family_legend(ax)
    _footnote(fig, [g for g in everything if g.get(x) is not None])
    # the outermost series sit half the dodge (points) beyond the first / last x, plus a
    # marker and a bar cap: a fixed 8 % margin clipped them on an axis narrowed by a long
    # legend; the margin m keeps m * W / (1 + 2 m) >= that room on an axis W points wide
    fig.draw_without_rendering()  # the constrained layout: the axis width as drawn
    room = step * (len(lines) - 1) / 2 + 6.0
    width = ax.get_position().width * fig.get_figwidth() * 72.0
    if width > 2 * room:
        ax.margins(x=max(0.08, room / (width - 2 * room)))
    return fig


@_styled
def plot_accuracy_vs_depth(rows: Sequence[dict]) -> Figure | None:
    """Test accuracy vs depth, a line per (label, width); DEQ / ODE as reference bands.

    Example:
        >>> plot_accuracy_vs_depth([{"label": "WT", "depth": 2, "test_acc": 0.5}]) is None
        True
    """
    return _sweep_plot(rows, "depth", "width", "depth (cell applications)",
                       "Accuracy vs depth", "width")


@_styled
def plot_accuracy_vs_width(rows: Sequence[dict]) -> Figure | None:
    """Test accuracy vs width, a line per (label, depth).

    Example:
        >>> plot_accuracy_vs_width([{"label": "WT", "width": 8, "test_acc": 0.5}]) is None
        True
    """
    return _sweep_plot(rows, "width", "depth", "width (channels of the first stage)",
                       "Accuracy vs width", "depth")


def _sequential(i: int, n: int):
    """Colour ``i`` of ``n`` ordered values (viridis, avoiding its pale yellow end)."""
    from matplotlib import colormaps

    return colormaps["viridis"](0.85 * i / max(n - 1, 1))


def _masked_setting(groups: Sequence[dict]) -> tuple | None:
    """The (depth, width) with the most mask settings (the deepest on a tie), if it has
    three mask counts or two densities: enough for a curve."""
    by_setting: dict[tuple, set] = {}
    for g in groups:
        if g.get("core") not in (None, "unrolled") or not g.get("mask_k"):
            continue
        by_setting.setdefault((g.get("depth"), g.get("width")), set()).add(
            (g.get("mask_k"), g.get("mask_density")))
    ok = {k: v for k, v in by_setting.items()
          if len({s[0] for s in v}) >= 3 or len({s[1] for s in v}) >= 2}
    if not ok:
        return None
    return max(ok, key=lambda k: (len(ok[k]), *(v if isinstance(v, (int, float)) else -1
                                                 for v in k)))


#: the arms of the distinct-vs-shared-vs-none comparison, in plot order
MASK_ARMS = ("no mask", "1 shared mask", "distinct masks", "untied")


def _mask_arm(g: dict) -> str | None:
    core, k = g.get("core"), g.get("mask_k") or 0
    if core == "untied":
        return "untied" if not k else None
    if core not in (None, "unrolled"):
        return None
    return "no mask" if k == 0 else "1 shared mask" if k == 1 else "distinct masks"


def _density_name(density) -> str:
    return "" if density is None else f"density {density:g}"


def _arm_densities(groups: Sequence[dict]) -> list:
    """The densities of the shared / distinct mask arms, in order (None: not recorded)."""
    values = {g.get("mask_density") for g in groups
              if _mask_arm(g) in ("1 shared mask", "distinct masks")}
    return sorted(values, key=lambda v: (v is None, v if v is not None else 0))


def _arms_by_depth(groups: Sequence[dict], density=None) -> tuple[int | None, dict]:
    """At the most common width, with the masks at ``density``: depth -> arm -> group (for
    several, the most masks). No mask and untied have no density: they join every table."""
    masked = [g for g in groups if _mask_arm(g) in ("1 shared mask", "distinct masks")
              and g.get("mask_density") == density]
    widths = [g.get("width") for g in masked]
    if not widths:
        return None, {}
    width = max(set(widths), key=widths.count)
    table: dict = {}
    for g in groups:
        arm = _mask_arm(g)
        if arm is None or g.get("width") != width or g.get("depth") is None:
            continue
        if arm in ("1 shared mask", "distinct masks") and g.get("mask_density") != density:
            continue
        slot = table.setdefault(g["depth"], {})
        if arm not in slot or (g.get("mask_k") or 0) > (slot[arm].get("mask_k") or 0):
            slot[arm] = g
    table = {d: arms for d, arms in table.items()
             if "distinct masks" in arms and len(arms) >= 2}
    return width, table


def _plot_arms(ax, width, table, density=None, tags=()) -> None:
    depths = sorted(table)
    arms = [a for a in MASK_ARMS if any(a in table[d] for d in depths)]
    # each arm in the colour and marker of the preset family it is
    family = {"no mask": "WT", "1 shared mask": "WT + shared mask",
              "distinct masks": "WT + distinct masks", "untied": "untied"}
    for j, arm in enumerate(arms):
        offset = 0.6 * (j - (len(arms) - 1) / 2) / max(len(arms), 1)
        pts = [(i, table[d][arm]) for i, d in enumerate(depths) if arm in table[d]]
        name = arm
        if arm == "distinct masks":
            ks = {g.get("mask_k") for _, g in pts}
            follows = all(g.get("mask_k") == g.get("depth") for _, g in pts)
            name += " (K = depth)" if follows else f" (K = {', '.join(map(str, sorted(ks)))})"
        _errorbar(ax, [i + offset for i, _ in pts], [g for _, g in pts], "test_acc",
                  color=LABEL_COLORS[family[arm]], marker=LABEL_MARKERS[family[arm]],
                  linestyle="none", label=name)
    ax.set_xticks(range(len(depths)))
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_xlim(-0.5, len(depths) - 0.5)
    # the title names the arms drawn: a sweep without a shared mask (quick) does not say shared
    compared = [name for arm, name in (("distinct masks", "Distinct"), ("1 shared mask", "shared"),
                                       ("no mask", "no mask")) if arm in arms]
    if compared == ["Distinct", "shared"]:
        compared[1] = "shared mask"
    elif len(compared) == 1:
        compared.append("untied")  # two arms at least: distinct masks and the untied model
    title = f"{' vs '.join(compared)}, width {width}"
    _finish(ax, "depth (cell applications)", ACC_LABEL,
            ", ".join(filter(None, (title, _density_name(density)))) + _tag_text(tags))


def _check_density(groups: Sequence[dict], density) -> list:
    """The arm densities to draw: all of them, or ``density`` when it is one of them."""
    densities = _arm_densities(groups)
    if density is None:
        return densities
    if density not in densities:
        valid = ", ".join(f"{d:g}" for d in densities if d is not None) or "none"
        raise ValueError(f"density: no masks at density {density:g} in these results; "
                         f"valid: {valid}")
    return [density]


@_styled
def plot_masks(rows: Sequence[dict], density: float | None = None) -> Figure | None:
    """Masks at equal parameters: per depth, no mask vs one shared mask vs distinct masks (and
    the untied model), one panel per mask density (or only ``density``; its title names it);
    and where a sweep has them, accuracy vs the number of distinct masks K (a line per density;
    K = 1 is one shared mask) and vs density (a line per K) at the depth and width with the
    most mask settings, with no mask and untied as reference bands. Presets sharing a
    directory that differ in :data:`EXPERIMENT_COLUMNS` (e.g. epochs) get panels of their
    own, titled with the setting: arms and curves never pool two experiments. More than three
    panels take two rows: the per-depth comparisons above, the curves below.

    Args:
        rows: results rows.
        density: draw the per-depth comparison at this mask density only.

    Raises:
        ValueError: ``density`` is not a density of the results' masked runs (names those).

    Example:
        >>> rows = [{"label": "WT + distinct masks", "core": "unrolled", "depth": 4, "width": 8,
        ...          "mask_k": k, "mask_density": 0.5, "test_acc": 0.8} for k in (0, 1, 2, 4)]
        >>> [ax.get_title() for ax in plot_masks(rows).axes]  # doctest: +NORMALIZE_WHITESPACE
        ['Distinct vs shared vs no mask, width 8, density 0.5', 'Masks at depth 4, width 8']
    """
    everything = aggregate(rows, ["test_acc"])
    groups = [g for g in everything if has([g], "test_acc")]
    arm_panels, curves = [], []
    densities_drawn = _check_density(groups, density)
    for tags, mine in _experiments(groups):  # presets sharing a directory: never mixed
        for d in densities_drawn:
            width, arms = _arms_by_depth(mine, d)
            if arms:
                arm_panels.append((width, arms, d, tags))
        setting = _masked_setting(mine)
        if setting is None:
            continue
        here = [g for g in mine if (g.get("depth"), g.get("width")) == setting]
        masked = [g for g in here if g.get("mask_k") and g.get("core") in (None, "unrolled")]
        refs = [g for g in here if not g.get("mask_k") and g.get("core") in (
            None, "unrolled", "untied")]
        ks = sorted({g["mask_k"] for g in masked})
        densities = sorted({g.get("mask_density") for g in masked if g.get("mask_density")})
        curves += [(p, masked, refs, ks, densities, setting, tags) for p, ok in (
            ("k", len(ks) >= 3), ("density", len(densities) >= 2)) if ok]
    if not arm_panels and not curves:
        return None
    two_rows = len(arm_panels) + len(curves) > 3 and arm_panels and curves
    ncols = max(len(arm_panels), len(curves)) if two_rows else len(arm_panels) + len(curves)
    # wider panels than the others: the arms panels' titles name width and density
    fig = Figure(figsize=(PANEL_SIZE[0] * 1.25 * ncols,
                          PANEL_SIZE[1] * (2 if two_rows else 1) + 0.6), layout="constrained")
    first_arms = None
    arm_axes = []
    for i, (width, arms, d, tags) in enumerate(arm_panels):  # one y scale: densities compare
        ax = fig.add_subplot(2 if two_rows else 1, ncols, i + 1, sharey=first_arms)
        first_arms = first_arms or ax
        _plot_arms(ax, width, arms, d, tags)
        arm_axes.append(ax)
    if len(arm_axes) > 1 and two_rows and len(curves) < ncols:
        # the arms are the same in every panel: one legend, in the free cell of the grid
        slot = fig.add_subplot(2, ncols, 2 * ncols)
        slot.axis("off")
        entries = _shared_entries(arm_axes)
        slot.legend(list(entries.values()), list(entries), loc="center")
    elif len(arm_axes) > 1:  # one legend: under them, or beside the top row (the arms)
        _figure_legend(fig, arm_axes, "right upper" if two_rows else "lower center")
    elif arm_axes and arm_axes[0].get_legend() is not None:
        # one panel (quick): under it, as the curves' are, not at "best" over an error bar
        _legend_under(arm_axes[0])
    first = ncols + 1 if two_rows else len(arm_panels) + 1
    for i, curve in enumerate(curves):
        ax = fig.add_subplot(2 if two_rows else 1, ncols, first + i)
        _plot_curves(ax, *curve)
    _footnote(fig, everything)
    return fig


def _plot_curves(ax, panel, masked, refs, ks, densities, setting, tags=()) -> None:
    """Accuracy vs K (``panel == "k"``, a line per density) or vs density (a line per K);
    ``tags``: the ``(column, value)`` pairs of the experiment, named in the title."""
    outer, inner = (densities, ks) if panel == "k" else (ks, densities)
    key_out, key_in = ("mask_density", "mask_k") if panel == "k" else ("mask_k", "mask_density")
    for j, value in enumerate(outer):
        pts = sorted((g for g in masked if g.get(key_out) == value), key=lambda g: g[key_in])
        if not pts:
            continue
        name = f"density {value:g}" if panel == "k" else (
            "1 shared mask" if value == 1 else f"{value} distinct masks")
        _errorbar(ax, [g[key_in] for g in pts], pts, "test_acc",
                  color=_sequential(j, len(outer)), marker=_MARKERS[j % len(_MARKERS)],
                  label=name)
    for g in refs:
        name = "no mask" if g.get("core") in (None, "unrolled") else g.get("label")
        _reference_line(ax, g, name)
    if panel == "k":
        _log2_axis(ax, inner)
        _finish(ax, "distinct masks K (1 = one shared mask)", ACC_LABEL,
                f"Masks at depth {setting[0]}, width {setting[1]}{_tag_text(tags)}",
                legend=False)
    else:
        ax.set_xticks(inner)
        _finish(ax, "mask density (share of weights kept)", ACC_LABEL,
                f"Density at depth {setting[0]}, width {setting[1]}{_tag_text(tags)}",
                legend=False)
    # under the panel: inside ("best") it sat over the error bars and the untied band (beside
    # it, it narrowed the grid's columns and cut the titles of the panels above)
    _legend_under(ax)


#: columns that set an experiment apart from another one in a shared directory (presets that
#: differ in epochs, data ...): the masks panels compare arms of one experiment only
EXPERIMENT_COLUMNS = ("dataset", "epochs", "batch_size", "lr", "train_size", "stages")


def _experiments(groups: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    """``groups`` split by the :data:`EXPERIMENT_COLUMNS` whose values differ among the
    weight-tied and untied configurations: ``[(tags, groups)]``, ``tags`` the ``(column,
    value)`` pairs of the experiment (``()`` when there is one experiment only)."""
    tied = [g for g in groups if g.get("core") in (None, "unrolled", "untied")]
    varying = [c for c in EXPERIMENT_COLUMNS if len({str(g.get(c)) for g in tied}) > 1]
    out: dict[tuple, list[dict]] = {}
    for g in groups:
        out.setdefault(_tags(g, varying), []).append(g)
    return list(out.items())


def _tag_text(tags: tuple) -> str:
    return "".join(f", {column} {value}" for column, value in tags)


def pareto_front(groups: Sequence[dict], x: str, y: str = "test_acc") -> list[dict]:
    """The groups no other group beats on both axes (smaller mean ``x``, higher mean ``y``),
    sorted by ``x``: the best accuracy reachable at each budget.

    Example:
        >>> gs = [{"p_mean": p, "a_mean": a} for p, a in ((1, .5), (2, .4), (3, .9))]
        >>> [g["p_mean"] for g in pareto_front(gs, "p", "a")]
        [1, 3]
    """
    front, best = [], -math.inf
    for g in sorted(groups, key=lambda g: (g[f"{x}_mean"], -g[f"{y}_mean"])):
        if g[f"{y}_mean"] > best:
            front.append(g)
            best = g[f"{y}_mean"]
    return front


def _frontier(ax, groups: Sequence[dict], x: str, xlabel: str, title: str) -> None:
    """Every configuration as a faint point, each label's Pareto front as a line."""
    for label in _labels(groups):
        mine = [g for g in groups if g.get("label") == label and has([g], x)]
        if not mine:
            continue
        color, marker = label_color(label), label_marker(label)
        off = [g for g in mine if g not in pareto_front(mine, x)]
        ax.scatter([g[f"{x}_mean"] for g in mine], [_pct(g["test_acc_mean"]) for g in mine],
                   color=color, marker=marker, alpha=0.3, s=12, linewidths=0)
        _mark_flagged(ax, [g[f"{x}_mean"] for g in off], [_pct(g["test_acc_mean"]) for g in off],
                      off)
        front = pareto_front(mine, x)
        _errorbar(ax, [g[f"{x}_mean"] for g in front], front, "test_acc", color=color,
                  marker=marker, linestyle="-" if len(front) > 1 else "none", label=label)
    if min((g[f"{x}_mean"] for g in groups if has([g], x)), default=1) > 0:
        _compact_log_x(ax)  # a log axis only for positive values: a 0 would vanish from it
    _finish(ax, xlabel, ACC_LABEL, title + "\n(line: best configuration per budget, "
            "faint: all)")


@_styled
def plot_capacity(rows: Sequence[dict]) -> Figure | None:
    """The capacity frontier: accuracy vs trainable parameters (and vs FLOPs per image).

    Example:
        >>> rows = [{"label": l, "params": p, "test_acc": a}
        ...         for l, p, a in (("WT", 1e3, .8), ("untied", 4e3, .85))]
        >>> plot_capacity(rows).axes[0].get_xscale()
        'log'
    """
    everything = aggregate(rows, ["test_acc", "params", "flops_per_image"])
    groups = [g for g in everything if has([g], "test_acc")]
    if len(_labels([g for g in groups if has([g], "params")])) < 2:
        return None
    flops = [g["flops_per_image_mean"] for g in groups if has([g], "flops_per_image")]
    # a compute panel needs two labels and compute that differs (one x for all says nothing)
    with_flops = (len(_labels([g for g in groups if has([g], "flops_per_image")])) >= 2
                  and min(flops) > 0 and max(flops) / min(flops) > 1.05)
    fig = Figure(figsize=(PANEL_SIZE[0] * (2 if with_flops else 1.3), PANEL_SIZE[1] + 0.7),
                 layout="constrained")
    ax = fig.add_subplot(1, 2 if with_flops else 1, 1)
    _frontier(ax, [g for g in groups if has([g], "params")], "params",
              "trainable parameters", "Capacity: accuracy vs parameters")
    axes = [ax]
    if with_flops:
        axes.append(fig.add_subplot(1, 2, 2))
        _frontier(axes[-1], [g for g in groups if has([g], "flops_per_image")],
                  "flops_per_image", "FLOPs per image (forward)", "Accuracy vs compute")
    _figure_legend(fig, axes)
    _footnote(fig, everything)
    return fig


@_styled
def plot_time_memory(rows: Sequence[dict]) -> Figure | None:
    """Accuracy vs total training time (wall clock of the epochs), vs the CPU seconds of the
    run's process (when recorded: the cost whatever else the machine ran), and vs peak memory;
    one colour per label.

    Example:
        >>> rows = [{"label": l, "train_time_s": t, "test_acc": .8, "peak_mem_mb": 50}
        ...         for l, t in (("WT", 10), ("DEQ", 30))]
        >>> [ax.get_xlabel() for ax in plot_time_memory(rows).axes]
        ['training time (s)', 'peak memory (MiB)']
    """
    everything = aggregate(rows, ["test_acc", "train_time_s", "cpu_s", "peak_mem_mb"])
    groups = [g for g in everything if has([g], "test_acc")]
    timed = [g for g in groups if has([g], "train_time_s")]
    if len(_labels(timed)) < 2:
        return None
    panels = [("train_time_s", "training time (s)", "Accuracy vs training time")]
    if len(_labels([g for g in groups if has([g], "cpu_s")])) >= 2:
        panels.append(("cpu_s", "CPU seconds of the run's process",
                       "Accuracy vs CPU time (whole run)"))
    if len(_labels([g for g in groups if has([g], "peak_mem_mb")])) >= 2:
        panels.append(("peak_mem_mb", "peak memory (MiB)", "Accuracy vs peak memory"))
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1] + 0.5),
                 layout="constrained")
    axes = []
    for i, (metric, xlabel, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for label in _labels(groups):
            pts = [g for g in groups if g.get("label") == label and has([g], metric)]
            if not pts:
                continue
            ax.errorbar([g[f"{metric}_mean"] for g in pts],
                        [_pct(g["test_acc_mean"]) for g in pts],
                        xerr=[g[f"{metric}_std"] if g[f"{metric}_count"] > 1 else 0 for g in pts],
                        yerr=[_pct(g["test_acc_std"]) if g["test_acc_count"] > 1 else 0
                              for g in pts],
                        color=label_color(label), marker=label_marker(label), linestyle="none",
                        elinewidth=0.9, label=label)
            _mark_flagged(ax, [g[f"{metric}_mean"] for g in pts],
                          [_pct(g["test_acc_mean"]) for g in pts], pts)
        _log_if_wide(ax, [g[f"{metric}_mean"] for g in groups if has([g], metric)])
        _finish(ax, xlabel, ACC_LABEL if i == 0 else "", title)
    _figure_legend(fig, axes)
    _footnote(fig, everything)
    return fig


def _log_if_wide(ax, values: Sequence[float]) -> None:
    """A log x axis where the values span a decade or more (DEQ vs WT times can)."""
    values = [v for v in values if math.isfinite(v)]
    # a log axis only for positive values: a point at 0 (or below) would vanish from it
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        _compact_log_x(ax)


def _compact(value: float, _pos=None) -> str:
    """``60k``, ``1.5M``, ``200``: tick labels that do not run into each other."""
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _compact_log_x(ax) -> None:
    """A log x axis labelled at powers of ten and at 2, 3 and 5 times them (``20k``, ``30k``,
    ``50k``, ``100k``): no overlapping ``3 × 10^7 4 × 10^7`` labels on a span under a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_compact))
    _labelled_ends(ax)
    low, high = ax.get_xlim()
    few = low > 0 and high / low < 300  # under 2.5 decades: label the 2s and 5s too
    ax.xaxis.set_minor_formatter(FuncFormatter(_compact) if few else NullFormatter())


def _labelled_ends(ax) -> None:
    """Under 2.5 decades of data, a log x axis from the labelled tick (1, 2, 3 or 5 times a
    power of ten) below the data to the one above it: the leftmost points (every weight-tied
    model at 63k parameters) stood left of the first label, their value unreadable."""
    low, high = ax.dataLim.intervalx
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        return
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1,
                                          math.ceil(math.log10(high)) + 2) for m in (1, 2, 3, 5)]
    below = max(t for t in ticks if t <= low / 1.04)
    above = min(t for t in ticks if t >= high * 1.04)
    if above / below < 300:
        ax.set_xlim(below, above)


def _strip(ax, values_by_label: dict[str, list[float]], ylabel: str, title: str,
           log: bool = False) -> None:
    for i, (label, values) in enumerate(values_by_label.items()):
        n = len(values)
        xs = [i + (0.3 * (j / max(n - 1, 1) - 0.5) if n > 1 else 0.0) for j in range(n)]
        # the points over the mean bar (a configuration alone under its label sat hidden
        # under it) and not clipped at the axes' edge
        ax.scatter(xs, values, color=label_color(label), marker=label_marker(label), s=16,
                   alpha=0.85, linewidths=0, zorder=3, clip_on=False)
        mean, _, _ = mean_std(values)
        if math.isfinite(mean) and n > 1:  # one point is its own mean: no bar over it
            ax.hlines(mean, i - 0.25, i + 0.25, color="black", linewidth=1.0, zorder=2)
    ax.set_xticks(range(len(values_by_label)))
    ax.set_xticklabels(list(values_by_label), rotation=25, ha="right")
    ax.set_xlim(-0.6, len(values_by_label) - 0.4)
    if log:
        ax.set_yscale("log")
    _finish(ax, "", ylabel, title, legend=False)


@_styled(bars=False)
def plot_stability(rows: Sequence[dict]) -> Figure | None:
    """Stability: final solver residuals per run (implicit cores), share of diverged solves and
    skipped (non-finite) steps per label, and the seed spread of accuracy per configuration.

    Example:
        >>> rows = [{"label": "DEQ", "config_id": "d", "seed": s, "rel_residual": 1e-3 * (s + 1),
        ...          "diverged": 0.0, "skipped_steps": 0, "test_acc": .8 + .01 * s}
        ...         for s in range(3)]
        >>> len(plot_stability(rows).axes)
        3
    """
    labels = _labels(rows)
    residuals = {lab: [v for r in rows if r.get("label") == lab
                       for v in [number(r.get("rel_residual"))] if v is not None and v > 0]
                 for lab in labels}
    residuals = {k: v for k, v in residuals.items() if v}
    divergence = {}
    for lab in labels:
        mine = [r for r in rows if r.get("label") == lab]
        div = [number(r.get("diverged")) for r in mine]
        skipped = [number(r.get("skipped_steps")) for r in mine]
        stopped = [1.0 if r.get("status") in (*UNSTABLE, FAILED) else 0.0 for r in mine]
        if any(v is not None for v in div + skipped) or any(stopped):
            conv = [number(r.get("converged")) for r in mine]
            divergence[lab] = (
                mean_std(1.0 - v for v in conv if v is not None)[0],
                mean_std(v for v in div if v is not None)[0],
                mean_std(1.0 if (v or 0) > 0 else 0.0 for v in skipped if v is not None)[0],
                mean_std(stopped)[0])
    groups = [g for g in aggregate(rows, ["test_acc"]) if g["test_acc_count"] >= 2]
    spread = {lab: [] for lab in _labels(groups)}  # the labels in the order of every figure
    for g in groups:
        spread[g.get("label")].append(_pct(g["test_acc_std"]))
    panels = [p for p, data in (("residual", residuals), ("divergence", divergence),
                                ("spread", spread)) if data]
    if not panels:
        return None
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1] + 0.9),
                 layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if panel == "residual":
            _strip(ax, residuals, "final relative residual (test, per run)",
                   "Solver residuals (bar: mean)", log=True)
        elif panel == "divergence":
            names = list(divergence)
            bars = [[_pct(divergence[n][i]) if math.isfinite(divergence[n][i]) else 0.0
                     for n in names] for i in range(4)]
            for i, (values, color, hatch, what) in enumerate(zip(
                    bars, (OKABE_ITO["orange"], OKABE_ITO["vermillion"], "#999999", "black"),
                    ("///", "xxx", "...", ""), (
                        "solves not converged to tol (test)", "diverged solves (test)",
                        "runs with skipped steps", "runs stopped (non-finite) or failed"))):
                ax.bar([x + 0.2 * (i - 1.5) for x in range(len(names))], values, width=0.2,
                       color=color, hatch=hatch, edgecolor="white", linewidth=0,
                       label=f"{what} (%)")
            ax.set_xticks(list(range(len(names))))
            ax.set_xticklabels(names, rotation=25, ha="right")
            ax.set_ylim(0, max(5.0, *(v for b in bars for v in b)) * 1.1)
            if not any(v for b in bars for v in b):  # an empty panel says why it is empty
                ax.text(0.5, 0.5, "no failures in any run", transform=ax.transAxes,
                        ha="center", va="center", color="0.35")
            _finish(ax, "", "share (%)", "Solver and training failures", legend=False)
            if any(v for b in bars for v in b):  # a key to bars that are not drawn says nothing
                _figure_legend(fig, [ax])
        else:
            _strip(ax, spread, "std of test accuracy over seeds (points)",
                   "Seed spread per configuration")
    return fig


def _split_configurations(rows: Sequence[dict], fields: Sequence[str]) -> list[tuple]:
    """Per row, what tells its configuration apart from another one that shares its ``fields``
    (a directory shared by presets that differ in, e.g., epochs): ``(column, value)`` pairs of
    the columns that differ (the ``config_id`` when none is recorded), ``()`` when its
    ``fields`` hold one configuration only, whose seeds a line may then average."""
    same: dict[tuple, list[dict]] = {}
    for r in rows:
        same.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    out = []
    for r in rows:
        others = same[tuple(r.get(f) for f in fields)]
        if len({str(o.get("config_id")) for o in others}) < 2:
            out.append(())
            continue
        out.append(_tags(r, _distinguishing(others, skip=fields)))
    return out


@_styled
def plot_extrapolation(extra_rows: Sequence[dict]) -> Figure | None:
    """Test-time depth extrapolation: accuracy vs (test depth / training depth), a panel per
    label and a line per training depth. ``context=results_rows`` (a keyword) lets the title
    name what the extrapolation rows lack (image size; dataset and epochs in older files).

    Example:
        >>> rows = [{"label": "WT", "config_id": "a", "seed": 0, "train_depth": 4,
        ...          "test_depth": d, "factor": d / 4, "test_acc": .8} for d in (2, 4, 8)]
        >>> plot_extrapolation(rows).axes[0].get_title()
        'WT'
    """
    rows = []
    for r in extra_rows:  # a row without a factor: its test depth / training depth
        factor = number(r.get("factor"))
        if factor is None and number(r.get("test_depth")) and number(r.get("train_depth")):
            factor = number(r["test_depth"]) / number(r["train_depth"])
        if number(r.get("test_acc")) is not None and factor is not None:
            rows.append({**r, "factor": factor})
    labels = [lab for lab in _labels(rows)
              if len({r.get("factor") for r in rows if r.get("label") == lab}) >= 2]
    if not labels:
        return None
    ncols = min(len(labels), 4)  # more labels: more rows, not a strip too wide to print
    nrows = -(-len(labels) // ncols)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, (PANEL_SIZE[1] + 0.2) * nrows),
                 layout="constrained")
    axes = []
    for i, label in enumerate(labels):
        ax = fig.add_subplot(nrows, ncols, i + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        mine = [r for r in rows if r.get("label") == label]
        # one line per configuration (depth, width, masks): seeds are what a line averages
        fields = ("train_depth", "width", "mask_k", "mask_density")
        varies = {f for f in fields[1:] if len({r.get(f) for r in mine}) > 1}
        keys = [(*(r.get(f) for f in fields), extra)
                for r, extra in zip(mine, _split_configurations(mine, fields))]
        lines = sorted(set(keys), key=lambda k: (
            *(-1 if number(v) is None else number(v) for v in k[:-1]), str(k[-1])))
        for j, key in enumerate(lines):
            by_factor: dict[float, list[float]] = {}
            for r, row_key in zip(mine, keys):
                if row_key == key:
                    by_factor.setdefault(float(r["factor"]), []).append(_pct(r["test_acc"]))
            xs = sorted(by_factor)
            stats = [mean_std(by_factor[x]) for x in xs]
            depth, width, mask_k, density, extra = key
            name = (f"trained at {depth}" + (f", width {width}" if "width" in varies else "")
                    + (f", K={mask_k}" if "mask_k" in varies else "")
                    + (f", density {density}" if "mask_density" in varies else "")
                    + "".join(f", {column} {value}" for column, value in extra))
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats],
                        elinewidth=0.9, marker=_MARKERS[j % len(_MARKERS)],
                        color=_sequential(j, len(lines)),
                        linestyle=_LINESTYLES[j % len(_LINESTYLES)], label=name)
        ax.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
        # a ratio axis: halving and doubling the depth lie equally far from the training depth
        factors = sorted({r["factor"] for r in mine if math.isfinite(r["factor"])})
        if factors and factors[0] > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(factors)
            # 3 digits: 4/3 printed as 1.33333 ran over the 1.5 beside it
            ax.set_xticklabels([f"{v:.3g}" for v in factors])
            ax.minorticks_off()
        unit = "solver iterations" if mine[0].get("core") == "deq" else "depth"
        _finish(ax, f"test {unit} / training {unit}",
                ACC_LABEL if i % ncols == 0 else "", label, legend=False)
        # under the panel's axis label (a fixed 30 points below the axes, whatever their
        # height), not at "best" in it, over an error bar; long names one a row
        names = ax.get_legend_handles_labels()[1]
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-30, units="points"),
                  ncol=2 if max(map(len, names), default=0) <= 20 else 1)
    return fig


#: panel name -> function of the results rows (extrapolation reads its own file)
PANELS: dict[str, Callable[[Sequence[dict]], Figure | None]] = {
    "accuracy_vs_depth": plot_accuracy_vs_depth,
    "accuracy_vs_width": plot_accuracy_vs_width,
    "masks": plot_masks,
    "capacity": plot_capacity,
    "time_memory": plot_time_memory,
    "stability": plot_stability,
}


def figure_note(sweep_dir: str) -> str:
    """The end of a sweep's figure titles: its ``--set`` values (and smoke size) from
    ``sweep_setting.json``, less what :func:`describe_setting` already names (dataset, training
    images, image size, epochs); ``""`` for a default sweep. Pass it as ``note=`` to a panel.

    Example:
        >>> figure_note("/nonexistent")
        ''
    """
    return setting_note(sweep_dir, leave_out=("dataset", "train_size", "image_size", "epochs"))


def make_plots(sweep_dir: str, out_dir: str | None = None,
               mask_density: float | None = None) -> list[str]:
    """Draw every supported panel of a sweep as PNG, with a vector PDF beside each; returns
    the PNG paths written. A panel's files from an earlier run are removed when the results no
    longer support it.

    Args:
        sweep_dir: a directory with ``results.csv``.
        out_dir: where the PNGs and PDFs go (default ``sweep_dir/plots``).
        mask_density: the masks panel's per-depth comparison at this density only (default:
            one panel per density).

    Raises:
        ValueError: a damaged results file, or a ``mask_density`` the results do not have.

    Example:
        >>> make_plots("/nonexistent")
        []
    """
    rows = load_results(sweep_dir)
    note = figure_note(sweep_dir)
    panels = {**PANELS, "masks": lambda r, **kw: plot_masks(r, density=mask_density, **kw)}
    figures = {name: fn(rows, note=note) if rows else None for name, fn in panels.items()}
    # the extrapolation rows hold no image size (older files: no dataset or epochs): the
    # results rows do
    figures["extrapolation"] = plot_extrapolation(load_extrapolation(sweep_dir), context=rows,
                                                  note=note)
    out_dir = out_dir or os.path.join(sweep_dir, PLOTS)
    for name in [k for k, v in figures.items() if v is None]:
        # a panel the results no longer support (rows edited out, extrapolation.csv removed):
        # its figure from an earlier run would show numbers the CSV no longer holds
        for fmt in ("png", "pdf"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out_dir, f"{name}.{fmt}"))
    figures = {k: v for k, v in figures.items() if v is not None}
    if not figures:
        return []
    os.makedirs(out_dir, exist_ok=True)
    return [save_figure(fig, os.path.join(out_dir, f"{name}.png"))
            for name, fig in figures.items()]


def save_figure(fig: Figure, path: str, formats: Sequence[str] = ("png", "pdf")) -> str:
    """Write ``fig`` as ``path`` (a PNG at :data:`PNG_DPI`) and, beside it, in each other of
    ``formats`` (a vector PDF by default, with TrueType fonts and no creation date, so an
    unchanged figure rewrites the same bytes); each file atomically. Returns ``path``.

    Example:
        >>> import tempfile
        >>> fig = Figure()
        >>> _ = fig.add_subplot().plot([1, 2])
        >>> folder = tempfile.mkdtemp()
        >>> path = save_figure(fig, os.path.join(folder, "a.png"))
        >>> sorted(os.listdir(folder))
        ['a.pdf', 'a.png']
    """
    import matplotlib

    stem, _ = os.path.splitext(path)
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            # a temporary file of its own (two plot runs at once never write into one), moved
            # into place whole; removed when the write fails or is killed
            atomic_write(f"{stem}.{fmt}", lambda f, fmt=fmt: fig.savefig(
                f, format=fmt, dpi=PNG_DPI, metadata=metadata.get(fmt)))
    return path


#: what the ``±`` of the summary table and the error bars are
SPREAD_NOTE = ("Means over each configuration's clean seeds; ± (and each error bar) is the sample "
               "standard deviation (n − 1 denominator), none from a single seed.")


def write_summary(sweep_dir: str) -> str:
    """Write ``summary.csv`` and ``summary.md`` beside ``results.csv``; returns the Markdown.

    Example:
        >>> write_summary("/nonexistent")
        '(no finished runs)'
    """
    rows = load_results(sweep_dir)
    table = summary_table(rows)
    markdown = to_markdown(table)
    if table:
        markdown += "\n\n" + SPREAD_NOTE
        if note := setting_note(sweep_dir):
            markdown += f" Every run of this directory: {note} ({SETTING})."
        write_rows(os.path.join(sweep_dir, "summary.csv"), to_csv_rows(table))
        atomic_write_text(os.path.join(sweep_dir, "summary.md"), markdown + "\n")
    return markdown


def make_report(sweep_dir: str, mask_density: float | None = None) -> tuple[list[str], str]:
    """Plots and summary table of a sweep: ``(png paths, markdown table)`` (``mask_density``:
    see :func:`make_plots`).

    Example:
        >>> make_report("/nonexistent")
        ([], '(no finished runs)')
    """
    return make_plots(sweep_dir, mask_density=mask_density), write_summary(sweep_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.plot DIR``: plots and summary table; prints the table.

    Example (a folder without ``results.csv``: one line on stderr, exit status 2):
        >>> import tempfile
        >>> main([tempfile.mkdtemp()])
        2
    """
    parser = DashValueParser(prog="python -m benchmarks.plot",
                                     description="Plots and summary table of a sweep directory.")
    parser.add_argument("sweep_dir", help="a directory with results.csv")
    parser.add_argument("--mask-density", type=float, default=None, metavar="D",
                        help="compare no / shared / distinct masks at this density only "
                             "(default: one panel per density)")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.sweep_dir, RESULTS)):
        print(f"python -m benchmarks.plot: error: sweep_dir: no {RESULTS} in {args.sweep_dir!r}",
              file=sys.stderr)
        return 2
    try:
        paths, table = make_report(args.sweep_dir, mask_density=args.mask_density)
    except ValueError as err:  # a damaged results file, a density the results do not have
        print(f"python -m benchmarks.plot: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only sweep directory, a file where plots/ goes ...
        where = err.filename2 or err.filename or args.sweep_dir
        print(f"python -m benchmarks.plot: error: cannot write {where}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 2
    print(table)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    exit_with(main)
