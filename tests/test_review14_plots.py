"""Review 14 of benchmarks/plot.py and notebooks/guidelines.ipynb: what the figures draw is
read back from the matplotlib artists and compared with means / sample stds worked out by hand
from a results.csv the test writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from benchmarks import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
