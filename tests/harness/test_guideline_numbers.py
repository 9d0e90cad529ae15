"""The numbers behind the guideline curves, recomputed by hand from results files the tests write:
summary means / sample stds, the points and error bars drawn, and what a line averages."""

from __future__ import annotations

import csv
import random
import statistics

import pytest

from benchmarks import plot
from benchmarks.results_io import write_rows
from benchmarks.summary import summary_table, to_markdown


def _errorbars(ax) -> dict[str, tuple[list, list, list]]:
    """legend label -> (x, y, half-length of the y error bar) of each error-bar series."""
    out = {}
    for container in ax.containers:
        line, _, bars = container.lines
        segments = bars[-1].get_segments() if bars else []
        half = [(s[1][1] - s[0][1]) / 2 for s in segments] or [0.0] * len(line.get_xdata())
        out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), half)
    return out


def _rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, core in (("WT", "unrolled"), ("untied", "untied")):
        for depth in (1, 2, 4):
            for s in range(3):
                rows.append({"run_id": f"{label}{depth}s{s}", "label": label,
                             "config_id": f"{label}{depth}", "status": "ok", "core": core,
                             "depth": depth, "width": 16, "mask_k": 0, "seed": s,
                             "test_acc": rng.uniform(0.6, 0.9), "params": 1000 * depth,
                             "train_time_s": rng.uniform(1, 2), "peak_mem_mb": 50.0})
    return rows


