"""Paper-ready figures: vector PDFs beside the PNGs, one colour-blind-safe colour and marker per
model family in every figure, titles that name the setting and the error bars and fit the
figure, fonts that stay legible at single-column width."""

from __future__ import annotations

import pytest
from benchmark_fakes import fake_rows, write_fake_sweep
from matplotlib.colors import to_hex

from benchmarks import plot


@pytest.fixture(scope="module")
def rows():
    return fake_rows()


def _colours_by_label(fig) -> dict[str, str]:
    """legend label -> colour of its error-bar line, over every axis of ``fig``."""
    out = {}
    for ax in fig.axes:
        for container in ax.containers:
            label = container.get_label()
            if not label.startswith("_") and getattr(container, "lines", None):
                out.setdefault(label, to_hex(container.lines[0].get_color()))
    return out


def test_each_png_has_a_vector_pdf_beside_it_with_truetype_fonts(tmp_path):
    write_fake_sweep(str(tmp_path))
    paths = plot.make_plots(str(tmp_path))
    assert paths and all(p.endswith(".png") for p in paths)  # the return value: PNGs, as before
    for png in paths:
        pdf = (tmp_path / "plots" / png.rsplit("/", 1)[1]).with_suffix(".pdf")
        data = pdf.read_bytes()
        assert data[:5] == b"%PDF-"
        assert b"/Type3" not in data  # Type 3 fonts: refused by some publishers
        assert b"/CreationDate" not in data  # an unchanged figure rewrites the same bytes
    assert not list((tmp_path / "plots").glob(".*tmp*"))  # no temporary file left


def test_a_family_keeps_its_colour_and_marker_across_figures(rows):
    depth = _colours_by_label(plot.plot_accuracy_vs_depth(rows))
    capacity = _colours_by_label(plot.plot_capacity(rows))
    timing = _colours_by_label(plot.plot_time_memory(rows))
    arms = _colours_by_label(plot.plot_masks(rows))
    wt = plot.LABEL_COLORS["WT"].lower()
    assert depth["WT, width 8"] == capacity["WT"] == timing["WT"] == arms["no mask"] == wt
    assert capacity["untied"] == timing["untied"] == arms["untied"] == plot.LABEL_COLORS[
        "untied"].lower()
    assert arms["distinct masks (K = 2, 8)"] == plot.LABEL_COLORS["WT + distinct masks"].lower()
    # markers follow the family too (grey print, colour-blind readers)
    fig = plot.plot_time_memory(rows)
    markers = {c.get_label(): c.lines[0].get_marker() for c in fig.axes[0].containers}
    assert markers["WT"] == "o" and markers["untied"] == "D" and markers["DEQ"] == "v"


def test_the_palette_is_colour_blind_safe_and_variants_shade_their_family():
    assert set(plot.LABEL_COLORS.values()) <= set(plot.OKABE_ITO.values())
    variants = ["DEQ anderson / ift", "DEQ anderson / phantom", "DEQ broyden / ift"]
    colours = [plot.label_color(v) for v in variants]
    assert len(set(colours)) == 3 and plot.LABEL_COLORS["DEQ"] not in colours
    assert [plot.label_color(v) for v in variants] == colours  # kept once given
    assert len({plot.label_marker(v) for v in variants}) == 3
    assert plot.label_family("WT + shared mask, K=2") == "WT + shared mask"


def test_a_deq_variant_keeps_its_colour_between_panels():
    rows = [{"label": lab, "config_id": lab, "seed": s, "params": p, "train_time_s": t,
             "peak_mem_mb": 100 + t, "test_acc": 0.9 + 0.01 * s}
            for lab, p, t in (("WT", 1000, 10), ("DEQ broyden / phantom", 1000, 40),
                              ("DEQ anderson / ift", 1000, 30)) for s in (0, 1)]
    capacity = _colours_by_label(plot.plot_capacity(rows))
    timing = _colours_by_label(plot.plot_time_memory(rows))
    for label in ("DEQ broyden / phantom", "DEQ anderson / ift"):
        assert capacity[label] == timing[label] == plot.label_color(label)


