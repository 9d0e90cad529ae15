"""benchmarks/plot.py and notebooks/guidelines.ipynb: what the figures draw is
read back from the matplotlib artists and compared with means / sample stds worked out by hand
from a results.csv the test writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from benchmarks import plot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(folder, rows, name="results.csv"):
    os.makedirs(folder, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(os.path.join(folder, name), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


def _row(run_id, label, seed, test_acc, **config):
    return {"run_id": run_id, "label": label, "seed": seed, "test_acc": test_acc, **config}


def _bars(container):
    """(x, y, low, high) per point of an errorbar container."""
    data, _, cols = container.lines
    segments = cols[0].get_segments() if cols else []
    out = []
    for i, (x, y) in enumerate(data.get_xydata().tolist()):
        low, high = (segments[i][0][1], segments[i][1][1]) if segments else (y, y)
        out.append((x, y, low, high))
    return out


def _cli(folder, *args):
    return subprocess.run([sys.executable, "-m", "benchmarks.plot", str(folder), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_depth_plot_points_and_bars_are_the_hand_computed_means_and_stds(tmp_path):
    # WT at depths given out of order, 3 seeds: means 82 / 86 / 93, sample stds 2 / sqrt(3) /
    # sqrt(13) points (n - 1)
    accs = {4: (0.90, 0.92, 0.97), 1: (0.80, 0.84, 0.82), 2: (0.85, 0.85, 0.88)}
    rows = [_row(f"wt{d}{s}", "WT", s, a, config_id=f"wt{d}", core="unrolled", depth=d, width=8,
                 mask_k=0) for d, acc in accs.items() for s, a in enumerate(acc)]
    fig = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows)))
    (container,) = fig.axes[0].containers
    assert container.get_label() == "WT"
    want = [(1, 82.0, 2.0), (2, 86.0, 3 ** 0.5), (4, 93.0, 13 ** 0.5)]
    for (x, y, low, high), (wx, wy, ws) in zip(_bars(container), want, strict=True):
        assert (x, y) == pytest.approx((wx, wy))
        assert (low, high) == pytest.approx((wy - ws, wy + ws))


def test_depth_plot_bands_of_one_label_with_two_gradients_are_told_apart(tmp_path):
    """Two DEQ configurations of one label (grad ift / phantom) drew two bands with the same
    legend text, line style and colour: the reader could not tell which was which."""
    rows = [_row(f"wt{d}{s}", "WT", s, 0.8 + 0.01 * d, config_id=f"wt{d}", core="unrolled",
                 depth=d, width=8, mask_k=0) for d in (2, 4) for s in (0, 1)]
    rows += [_row(f"deq-{g}{s}", "DEQ", s, a, config_id=f"deq-{g}", core="deq", depth=6,
                  width=8, mask_k=0, grad=g)
             for g, accs in (("ift", (0.70, 0.74)), ("phantom", (0.60, 0.66)))
             for s, a in enumerate(accs)]
    ax = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows))).axes[0]
    bands = {line.get_label(): line for line in ax.get_lines() if "no depth axis" in
             line.get_label()}
    assert len(bands) == 2, list(bands)
    ift = next(line for name, line in bands.items() if "ift" in name)
    phantom = next(line for name, line in bands.items() if "phantom" in name)
    assert ift.get_ydata()[0] == pytest.approx(72.0)
    assert phantom.get_ydata()[0] == pytest.approx(63.0)
    assert ift.get_linestyle() != phantom.get_linestyle()


def test_text_in_a_numeric_column_is_one_line_and_exit_2(tmp_path):
    """A hand-edited depth of 'x' stopped the plot with a TypeError traceback (exit 1)."""
    rows = [_row(f"a{d}{s}", "WT", s, 0.5, depth=d, width=8) for d in ("x", 2) for s in (0, 1)]
    result = _cli(_write(tmp_path, rows))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "line 2: depth is 'x', not a finite number" in result.stderr
    # epochs of nan: 'cannot convert float NaN to integer', naming neither file nor column
    rows = [_row(f"a{d}{s}", "WT", s, 0.5, depth=d, width=8, epochs="nan" if d == 4 else 3)
            for d in (2, 4) for s in (0, 1)]
    result = _cli(_write(tmp_path / "nan", rows))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "line 4: epochs is nan, not a finite number" in result.stderr


def test_extrapolation_points_are_hand_computed_means_and_a_missing_factor_is_derived(tmp_path):
    """A row without a factor stopped the plot with a TypeError; the points are means over the
    seeds at each factor, the bars sample stds (n - 1)."""
    folder = _write(tmp_path, [_row("a", "WT", 0, 0.5, depth=2, width=8)])
    extra = [{"key": f"k{s}{t}", "run_id": f"r{s}", "label": "WT", "config_id": "c",
              "seed": s, "train_depth": 2, "test_depth": t,
              "factor": "" if t == 4 else t / 2, "test_acc": acc}
             for s, accs in enumerate(((0.40, 0.50, 0.30), (0.44, 0.60, 0.20)))
             for t, acc in zip((1, 2, 4), accs)]
    _write(tmp_path, extra, "extrapolation.csv")
    fig = plot.plot_extrapolation(plot.load_extrapolation(folder))
    (container,) = fig.axes[0].containers
    got = _bars(container)
    want = [(0.5, 42.0, 2 * 2 ** 0.5), (1.0, 55.0, 5 * 2 ** 0.5), (2.0, 25.0, 5 * 2 ** 0.5)]
    for (x, y, low, high), (wx, wy, ws) in zip(got, want, strict=True):
        assert (x, y, low, high) == pytest.approx((wx, wy, wy - ws, wy + ws))
    assert fig.axes[0].get_xscale() == "log"  # a ratio axis: 0.5 and 2 equally far from 1
    result = _cli(folder)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(folder, "plots", "extrapolation.png"))


def test_time_axis_is_log_only_when_every_value_is_positive(tmp_path):
    """A run with a training time of 0 s beside 10 s and 1000 s gave a log axis, on which its
    point vanished."""
    rows = [_row(f"{lab}{t}", lab, 0, 0.5 + 0.1 * i, config_id=f"{lab}{t}", train_time_s=t)
            for lab, times in (("WT", (0, 10)), ("untied", (1000,)))
            for i, t in enumerate(times)]
    ax = plot.plot_time_memory(plot.load_results(_write(tmp_path, rows))).axes[0]
    assert ax.get_xscale() == "linear"
    xs = sorted(x for c in ax.containers for x, *_ in _bars(c))
    assert xs == [0, 10, 1000]
    rows = [dict(r, train_time_s=r["train_time_s"] + 1) for r in rows]  # 1, 11, 1001 s: log
    ax = plot.plot_time_memory(plot.load_results(_write(tmp_path / "b", rows))).axes[0]
    assert ax.get_xscale() == "log"


def _mask_rows(epochs, base, depths=(2, 4), ks=None):
    rows = []

    def add(label, core, depth, k, density, accs):
        for s, a in enumerate(accs):
            rows.append(_row(f"{label}-{depth}-{k}-{epochs}-{s}", label, s, a, dataset="digits",
                             config_id=f"{label}-{depth}-{k}-{epochs}", core=core,
                             depth=depth, width=32, mask_k=k, mask_density=density,
                             epochs=epochs))
    if ks is None:
        for d in depths:
            add("WT", "unrolled", d, 0, None, (base, base + 0.02))
            add("WT + distinct masks", "unrolled", d, d, 0.5, (base + 0.01, base + 0.03))
            add("untied", "untied", d, 0, None, (base + 0.04, base + 0.06))
    else:
        for k in ks:
            add("WT + masks" if k else "WT", "unrolled", 4, k, 0.5 if k else None,
                (base + 0.01 * k, base + 0.01 * k + 0.02))
    return rows


def test_masks_panels_keep_presets_sharing_a_directory_apart(tmp_path):
    """Two presets in one directory (15 and 20 epochs, README: 'presets sharing a directory
    get separate lines'): the per-depth comparison drew the first-seen preset only, and the
    K curve joined both presets' points into one zigzag line with two 'no mask' bands."""
    rows = _mask_rows(15, 0.60) + _mask_rows(20, 0.90)
    fig = plot.plot_masks(plot.load_results(_write(tmp_path, rows)))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and titles[0].endswith("epochs 15") and titles[1].endswith(
        "epochs 20"), titles
    for ax, base in zip(fig.axes, (61.0, 91.0)):  # no mask: base + 1 point (mean of 2 seeds)
        by_label = {c.get_label(): _bars(c) for c in ax.containers}
        assert [y for _, y, *_ in by_label["no mask"]] == pytest.approx([base, base])
        assert [y for _, y, *_ in by_label["distinct masks (K = depth)"]] == pytest.approx(
            [base + 1, base + 1])
        assert [y for _, y, *_ in by_label["untied"]] == pytest.approx([base + 4, base + 4])
        low, high = by_label["untied"][0][2:]
        assert high - low == pytest.approx(2 * 2 ** 0.5)  # std of (0.04, 0.06) in points
    rows = _mask_rows(15, 0.60, ks=(0, 1, 2, 4)) + _mask_rows(20, 0.90, ks=(0, 1, 2, 4))
    fig = plot.plot_masks(plot.load_results(_write(tmp_path / "k", rows)))
    curves = [ax for ax in fig.axes if ax.get_title().startswith("Masks at depth 4")]
    assert [ax.get_title() for ax in curves] == ["Masks at depth 4, width 32, epochs 15",
                                                 "Masks at depth 4, width 32, epochs 20"]
    for ax, base in zip(curves, (60.0, 90.0)):
        (container,) = ax.containers
        assert [v for x, y, *_ in _bars(container) for v in (x, y)] == pytest.approx(
            [1, base + 2, 2, base + 3, 4, base + 5])
        bands = [line for line in ax.get_lines() if line.get_label() == "no mask"]
        assert len(bands) == 1 and bands[0].get_ydata()[0] == pytest.approx(base + 1)


def test_time_memory_bars_are_sample_stds_in_both_directions(tmp_path):
    rows = [_row(f"{lab}{s}", lab, s, acc, config_id=lab, train_time_s=t, peak_mem_mb=m)
            for lab, data in (("WT", ((0.80, 10.0, 100.0), (0.84, 14.0, 110.0))),
                              ("DEQ", ((0.70, 30.0, 200.0), (0.70, 36.0, 230.0))))
            for s, (acc, t, m) in enumerate(data)]
    fig = plot.plot_time_memory(plot.load_results(_write(tmp_path, rows)))
    time_ax, mem_ax = fig.axes
    for ax, want in ((time_ax, {"WT": (12.0, 2 * 2 ** 0.5, 82.0, 2 * 2 ** 0.5),
                                "DEQ": (33.0, 3 * 2 ** 0.5, 70.0, 0.0)}),
                     (mem_ax, {"WT": (105.0, 5 * 2 ** 0.5, 82.0, 2 * 2 ** 0.5),
                               "DEQ": (215.0, 15 * 2 ** 0.5, 70.0, 0.0)})):
        for container in ax.containers:
            x0, xs, y0, ys = want[container.get_label()]
            data, _, (xbars, ybars) = container.lines
            assert data.get_xydata().ravel().tolist() == pytest.approx([x0, y0])
            (xseg,) = xbars.get_segments()
            (yseg,) = ybars.get_segments()
            assert [xseg[0][0], xseg[1][0]] == pytest.approx([x0 - xs, x0 + xs])
            assert [yseg[0][1], yseg[1][1]] == pytest.approx([y0 - ys, y0 + ys])


def test_stability_bars_are_the_hand_computed_shares(tmp_path):
    rows = [_row(f"deq{s}", "DEQ", s, 0.7, config_id="deq", core="deq", converged=c,
                 diverged=dv, skipped_steps=sk, status=st, rel_residual=1e-3)
            for s, (c, dv, sk, st) in enumerate(((0.9, 0.0, 0, "ok"), (0.8, 0.1, 3, "ok"),
                                                  (0.7, 0.2, 0, "diverged")))]
    rows += [_row(f"wt{s}", "WT", s, 0.8 + 0.02 * s, config_id="wt", core="unrolled",
                  skipped_steps=0, status="ok") for s in range(2)]
    fig = plot.plot_stability(plot.load_results(_write(tmp_path, rows)))
    residual_ax, failure_ax, spread_ax = fig.axes
    names = [t.get_text() for t in failure_ax.get_xticklabels()]
    assert names == ["WT", "DEQ"]
    heights = [bar.get_height() for c in failure_ax.containers for bar in c]
    # not converged, diverged solves, runs with skipped steps, runs stopped: WT then DEQ
    assert heights == pytest.approx([0, 20.0, 0, 10.0, 0, 100 / 3, 0, 100 / 3])
    # seed spread: WT's sample std 1.414 points; DEQ has one clean seed's worth of accuracy
    # twice (0.7, 0.7): std 0
    from matplotlib.collections import PathCollection

    points = [y for o in spread_ax.collections if isinstance(o, PathCollection)
              for _, y in o.get_offsets()]
    assert sorted(points) == pytest.approx([0.0, 2 ** 0.5])


def test_extrapolation_title_reads_the_image_size_from_the_results_rows(tmp_path):
    """The notebook drew the extrapolation panel without the results rows, so its title lacked
    what only they hold (image size): '14×14 px' was in make_plots' figure, not the notebook's."""
    rows = [_row("a", "WT", 0, 0.5, depth=2, width=8, dataset="fashion_mnist", image_size=14)]
    extra = [{"key": f"k{t}", "run_id": "a", "label": "WT", "config_id": "c", "seed": 0,
              "dataset": "fashion_mnist", "train_depth": 2, "test_depth": t, "factor": t / 2,
              "test_acc": 0.5} for t in (1, 2, 4)]
    fig = plot.plot_extrapolation(extra, context=rows)
    assert fig._suptitle.get_text().startswith("Fashion-MNIST, 14×14 px")
    source = "".join(c["source"] for c in _notebook()["cells"] if c["cell_type"] == "code")
    assert "plot.plot_extrapolation(extrapolation, context=rows, note=note)" in source


def _notebook():
    import nbformat

    return nbformat.read(os.path.join(ROOT, "notebooks", "guidelines.ipynb"), as_version=4)


def test_notebook_runs_on_the_committed_results_and_prints_the_csv_numbers(monkeypatch):
    """Top to bottom on the committed quick sweep: its run counts, summary accuracies and
    recommendation are the numbers worked out here from results.csv with the csv module."""
    import statistics
    from collections import Counter

    import nbclient

    folder = os.path.join(ROOT, "benchmarks", "results", "quick")
    with open(os.path.join(folder, "results.csv"), newline="") as f:
        results = list(csv.DictReader(f))
    with open(os.path.join(folder, "extrapolation.csv"), newline="") as f:
        n_extra = sum(1 for _ in csv.DictReader(f))
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config_id"], []).append(r)
    want = Counter()
    for runs in by_config.values():
        accs = [100 * float(r["test_acc"]) for r in runs]
        want[(runs[0]["label"], f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}")] += 1
    monkeypatch.setenv("WTMODELS_RESULTS", folder)
    nb = _notebook()
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={
        "metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{len(results)} runs, {n_extra} extrapolation rows" in text
    (table,) = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    acc = lines[0].index("test acc %")
    assert Counter((cells[0], cells[acc]) for cells in lines[2:]) == want
    budget = statistics.median(float(r["params"]) for r in results)
    assert f"budget: {budget:.0f} parameters" in text
    # within 0.5 points of the best (99.7, distinct masks at depth 8) at the budget's 112298
    # parameters, the fewest cell evaluations (4) and no masks: WT at depth 2
    wt2 = [100 * float(r["test_acc"]) for r in results if r["label"] == "WT" and r["depth"] == "2"]
    assert (f"recommended: WT, depth 2, width 32: {statistics.mean(wt2):.1f} ± "
            f"{statistics.stdev(wt2):.1f} % over 2 seed(s), {budget:.0f} params") in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 6  # no width sweep


def test_save_figure_never_puts_a_half_written_file_under_the_final_name(tmp_path):
    """A kill mid-write leaves the old figure (and no temporary file); and two plot runs at
    once (two sweeps into one directory) no longer share one temporary name, where one run's
    os.replace moved the other's half-written PNG under the final name."""
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([1, 2])
    path = str(tmp_path / "a.png")
    plot.save_figure(fig, path)
    before = open(path, "rb").read()
    assert before.startswith(b"\x89PNG")

    def killed(target, **kwargs):  # a kill after half the bytes
        (target.write if hasattr(target, "write") else open(target, "wb").write)(before[:50])
        raise KeyboardInterrupt

    original = fig.savefig
    fig.savefig = killed
    with pytest.raises(KeyboardInterrupt):
        plot.save_figure(fig, path)
    assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["a.pdf",
                                                                                 "a.png"]

    # two runs at once: A writes all its bytes; B then starts writing its own (half) before A
    # moves its file into place; B is killed later
    import threading

    a_written, b_started, a_done = threading.Event(), threading.Event(), threading.Event()

    def run_a(target, **kwargs):
        original(target, **kwargs)
        a_written.set()
        assert b_started.wait(10)

    def run_b(target, **kwargs):
        assert a_written.wait(10)
        (target.write if hasattr(target, "write") else open(target, "wb").write)(b"\x89PNG half")
        if hasattr(target, "flush"):
            target.flush()
        b_started.set()
        assert a_done.wait(10)
        raise KeyboardInterrupt

    other = Figure()
    other.add_subplot()
    other.savefig = run_b
    errors = []

    def b():
        try:
            plot.save_figure(other, path, formats=("png",))
        except KeyboardInterrupt:
            pass
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=b)
    thread.start()
    fig.savefig = run_a
    try:
        plot.save_figure(fig, path, formats=("png",))
    finally:
        a_done.set()
        thread.join(10)
    assert not errors
    assert open(path, "rb").read() == before  # A's whole figure, not B's half
    assert sorted(os.listdir(tmp_path)) == ["a.pdf", "a.png"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_depth_legend_lists_the_families_in_the_order_of_every_figure(tmp_path):
    """The committed Fashion figure listed 'DEQ (no depth axis)' first and 'WT + distinct
    masks' before 'WT' (the order of the CSV and of matplotlib's artist types), unlike the
    other figures' legends (WT, WT + distinct masks, WT + shared mask, untied, DEQ)."""
    rows = []
    for label, core, k in (("DEQ", "deq", 0), ("WT + distinct masks", "unrolled", "D"),
                           ("untied", "untied", 0), ("WT", "unrolled", 0),
                           ("WT + shared mask", "unrolled", 1)):
        for d in ((6,) if core == "deq" else (4, 2)):
            for width in ((8,) if core == "deq" else (16, 8)):
                rows.append(_row(f"{label}{d}{width}", label, 0, 0.5,
                                 config_id=f"{label}{d}{width}", core=core, depth=d,
                                 width=width, mask_k=d if k == "D" else k))
    ax = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows))).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["WT, width 8", "WT, width 16", "WT + distinct masks, width 8",
                     "WT + distinct masks, width 16", "WT + shared mask, width 8",
                     "WT + shared mask, width 16", "untied, width 8", "untied, width 16",
                     "DEQ, width 8 (no depth axis)"]
    # each entry's handle has its family's colour
    from matplotlib.colors import to_hex

    for handle, text in zip(ax.get_legend().legend_handles, texts):
        color = handle.get_color() if hasattr(handle, "get_color") else handle.get_facecolor()
        assert to_hex(color) == plot.LABEL_COLORS[plot.label_family(text)].lower(), text