def test_summary_and_plotted_points_are_the_seed_means_and_sample_stds(tmp_path):
    rows = _rows()
    write_rows(str(tmp_path / "results.csv"), rows)
    plot.write_summary(str(tmp_path))
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = {r["config_id"]: r for r in csv.DictReader(f)}
    lines = _errorbars(plot.plot_accuracy_vs_depth(rows).axes[0])
    for label in ("WT", "untied"):
        xs, ys, errs = lines[label]
        assert xs == [1, 2, 4]
        for x, y, err in zip(xs, ys, errs):
            accs = [r["test_acc"] for r in rows if r["label"] == label and r["depth"] == x]
            mean, std = statistics.fmean(accs), statistics.stdev(accs)  # n - 1
            entry = summary[f"{label}{x}"]
            assert float(entry["test_acc_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(entry["test_acc_std"]) == pytest.approx(std, rel=1e-12)
            assert int(entry["test_acc_count"]) == 3
            assert y == pytest.approx(100 * mean) and err == pytest.approx(100 * std)


def test_the_summary_says_which_standard_deviation_it_shows(tmp_path):
    # "85.0 ± 7.1" over two seeds is 7.1 as a sample std, 5.0 as a population std: say which
    write_rows(str(tmp_path / "results.csv"), _rows())
    markdown = plot.write_summary(str(tmp_path))
    assert "sample standard deviation (n − 1" in markdown
    assert "sample standard deviation" in (tmp_path / "summary.md").read_text()
    # the figure's title says it (the panel title no longer repeats it: false with one seed)
    assert "sample std" in plot.plot_accuracy_vs_depth(_rows())._suptitle.get_text()


def test_presets_sharing_a_directory_are_not_joined_into_one_line():
    # quick (15 epochs) and depth (20 epochs) may share a directory; their WT runs at one
    # width formed ONE line with two points at each depth, zigzagging between the presets
    rows = []
    for epochs, depths, base in ((15, (2, 4, 8), 0.90), (20, (1, 2, 4, 8, 16), 0.95)):
        for d in depths:
            for s in (0, 1):
                rows.append({"label": "WT", "config_id": f"e{epochs}d{d}", "core": "unrolled",
                             "depth": d, "width": 32, "epochs": epochs, "seed": s,
                             "test_acc": base + 0.001 * d + 0.01 * s})
    lines = _errorbars(plot.plot_accuracy_vs_depth(rows).axes[0])
    assert set(lines) == {"WT (epochs 15)", "WT (epochs 20)"}
    assert lines["WT (epochs 15)"][0] == [2, 4, 8]
    assert lines["WT (epochs 20)"][0] == [1, 2, 4, 8, 16]
    assert lines["WT (epochs 15)"][1][0] == pytest.approx(100 * (0.902 + 0.005))
    # and the summary table tells the two apart
    table = to_markdown(summary_table(rows))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert "epochs" in header
    # a sweep of one setting keeps its plain legend and table
    one = [r for r in rows if r["epochs"] == 20]
    assert set(_errorbars(plot.plot_accuracy_vs_depth(one).axes[0])) == {"WT"}
    assert "epochs" not in to_markdown(summary_table(one)).splitlines()[0]


def test_extrapolation_lines_average_seeds_not_configurations():
    # two configurations with the same trained depth, width and masks (another preset's
    # epochs) were averaged as if they were seeds: 85.5 ± 5.8 instead of 80.5 and 90.5
    rows = []
    for epochs, base in ((15, 0.8), (20, 0.9)):
        for s in (0, 1):
            for d in (1, 2, 4):
                rows.append({"label": "WT", "config_id": f"e{epochs}", "core": "unrolled",
                             "width": 32, "mask_k": 0, "seed": s, "epochs": epochs,
                             "train_depth": 2, "test_depth": d, "factor": d / 2,
                             "test_acc": base + 0.01 * s})
    lines = _errorbars(plot.plot_extrapolation(rows).axes[0])
    assert set(lines) == {"trained at 2, epochs 15", "trained at 2, epochs 20"}
    xs, ys, errs = lines["trained at 2, epochs 15"]
    assert xs == [0.5, 1.0, 2.0] and ys == pytest.approx([80.5] * 3)
    assert errs == pytest.approx([100 * statistics.stdev([0.80, 0.81])] * 3)
    # rows written before extrapolation.csv recorded epochs: told apart by configuration id
    old = [{k: v for k, v in r.items() if k != "epochs"} for r in rows]
    assert set(_errorbars(plot.plot_extrapolation(old).axes[0])) == {
        "trained at 2, config id e15", "trained at 2, config id e20"}
    # seeds of one configuration still make one line
    one = [r for r in rows if r["epochs"] == 15]
    assert set(_errorbars(plot.plot_extrapolation(one).axes[0])) == {"trained at 2"}


def test_peak_memory_is_labelled_in_mib():
    # peak_mem_mb is ru_maxrss / 1024 (or CUDA bytes / 2**20): MiB, 4.9 % off a label in MB
    fig = plot.plot_time_memory(_rows())
    assert fig.axes[-1].get_xlabel() == "peak memory (MiB)"
    assert "peak MiB" in to_markdown(summary_table(_rows())).splitlines()[0]


def test_extrapolation_rows_carry_what_tells_configurations_apart(tmp_path, monkeypatch):
    import json

    from benchmarks import extrapolate
    from benchmarks.results_io import read_rows

    run_dir = tmp_path / "runs" / "r0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    (run_dir / "config.json").write_text(json.dumps(
        {"train": {}, "data_info": {}, "model_config": {"core": "unrolled", "depth": 2}}))
    write_rows(str(tmp_path / "results.csv"), [
        {"run_id": "r0", "label": "WT", "config_id": "c", "status": "ok", "core": "unrolled",
         "depth": 2, "width": 8, "seed": 0, "dataset": "digits", "epochs": 15,
         "train_size": 64}])
    monkeypatch.setattr(extrapolate, "evaluate_depths", lambda run, factors, device=None: [
        {"train_depth": 2, "test_depth": round(2 * f), "factor": f, "test_acc": 0.5}
        for f in factors])
    assert extrapolate.extrapolate_sweep(str(tmp_path), [1.0, 2.0], echo=lambda *_: None) == 2
    rows = read_rows(str(tmp_path / "extrapolation.csv"))
    assert [(r["epochs"], r["dataset"], r["train_size"]) for r in rows] == [(15, "digits", 64)] * 2
