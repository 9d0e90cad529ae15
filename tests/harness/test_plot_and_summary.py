"""Plots, summary table and recommendations drawn from results directories the tests write."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import pytest
from benchmark_fakes import fake_rows, write_failed_run, write_fake_sweep

from benchmarks import plot
from benchmarks.aggregate import aggregate
from benchmarks.recommend import describe, recommend
from benchmarks.recommend import main as recommend_main
from benchmarks.results_io import write_rows
from benchmarks.summary import summary_table, to_markdown


@pytest.fixture(scope="module")
def rows():
    return fake_rows()


def _errorbar_lines(ax) -> dict[str, tuple[list, list]]:
    """legend label -> (x, y) of each error-bar line of an axis."""
    handles, labels = ax.get_legend_handles_labels()
    out = {}
    for container in ax.containers:
        if container.get_label() in labels:
            line = container.lines[0]
            out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


def test_accuracy_vs_depth_plots_the_seed_means_per_width(rows):
    fig = plot.plot_accuracy_vs_depth(rows)
    lines = _errorbar_lines(fig.axes[0])
    assert {"WT, width 8", "WT, width 16", "untied, width 8",
            "WT + distinct masks, width 16"} <= set(lines)
    xs, ys = lines["WT, width 16"]
    assert xs == [1, 2, 4]
    for x, y in zip(xs, ys):  # known answer: the mean over the three seeds, in percent
        accs = [r["test_acc"] for r in rows
                if r["label"] == "WT" and r["width"] == 16 and r["depth"] == x]
        assert len(accs) == 3 and y == pytest.approx(100 * statistics.fmean(accs))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("DEQ") and "no depth axis" in t for t in legend)  # DEQ as a band
    assert fig.axes[0].get_ylabel() == "test accuracy (%)"


def test_panels_are_skipped_when_the_data_cannot_support_them(rows):
    one_width = [r for r in rows if r["width"] == 8]
    assert plot.plot_accuracy_vs_width(one_width) is None
    assert plot.plot_accuracy_vs_width(rows) is not None
    assert plot.plot_masks([r for r in rows if not r["mask_k"]]) is None
    only_k_equals_depth = [r for r in rows if not r["mask_k"] or r["mask_k"] == r["depth"]]
    assert len(plot.plot_masks(only_k_equals_depth).axes) == 1  # the per-depth arms only
    one_label = [r for r in rows if r["label"] == "WT"]
    assert plot.plot_capacity(one_label) is None and plot.plot_time_memory(one_label) is None
    assert plot.plot_extrapolation([]) is None
    single_seed = [r for r in rows if r["seed"] == 0 and r["label"] == "WT"]
    for r in single_seed:
        r.pop("skipped_steps", None)
    assert plot.plot_stability(single_seed) is None


def test_masks_panel_compares_distinct_shared_and_none(rows):
    fig = plot.plot_masks(rows)
    assert len(fig.axes) == 4  # arms per depth at densities 0.25 and 0.5, vs K, vs density
    arms = _errorbar_lines(fig.axes[1])  # density 0.5
    assert set(arms) == {"no mask", "1 shared mask", "distinct masks (K = 2, 8)", "untied"}
    k_axis = fig.axes[2]
    lines = _errorbar_lines(k_axis)
    xs, ys = lines["density 0.5"]
    assert xs == [1, 2, 4, 8]  # K = 1 is the shared mask
    expected = statistics.fmean(r["test_acc"] for r in rows if r["depth"] == 4
                                and r["width"] == 8 and r["mask_k"] == 1
                                and r["mask_density"] == 0.5)
    assert ys[0] == pytest.approx(100 * expected)
    legend = [t.get_text() for t in k_axis.get_legend().get_texts()]
    assert "no mask" in legend and "untied" in legend


def test_capacity_frontier_is_the_pareto_front(rows):
    groups = [g for g in aggregate(rows) if g["label"] == "untied"]
    front = plot.pareto_front(groups, "params")
    for g in groups:  # nothing off the front beats a front point with fewer parameters
        assert not any(f["params_mean"] >= g["params_mean"] and f["test_acc_mean"] <
                       g["test_acc_mean"] for f in front if f is not g and g not in front
                       and f["params_mean"] > g["params_mean"])
    accs = [f["test_acc_mean"] for f in front]
    assert accs == sorted(accs) and [f["params_mean"] for f in front] == sorted(
        f["params_mean"] for f in front)
    assert max(accs) == max(g["test_acc_mean"] for g in groups)
    fig = plot.plot_capacity(rows)
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]


def test_stability_panels_show_residuals_divergence_and_seed_spread(rows):
    rows = [dict(r) for r in rows]
    rows[-1]["status"] = "diverged"
    fig = plot.plot_stability(rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Solver residuals")
    assert titles[1] == "Solver and training failures"
    assert fig.axes[0].get_yscale() == "log"
    # the DEQ's shares of unconverged (10 %) and diverged (5 %) solves, as percentage bars
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert pytest.approx(10.0) in bars and pytest.approx(5.0) in bars


def test_summary_table_means_and_stds_over_seeds(rows):
    table = summary_table(rows)
    wt = [g for g in table if g["label"] == "WT" and g["depth"] == 2 and g["width"] == 8][0]
    accs = [r["test_acc"] for r in rows if r["label"] == "WT" and r["depth"] == 2
            and r["width"] == 8]
    assert wt["n"] == 3 and wt["seeds"] == [0, 1, 2]
    assert wt["test_acc_mean"] == pytest.approx(statistics.fmean(accs))
    assert wt["test_acc_std"] == pytest.approx(statistics.stdev(accs))
    line = [x for x in to_markdown(table).splitlines() if x.startswith("| WT | 2 | 8 |")][0]
    assert f"{100 * statistics.fmean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}" in line
    assert math.isnan(wt["nstep_mean"])


def test_solver_columns_are_blank_for_cores_without_a_solver():
    base = {"dataset": "digits", "width": 8, "seed": 0, "test_acc": 0.9, "grad": "ift"}
    table = summary_table([{**base, "label": "WT", "core": "unrolled", "depth": 2,
                            "f_solver": "anderson"},
                           {**base, "label": "DEQ", "core": "deq", "f_solver": "broyden",
                            "grad": "phantom"}])
    lines = to_markdown(table).splitlines()
    wt, deq = ([x for x in lines if x.startswith(f"| {name} |")][0] for name in ("WT", "DEQ"))
    assert "anderson" not in wt and "ift" not in wt
    assert "broyden" in deq and "phantom" in deq


def test_plot_command_line_writes_every_panel_and_the_summary(tmp_path):
    write_fake_sweep(str(tmp_path / "s"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "| label |" in proc.stdout
    pngs = sorted((tmp_path / "s" / "plots").glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"{n}.png" for n in [*plot.PANELS, "extrapolation"])
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"  # vector copy beside it
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert summary.startswith("| label |") and summary.strip() in proc.stdout
    assert (tmp_path / "s" / "summary.csv").read_text().startswith("label,")
    assert plot.main([str(tmp_path / "missing")]) == 2


def _best(rows, budget_key, limit):
    groups = [g for g in aggregate(rows) if g[f"{budget_key}_mean"] <= limit]
    return max(g["test_acc_mean"] for g in groups), groups


def test_recommend_picks_the_smallest_within_half_a_point_of_the_best(rows):
    for limit in (2200.0, 6000.0, 30000.0):
        pick = recommend(rows, params=limit)
        best, feasible = _best(rows, "params", limit)
        choice = pick["choice"]
        assert pick["best_acc"] == best and choice["params_mean"] <= limit
        assert choice["test_acc_mean"] >= best - 0.005
        # no feasible configuration within half a point is smaller
        for g in feasible:
            if g["test_acc_mean"] >= best - 0.005:
                assert (g["params_mean"], g.get("depth"), g.get("width")) >= (
                    choice["params_mean"], choice.get("depth"), choice.get("width"))
    by_time = recommend(rows, time_s=10.0)
    assert by_time["choice"]["train_time_s_mean"] <= 10.0


def test_recommend_ranks_size_by_cell_evaluations_not_a_deqs_warm_up_depth():
    # equal parameters and accuracy: the DEQ's "depth" (6) is its warm-up unroll only; per
    # forward pass it evaluates the cell 40 times, the depth-8 weight-tied model 16 times
    rows = [{"label": "DEQ", "config_id": "deq", "depth": 6, "width": 32, "params": 1000,
             "cell_evals": 40.0, "seed": 0, "test_acc": 0.9},
            {"label": "WT", "config_id": "wt8", "depth": 8, "width": 32, "params": 1000,
             "cell_evals": 16.0, "seed": 0, "test_acc": 0.9}]
    assert recommend(rows, params=1000)["choice"]["label"] == "WT"
    for row in rows:  # not recorded: the depth decides
        del row["cell_evals"]
    assert recommend(rows, params=1000)["choice"]["label"] == "DEQ"


def test_recommend_errors(rows, tmp_path, capsys):
    with pytest.raises(ValueError, match="exactly one"):
        recommend(rows)
    with pytest.raises(ValueError, match="no measured configuration"):
        recommend(rows, params=10)
    with pytest.raises(ValueError, match="tolerance: must be a finite number"):
        recommend(rows, params=6000, tolerance=float("nan"))  # was an IndexError
    write_fake_sweep(str(tmp_path))
    assert recommend_main([str(tmp_path), "--params", "10"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert recommend_main([str(tmp_path), "--params", "6000"]) == 0
    assert "recommended" in capsys.readouterr().out


def test_extrapolation_draws_one_line_per_mask_setting():
    # two (K, density) settings of one label at one trained depth were pooled into one line
    rows = [{"label": "WT + distinct masks", "config_id": f"c{k}", "seed": s, "train_depth": 4,
             "width": 32, "mask_k": k, "mask_density": 0.5, "test_depth": d, "factor": d / 4,
             "test_acc": 0.5 + 0.1 * k} for k in (2, 4) for s in (0, 1) for d in (2, 4)]
    ax = plot.plot_extrapolation(rows).axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar per line
    assert set(lines) == {"trained at 4, K=2", "trained at 4, K=4"}
    assert list(lines["trained at 4, K=4"].get_ydata()) == pytest.approx([90.0, 90.0])


def _unstable(rows, status="diverged", test_acc=0.1):
    """A copy of ``rows`` where seed 0 of WT depth 2 width 8 is a run with ``status``."""
    out = [dict(r) for r in rows]
    hit = [r for r in out if r["label"] == "WT" and r["depth"] == 2 and r["width"] == 8
           and r["seed"] == 0][0]
    hit.update(status=status, test_acc=test_acc, best_test_acc=test_acc)
    clean = [r["test_acc"] for r in out if r["label"] == "WT" and r["depth"] == 2
             and r["width"] == 8 and r is not hit]
    return out, statistics.fmean(clean)


@pytest.mark.parametrize("status", ["diverged", "nonfinite"])
def test_a_stopped_run_is_left_out_of_the_means_and_marked(rows, status):
    # a run stopped on non-finite losses (its numbers: the last good epoch) was averaged in
    unstable, clean_mean = _unstable(rows, status)
    groups = [g for g in aggregate(unstable) if g["label"] == "WT" and g["depth"] == 2
              and g["width"] == 8]
    assert groups[0]["n"] == 3 and groups[0]["n_stopped"] == 1
    assert groups[0]["test_acc_mean"] == pytest.approx(clean_mean)
    assert groups[0]["test_acc_count"] == 2
    ax = plot.plot_accuracy_vs_depth(unstable).axes[0]
    xs, ys = _errorbar_lines(ax)["WT, width 8"]
    assert ys[xs.index(2)] == pytest.approx(100 * clean_mean)
    assert any("1/3" in t.get_text() for t in ax.texts)  # the point says how many
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("excluded from the mean" in t for t in legend)


def test_a_configuration_whose_every_seed_diverged_is_named_not_dropped(rows):
    out = [dict(r) for r in rows]
    for r in out:
        if r["label"] == "WT" and r["depth"] == 4 and r["width"] == 16:
            r["status"] = "diverged"
    fig = plot.plot_accuracy_vs_depth(out)
    text = fig.get_supxlabel()  # a footnote under the panels
    assert "WT, depth 4, width 16" in text and "3/3" in text


def test_summary_counts_stopped_failed_and_skipped_runs(rows, tmp_path):
    unstable, clean_mean = _unstable(rows)
    unstable[1]["skipped_steps"] = 7  # finished, but some steps were skipped
    table = summary_table(unstable)
    wt = [g for g in table if g["label"] == "WT" and g["depth"] == 2 and g["width"] == 8][0]
    assert wt["test_acc_mean"] == pytest.approx(clean_mean)
    markdown = to_markdown(table).splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert "runs stopped" in header and "runs with skipped steps" in header
    # a failed run (no row, its directory holds spec.json and a log) is counted too
    write_fake_sweep(str(tmp_path))
    failed = [r for r in rows if r["label"] == "untied" and r["depth"] == 1 and r["seed"] == 2][0]
    rows_left = [r for r in rows if r is not failed]
    write_rows(str(tmp_path / "results.csv"), rows_left)
    write_failed_run(str(tmp_path), failed)
    markdown = plot.write_summary(str(tmp_path))
    header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
    assert "runs failed" in header
    line = [x for x in markdown.splitlines() if x.startswith(f"| untied | 1 | {failed['width']} |")]
    cells = [c.strip() for c in line[0].strip("|").split("|")]
    assert cells[header.index("runs failed")] == "1" and cells[header.index("seeds")] == "3"


def test_recommend_skips_a_candidate_with_a_diverged_seed_and_says_so(capsys, tmp_path):
    rows = [{"label": "WT", "config_id": c, "depth": d, "width": 32, "params": 1000 * d,
             "seed": s, "test_acc": a, "status": "ok"}
            for c, d, a in (("a", 2, .955), ("b", 4, .958), ("c", 8, .960)) for s in (0, 1)]
    rows[0]["status"] = "diverged"  # depth 2, seed 0
    pick = recommend(rows, params=10000)
    assert pick["choice"]["depth"] == 4
    assert [g["depth"] for g in pick["unstable"]] == [2]
    with pytest.raises(ValueError, match="had a diverged or failed run"):
        recommend(rows, params=2000)  # the only configuration that fits had a diverged seed
    write_rows(str(tmp_path / "results.csv"), rows)
    assert recommend_main([str(tmp_path), "--params", "10000"]) == 0
    out = capsys.readouterr().out
    assert "not considered" in out and "1/2 diverged" in out


def test_masks_panel_names_the_density_of_each_arms_panel(rows):
    fig = plot.plot_masks(rows)
    titles = [ax.get_title() for ax in fig.axes]
    arms = [t for t in titles if t.startswith("Distinct vs shared")]
    # the fake sweep has densities 0.25 and 0.5 at depth 4, width 8: one panel each
    assert arms == ["Distinct vs shared vs no mask, width 8, density 0.25",
                    "Distinct vs shared vs no mask, width 8, density 0.5"]
    one = plot.plot_masks(rows, density=0.25)
    assert [t for t in (ax.get_title() for ax in one.axes)
            if t.startswith("Distinct")] == [arms[0]]
    with pytest.raises(ValueError, match="density: .*0.25, 0.5"):
        plot.plot_masks(rows, density=0.3)


def test_plot_command_line_picks_the_mask_density(tmp_path, capsys):
    write_fake_sweep(str(tmp_path))
    assert plot.main([str(tmp_path), "--mask-density", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid: 0.25, 0.5" in err
    assert plot.main([str(tmp_path), "--mask-density", "0.25"]) == 0
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(tmp_path), "--mask-density", "half"])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_recommend_with_one_seed_or_no_runs_says_what_it_measured(tmp_path):
    rows = [{"label": "WT", "config_id": "a", "depth": 2, "width": 32, "params": 1000,
             "seed": 0, "test_acc": 0.95}]
    text = describe(recommend(rows, params=2000)["choice"])
    assert "95.0 % over 1 seed(s)" in text and "±" not in text  # one seed has no std
    with pytest.raises(ValueError, match="no finished runs"):
        recommend([], params=2000)  # a results.csv with a header only


def test_summary_names_the_setting_that_tells_two_alike_configurations_apart():
    # one label at one depth and width, trained with two learning rates (a preset whose lr
    # changed between two sweeps into one folder): two identical-looking "WT 2 8" lines before
    from benchmarks.summary import summary_table, to_markdown

    rows = [{"config_id": cid, "label": "WT", "depth": 2, "width": 8, "seed": s, "lr": lr,
             "batch_size": 32, "test_acc": acc}
            for cid, lr, acc in (("a", 0.01, 0.9), ("b", 0.005, 0.8)) for s in (0, 1)]
    lines = to_markdown(summary_table(rows)).splitlines()
    assert lines[0] == "| label | depth | width | lr | seeds | test acc % |"
    assert lines[2:4] == ["| WT | 2 | 8 | 0.01 | 2 | 90.0 ± 0.0 |",
                          "| WT | 2 | 8 | 0.005 | 2 | 80.0 ± 0.0 |"]
    # configurations the shown settings already tell apart get no extra column
    rows = [dict(r, depth=2 if r["config_id"] == "a" else 4) for r in rows]
    assert "lr" not in to_markdown(summary_table(rows)).splitlines()[0]


def test_summary_tells_apart_configurations_differing_outside_the_group_columns():
    # capaboost's LoRA at ranks 1 and 2 (rank is no aggregate.GROUP_COLUMNS setting): without
    # a column the two rows read "LoRA 4 16" twice
    from benchmarks.summary import summary_table, to_markdown

    rows = [{"config_id": cid, "label": "LoRA", "depth": 4, "width": 16, "seed": 0,
             "rank": rank, "test_acc": acc}
            for cid, rank, acc in (("c1", 1, 0.85), ("c2", 2, 0.865))]
    lines = to_markdown(summary_table(rows)).splitlines()
    assert lines[0] == "| label | depth | width | config | seeds | test acc % |"
    assert lines[2:4] == ["| LoRA | 4 | 16 | c1 | 1 | 85.0 |", "| LoRA | 4 | 16 | c2 | 1 | 86.5 |"]
    # told apart by a group setting (lr): that column, no config column
    rows = [dict(r, lr=0.01 * r["rank"]) for r in rows]
    assert to_markdown(summary_table(rows)).splitlines()[0] == (
        "| label | depth | width | lr | seeds | test acc % |")


def test_a_set_sweeps_tables_and_figure_titles_name_its_setting(tmp_path, monkeypatch):
    # a --set lr=0.003 sweep's summary and figures read like the default sweep's: a figure in a
    # paper or a table in a report lost the one setting that made it
    import json

    from benchmarks.plot import make_plots, write_summary

    write_fake_sweep(str(tmp_path))
    (tmp_path / "sweep_setting.json").write_text(json.dumps(
        {"smoke": False, "overrides": {"lr": 0.003, "epochs": 4}}))
    assert write_summary(str(tmp_path)).endswith(
        "Every run of this directory: --set lr=0.003 epochs=4 (sweep_setting.json).")
    assert (tmp_path / "summary.md").read_text().rstrip().endswith("(sweep_setting.json).")
    titles = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: titles.setdefault(
        os.path.basename(path), fig.get_suptitle()) and path)
    assert len(make_plots(str(tmp_path))) >= 4
    assert plot.figure_note(str(tmp_path)) == "--set lr=0.003"  # what the notebook passes
    for name, title in titles.items():  # epochs are named earlier in the title: not again
        assert title.replace("\n", "; ").endswith("; --set lr=0.003"), (name, title)
    # a sweep without --set (or without the file): titles and summary as before
    (tmp_path / "sweep_setting.json").write_text(json.dumps({"smoke": False, "overrides": {}}))
    assert "Every run" not in write_summary(str(tmp_path))
    titles.clear()
    make_plots(str(tmp_path))
    assert titles and not any("--set" in t for t in titles.values())


def test_setting_note_leaves_out_what_the_title_names(tmp_path):
    import json

    (tmp_path / "sweep_setting.json").write_text(json.dumps(
        {"smoke": True, "overrides": {"dataset": "fashion_mnist", "width": 24}}))
    assert plot.setting_note(str(tmp_path)) == "smoke size, --set dataset=fashion_mnist width=24"
    assert plot.setting_note(str(tmp_path), leave_out=("dataset",)) == "smoke size, --set width=24"
    (tmp_path / "sweep_setting.json").write_text("[1, 2")  # damaged: no note, no error
    assert plot.setting_note(str(tmp_path)) == ""