def test_capacity_frontier_is_each_labels_pareto_front_of_the_seed_means(tmp_path):
    configs = {("WT", 2): (100, (0.80, 0.82)), ("WT", 4): (100, (0.85, 0.87)),
               ("untied", 2): (200, (0.84, 0.84)), ("untied", 4): (400, (0.90, 0.92)),
               ("untied", 8): (800, (0.88, 0.88))}
    rows = [_row(f"{lab}{d}{s}", lab, s, a, config_id=f"{lab}{d}", depth=d, params=p)
            for (lab, d), (p, accs) in configs.items() for s, a in enumerate(accs)]
    ax = plot.plot_capacity(plot.load_results(_write(tmp_path, rows))).axes[0]
    fronts = {c.get_label(): _bars(c) for c in ax.containers}
    # WT: both at 100 parameters, the better one (86 %) is the front; untied: 800 is beaten
    r2 = 2 ** 0.5  # the sample std of two seeds 2 points apart
    assert [v for p in fronts["WT"] for v in p] == pytest.approx([100, 86, 86 - r2, 86 + r2])
    assert [v for p in fronts["untied"] for v in p] == pytest.approx(
        [200, 84, 84, 84, 400, 91, 91 - r2, 91 + r2])
    from matplotlib.collections import PathCollection

    faint = sorted(tuple(xy) for c in ax.collections if isinstance(c, PathCollection)
                   for xy in c.get_offsets().tolist())
    assert [v for xy in faint for v in xy] == pytest.approx(
        [100, 81, 100, 86, 200, 84, 400, 91, 800, 88])
    assert ax.get_xscale() == "log"


