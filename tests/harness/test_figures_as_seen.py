"""The figures as a reader sees them, checked through matplotlib objects (axis
limits, legends' places, titles, artists) on small hand-made rows: no accuracy axis past 100 %,
no legend over the data, no axes title contradicting the figure's title, no point hidden under
a bar, no unlabelled end of a log axis, no key to bars that are not drawn."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PathCollection

from benchmarks import plot


def _row(label, depth, seed, acc, **extra):
    return {"run_id": f"{label}-{depth}-{seed}-{extra.get('mask_k', 0)}-"
                      f"{extra.get('mask_density', '')}", "label": label, "depth": depth,
            "width": 16, "seed": seed, "test_acc": acc, "status": "ok", **extra}


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _renderer(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_accuracy_axis_ends_at_100_percent():
    # WT depth 2: 99.5 and 100.0 -> mean 99.75, std 0.354: the bar reached 100.10 and the
    # axis was labelled up to 100.25 %, an accuracy no model has
    rows = [_row("WT", 2, 0, 0.995), _row("WT", 2, 1, 1.0), _row("WT", 4, 0, 0.98),
            _row("WT", 4, 1, 0.99), _row("untied", 2, 0, 0.97), _row("untied", 2, 1, 0.98),
            _row("untied", 4, 0, 0.97), _row("untied", 4, 1, 0.96)]
    for r in rows:
        r.update(train_time_s=10.0 * r["depth"] + r["seed"], peak_mem_mb=800.0 + r["depth"])
    ax = plot.plot_accuracy_vs_depth(rows).axes[0]
    assert ax.get_ylim()[1] == 100.0
    assert ax.get_ylim()[0] < 96.0  # the lowest point, 96.5 - 0.71, is kept
    # time / memory panels share the accuracy axis: every one of them ends at 100 too
    for ax in plot.plot_time_memory(rows).axes:
        assert ax.get_ylim()[1] == 100.0


def test_legend_of_the_depth_figure_is_beside_the_axes_not_over_the_data():
    # four entries (quick: WT, WT + distinct masks, untied, DEQ band) went inside at "best",
    # over the DEQ band at depth 8
    rows = []
    for label, accs in (("WT", (0.99, 0.98, 0.97)), ("untied", (0.985, 0.98, 0.99)),
                        ("WT + distinct masks", (0.99, 0.992, 0.995))):
        for depth, acc in zip((2, 4, 8), accs):
            k = {"mask_k": depth, "mask_density": 0.5} if "masks" in label else {}
            rows += [_row(label, depth, s, acc + 0.001 * s, **k) for s in (0, 1)]
    rows += [dict(_row("DEQ", "", s, 0.99), core="deq", run_id=f"deq{s}") for s in (0, 1)]
    fig = plot.plot_accuracy_vs_depth(rows)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "WT", "WT + distinct masks", "untied", "DEQ (no depth axis)"]
    renderer = _renderer(fig)
    assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_axes_title_does_not_claim_error_bars_of_one_seed():
    # one seed per configuration: the figure title said "no error bars" while the panel's
    # title said "mean ± sample std over seeds"
    rows = [_row("WT", d, 0, a) for d, a in ((2, 0.8), (4, 0.85))]
    fig = plot.plot_accuracy_vs_depth(rows)
    assert fig.axes[0].get_title() == "Accuracy vs depth, width 16"
    assert fig.get_suptitle().endswith("1 seed per configuration (no error bars)")


def test_seed_spread_point_of_a_lone_configuration_is_not_under_a_bar():
    # deq_vs_wt: one configuration per label, so its single std sat hidden under the black
    # mean bar; with two configurations the bar (mean of 1.0 and 2.0 points = 1.5) is drawn
    # under the points
    rows = [_row("WT", 8, s, a) for s, a in ((0, 0.90), (1, 0.92))]          # std 1.414
    rows += [_row("untied", 4, s, a) for s, a in ((0, 0.90), (1, 0.91))]      # std 0.707
    rows += [_row("untied", 8, s, a) for s, a in ((0, 0.90), (1, 0.93))]      # std 2.121
    ax = plot.plot_stability(rows).axes[-1]
    assert ax.get_title() == "Seed spread per configuration"
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(bars) == 1  # untied's two configurations only
    (segment,) = bars[0].get_segments()
    assert abs(segment[0][1] - (0.7071 + 2.1213) / 2) < 1e-3
    assert all(p.get_zorder() > bars[0].get_zorder() and not p.get_clip_on() for p in points)


def test_log_parameter_axis_starts_and_ends_at_labelled_ticks():
    # fashion: every weight-tied model at 63k parameters stood left of the first label (100k)
    rows = [_row("WT", 2, s, 0.80, params=63000) for s in (0, 1)]
    rows += [_row("untied", 8, s, 0.81, params=429000) for s in (0, 1)]
    fig = plot.plot_capacity(rows)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlim() == (50000.0, 500000.0)  # 63000 / 1.04 -> 50k; 429000 * 1.04 -> 500k
    _renderer(fig)
    labels = {t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()
              if t.get_text()}
    assert {"50k", "500k", "100k"} <= labels


def test_empty_failures_panel_has_no_key_to_bars():
    # sparsity: "no failures in any run" above a legend of four bar kinds none of which is drawn
    rows = [_row(lab, 8, s, 0.8 + 0.01 * s, skipped_steps=0) for lab in ("WT", "untied")
            for s in (0, 1)]
    fig = plot.plot_stability(rows)
    panel = [ax for ax in fig.axes if ax.get_title() == "Solver and training failures"][0]
    assert [t.get_text() for t in panel.texts] == ["no failures in any run"]
    assert fig.legends == []
    rows[0]["skipped_steps"] = 3  # one run of WT: 1 of 2 runs with skipped steps, 50 %
    fig = plot.plot_stability(rows)
    assert "runs with skipped steps (%)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_mask_curve_legends_are_under_their_panels():
    # sparsity_fashion: the K and density panels' legends sat over error bars and the bands
    rows = [_row("WT", 8, s, 0.796 + 0.001 * s) for s in (0, 1)]
    rows += [_row("untied", 8, s, 0.81 + 0.001 * s) for s in (0, 1)]
    for k in (1, 2, 4, 8):
        for density in (0.25, 0.5):
            rows += [_row("WT + distinct masks", 8, s, 0.79 + 0.002 * k + 0.001 * s,
                          mask_k=k, mask_density=density) for s in (0, 1)]
    fig = plot.plot_masks(rows)
    renderer = _renderer(fig)
    curves = [ax for ax in fig.axes if ax.get_title().startswith(("Masks at", "Density at"))]
    assert len(curves) == 2
    for ax in curves:
        legend = ax.get_legend()
        assert "no mask" in [t.get_text() for t in legend.get_texts()]
        box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not _overlaps(box, frame) and box.y1 <= frame.y0


def test_lines_meeting_at_one_depth_are_drawn_apart_with_their_whole_bars_in_view():
    # WT and untied share every depth: their markers and error bars were drawn on top of each
    # other; each series is now shifted a few points (its data, and the ticks, stay at 2 / 4)
    rows = [_row(label, depth, s, acc + 0.02 * s)
            for label, acc in (("WT", 0.9), ("untied", 0.9)) for depth in (2, 4)
            for s in (0, 1)]
    fig = plot.plot_accuracy_vs_depth(rows)
    _renderer(fig)
    ax = fig.axes[0]
    series = [c for c in ax.containers if c.get_label() in ("WT", "untied")]
    lines = [c.lines[0] for c in series]
    assert [list(line.get_xdata()) for line in lines] == [[2, 4], [2, 4]]
    drawn = [line.get_transform().transform(list(zip(line.get_xdata(), line.get_ydata())))
             for line in lines]
    assert drawn[0][0][1] == drawn[1][0][1]  # same mean: same height on the page
    assert drawn[1][0][0] - drawn[0][0][0] >= 3.0  # but pixels apart
    bars = [c.lines[2][0] for c in series]
    xs = {round(float(seg[0][0]), 6) for c in bars for seg in
          (c.get_transform().transform(s) for s in c.get_segments())}
    assert len(xs) == 4  # four bars at four places on the page, not two
    # the bars' ends (mean 91 +- 1.41 points) stay inside the axis
    low, high = ax.get_ylim()
    assert low < 91.0 - 1.41 and high > 91.0 + 1.41


def test_every_dodged_series_stays_inside_a_narrow_axis():
    # six lines on a log width axis whose legend (with the long key to the red x of one
    # diverged run) narrows the panel to ~165 px: the outermost series sit 12 points (half the
    # 24-point dodge) beyond widths 8 and 64, and the fixed 8 % margin (~8 points here) drew
    # their first / last markers and bars outside the axis
    rows = [_row(label, depth, s, 0.9 + 0.01 * s, width=w,
                 **({"mask_k": depth, "mask_density": 0.5} if "masks" in label else {}))
            for label in ("WT", "WT + distinct masks", "untied") for depth in (2, 4)
            for w in (8, 16, 32, 64) for s in (0, 1)]
    rows[7]["status"] = "diverged"  # WT, depth 2, width 64, seed 1
    fig = plot.plot_accuracy_vs_width(rows)
    renderer = _renderer(fig)
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    series = [c for c in ax.containers if c.get_label().startswith(("WT", "untied"))]
    assert len(series) == 6
    drawn = {}
    for c in series:
        line = c.lines[0]
        drawn[c.get_label()] = line.get_transform().transform(
            list(zip(line.get_xdata(), line.get_ydata())))
        for px, _ in drawn[c.get_label()]:
            assert frame.x0 + 3 < px < frame.x1 - 3, c.get_label()
    # the red x sits on the dodged marker of its point (WT, depth 2 at width 64)
    (red,) = [line for line in ax.lines if line.get_color() == "red" and len(line.get_xdata())]
    at = red.get_transform().transform(list(zip(red.get_xdata(), red.get_ydata())))[0]
    assert abs(at[0] - drawn["WT, depth 2"][3][0]) < 0.01
    assert abs(at[1] - drawn["WT, depth 2"][3][1]) < 0.01