def test_titles_name_the_setting_and_the_error_bars_and_fit_the_figure(rows):
    rows = [dict(r, dataset="fashion_mnist", epochs=6, train_size=10000) for r in rows]
    fig = plot.plot_accuracy_vs_depth(rows)
    title = fig.get_suptitle()
    assert "Fashion-MNIST" in title and "6 epochs" in title and "10000 training images" in title
    assert "sample std (n − 1) over 3 seeds" in title
    assert "3 seeds per configuration" in plot.plot_stability(rows).get_suptitle()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box, page = fig._suptitle.get_window_extent(renderer), fig.bbox
    assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1  # not clipped at the sides


def test_fonts_stay_legible_at_single_column_width(rows):
    for fig in (plot.plot_accuracy_vs_depth(rows), plot.plot_time_memory(rows),
                plot.plot_masks(rows)):
        per_panel = fig.get_figwidth() / max(1, len({ax.get_position().x0 for ax in fig.axes}))
        assert per_panel <= 5.2  # a panel shrinks at most ~1.6 x into a 3.3 in column
        ax = fig.axes[0]
        assert ax.xaxis.label.get_fontsize() >= 7
        assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 6.5


def test_extrapolation_with_many_labels_wraps_into_rows():
    rows = [{"label": f"WT {i}", "config_id": f"c{i}", "seed": 0, "train_depth": 4,
             "test_depth": d, "factor": d / 4, "test_acc": 0.8} for i in range(6)
            for d in (2, 4, 8)]
    fig = plot.plot_extrapolation(rows)
    assert len(fig.axes) == 6
    assert len({round(ax.get_position().y0, 3) for ax in fig.axes}) == 2  # two rows of panels
    assert fig.get_figwidth() <= 4 * plot.PANEL_SIZE[0] + 0.01
    assert fig.axes[0].get_xscale() == "log"  # halving and doubling equally far from 1


def test_a_failure_panel_without_failures_says_so(rows):
    clean = [dict(r, diverged=0.0, converged=1.0, skipped_steps=0) for r in rows]
    fig = plot.plot_stability(clean)
    failures = [ax for ax in fig.axes if ax.get_title() == "Solver and training failures"][0]
    assert any(t.get_text() == "no failures in any run" for t in failures.texts)


def test_compute_panel_is_left_out_when_every_configuration_costs_the_same():
    rows = [{"label": lab, "config_id": lab, "seed": 0, "params": p, "flops_per_image": 5e6,
             "test_acc": a} for lab, p, a in (("WT", 1e3, 0.8), ("untied", 4e3, 0.85))]
    assert len(plot.plot_capacity(rows).axes) == 1


def test_capaboost_figures_have_pdfs_and_the_family_palette(tmp_path):
    from benchmarks import capaboost

    rows = []
    for label, copies in (("LoRA", 1), ("CapaBoost d=2", 2), ("CapaBoost d=4", 4)):
        for rank in (1, 2):
            for seed in (0, 1):
                rows.append({"label": label, "rank": rank, "seed": seed, "copies": copies,
                             "params": 100 * rank, "test_acc": 0.8 + 0.01 * seed,
                             "dataset": "digits", "update_rank": float(copies * rank),
                             "update_erank": copies * rank * 0.7,
                             "rank_bound": float(copies * rank)})
    rows += [{"label": "full", "rank": None, "seed": 0, "copies": None, "params": 5000,
              "test_acc": 0.9, "dataset": "digits"}]
    paths = capaboost.plot_results(rows, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy_vs_params.png",
                                                     "rank_vs_copies.png"]
    for name in ("accuracy_vs_params", "rank_vs_copies"):
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert capaboost.COLOURS["LoRA"] == plot.OKABE_ITO["blue"]