def test_one_seed_per_configuration_is_said_so_in_the_title(tmp_path):
    """A sweep of one seed was titled 'mean ± 1 sample std (n − 1) over 1 seeds' over points
    that have no error bars."""
    rows = [_row(f"{lab}{d}", lab, 0, 0.5 + 0.01 * d, config_id=f"{lab}{d}", depth=d, width=8,
                 train_time_s=d) for lab in ("WT", "untied") for d in (1, 2)]
    fig = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows)))
    assert fig.get_suptitle() == "1 seed per configuration (no error bars)"
    for container in fig.axes[0].containers:
        assert all(low == high for _, _, low, high in _bars(container))


def test_a_panel_the_results_no_longer_support_leaves_no_stale_figure(tmp_path):
    """Rows edited out of results.csv (one depth left): the depth figure of the earlier run
    stayed in plots/, showing points the CSV no longer holds."""
    rows = [_row(f"wt{d}{s}", "WT", s, 0.5 + 0.01 * d, config_id=f"wt{d}", depth=d, width=8)
            for d in (1, 2) for s in (0, 1)]
    folder = _write(tmp_path, rows)
    other = os.path.join(folder, "plots", "mine.png")
    drawn = [os.path.basename(p) for p in plot.make_plots(folder)]
    assert drawn == ["accuracy_vs_depth.png", "stability.png"]  # stability: the seed spread
    open(other, "w").close()  # a file of the user's: kept
    _write(tmp_path, [r for r in rows if r["depth"] == 1])
    assert [os.path.basename(p) for p in plot.make_plots(folder)] == ["stability.png"]
    assert sorted(os.listdir(os.path.join(folder, "plots"))) == ["mine.png", "stability.pdf",
                                                                 "stability.png"]


