"""The sweep harness as a new user (quick --smoke, 3 seeds): the masks figure
of a single density (quick's shape) and the extrapolation figure put their legends inside the
axes at matplotlib's "best", over error bars (README: "legends sit beside or under the panels,
never on the data"); the extrapolation ratios 2/3 and 4/3 (a model trained at depth 3) were
labelled "0.666667" and "1.33333", the latter printed over the "1.5" beside it."""

from __future__ import annotations

from benchmarks import plot
from tests.harness.test_figures_as_seen import _overlaps, _renderer


def _row(label, depth, seed, acc, **extra):
    return {"run_id": f"{label}-{depth}-{seed}", "label": label, "depth": depth, "width": 8,
            "seed": seed, "test_acc": acc, "status": "ok", **extra}


def test_single_density_masks_legend_is_off_the_axes():
    # quick: no mask / distinct masks (K = depth, density 0.5) / untied at depths 2, 4, 8, one
    # panel; its legend sat at "best" in the panel, over the no-mask error bar at depth 2
    rows = []
    for depth in (2, 4, 8):
        for s in (0, 1):
            rows.append(_row("WT", depth, s, 0.99 - 0.01 * s))
            rows.append(_row("WT + distinct masks", depth, s, 0.985 + 0.005 * s,
                             mask_k=depth, mask_density=0.5))
            rows.append(_row("untied", depth, s, 0.98 + 0.01 * s, core="untied"))
    fig = plot.plot_masks(rows)
    (ax,) = fig.axes
    assert ax.get_title() == "Distinct vs no mask, width 8, density 0.5"
    legend = ax.get_legend() or fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "no mask", "distinct masks (K = depth)", "untied"]
    renderer = _renderer(fig)
    assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def _extra(label, train_depth, seed, accs, core="unrolled"):
    return [{"label": label, "config_id": f"{label}{train_depth}", "seed": seed, "core": core,
             "train_depth": train_depth, "test_depth": d, "factor": d / train_depth,
             "test_acc": a} for d, a in accs]


def test_extrapolation_legends_off_the_axes_and_ratio_ticks_readable():
    # smoke quick: trained at 2 (test depths 1, 2, 3, 4) and 3 (2, 3, 4, 6) -> ratios
    # 0.5, 2/3, 1, 4/3, 1.5, 2; the legend sat at "best" inside every panel
    rows = []
    for s in (0, 1):
        rows += _extra("WT", 2, s, [(1, .5 + .1 * s), (2, .9), (3, .8), (4, .7 + .1 * s)])
        rows += _extra("WT", 3, s, [(2, .6 + .1 * s), (3, .9), (4, .85), (6, .6 + .1 * s)])
        rows += _extra("DEQ", 8, s, [(4, .9), (8, .95), (16, .95 + .01 * s)], core="deq")
    fig = plot.plot_extrapolation(rows)
    renderer = _renderer(fig)
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks] == ["0.5", "0.667", "1", "1.33", "1.5", "2"]
    boxes = [t.get_window_extent(renderer) for t in ticks]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # no label printed over another


def test_setting_line_says_one_epoch_not_one_epochs():
    from benchmarks.plot import describe_setting
    rows = [{"dataset": "digits", "epochs": 1, "train_size": 1, "config_id": "a", "seed": 0}]
    assert describe_setting(rows).startswith("digits (sklearn, 8×8), 1 training image, 1 epoch;")
    assert "2 epochs" in describe_setting([{**rows[0], "epochs": 2}])


def test_sweep_refuses_unknown_status_before_any_run(tmp_path, capsys):
    # a hand-typed status used to be refused only by the report after every run had run
    from benchmarks.run import main

    (tmp_path / "results.csv").write_text("run_id,status\nx,okk\n")
    assert main(["quick", "--smoke", "--out", str(tmp_path), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "'okk'" in err and "ok, diverged, nonfinite, failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    (tmp_path / "results.csv").write_text("run_id,status\nx,ok\n")
    assert main(["quick", "--smoke", "--out", str(tmp_path), "--dry-run"]) == 0