def test_lines_of_one_label_from_two_presets_differ_in_colour_and_hold_their_own_points(tmp_path):
    """quick (15 epochs) and depth (20 epochs) share a directory: 'WT (epochs 15)' and 'WT
    (epochs 20)' were two lines of one colour, marker and style: only the legend text differed,
    and it could not say which line was which."""
    rows = [_row(f"wt{e}-{d}-{s}", "WT", s, base + 0.01 * d + 0.02 * s, config_id=f"wt{e}-{d}",
                 core="unrolled", depth=d, width=32, mask_k=0, epochs=e, dataset="digits")
            for e, base in ((15, 0.6), (20, 0.9)) for d in (2, 4) for s in (0, 1)]
    ax = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows))).axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    assert sorted(lines) == ["WT (epochs 15)", "WT (epochs 20)"]
    for name, base in (("WT (epochs 15)", 61.0), ("WT (epochs 20)", 91.0)):
        got = [v for x, y, *_ in _bars(lines[name]) for v in (x, y)]
        assert got == pytest.approx([2, base + 2, 4, base + 4])
    colors = {lines[n].lines[0].get_color() for n in lines}
    assert len(colors) == 2 and plot.LABEL_COLORS["WT"] in colors


def test_family_variants_wear_no_other_familys_marker():
    """'DEQ anderson / ift' wore WT's circle, 'DEQ broyden / phantom' untied's diamond: in
    grey print (or for a colour-blind reader) the DEQ variant and WT were one symbol."""
    variants = [f"DEQ {s} / {g}" for s in ("anderson", "broyden") for g in ("ift", "phantom")]
    markers = [plot.label_marker(v) for v in variants]
    assert len(set(markers)) == 4
    taken = {m for family, m in plot.LABEL_MARKERS.items() if family != "DEQ"}
    assert not set(markers) & taken, markers
    assert not {plot.label_marker(x) for x in ("MLP", "ResNet")} & set(
        plot.LABEL_MARKERS.values())


def test_labels_outside_every_family_all_wear_a_marker():
    """The first label outside every family (the first one seen in a process) was drawn
    without a marker: its marker came out None."""
    saved = dict(plot._ASSIGNED)
    plot._ASSIGNED.clear()  # a fresh process: no label seen yet
    try:
        outside = [plot.label_marker(x) for x in ("MLP", "ResNet", "ViT")]
    finally:
        plot._ASSIGNED.clear()
        plot._ASSIGNED.update(saved)
    assert all(isinstance(m, str) and m for m in outside), outside
    assert len(set(outside)) == 3 and not set(outside) & set(plot.LABEL_MARKERS.values())


def test_a_fixed_mask_count_keeps_its_point_where_it_equals_the_depth(tmp_path):
    """K = 4 at depths 2, 4, 8: at depth 4 (K == depth) the point was filed under 'K = depth'
    and vanished from the K = 4 line."""
    rows = [_row(f"m{d}{s}", "WT + distinct masks", s, 0.8 + 0.01 * d + 0.02 * s,
                 config_id=f"m{d}", core="unrolled", depth=d, width=8, mask_k=4,
                 mask_density=0.5) for d in (2, 4, 8) for s in (0, 1)]
    rows += [_row(f"d{d}{s}", "WT + masks", s, 0.7 + 0.01 * d, config_id=f"d{d}",
                  core="unrolled", depth=d, width=8, mask_k=d, mask_density=0.5)
             for d in (2, 4, 8) for s in (0, 1)]
    ax = plot.plot_accuracy_vs_depth(plot.load_results(_write(tmp_path, rows))).axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    assert sorted(lines) == ["WT + distinct masks", "WT + masks"]
    got = [v for x, y, *_ in _bars(lines["WT + distinct masks"]) for v in (x, y)]
    assert got == pytest.approx([2, 83, 4, 85, 8, 89])
    got = [v for x, y, *_ in _bars(lines["WT + masks"]) for v in (x, y)]  # K = depth: one line
    assert got == pytest.approx([2, 72, 4, 74, 8, 78])
