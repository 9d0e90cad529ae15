"""Guideline plots read by a new user: a panel's title names only what it draws."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from benchmarks import plot  # noqa: E402


def _rows(arms):
    """Two seeds of each (label, core, mask_k) at depths 2 and 4, width 8, density 0.5."""
    out = []
    for label, core, k in arms:
        for depth in (2, 4):
            for seed, acc in ((0, 0.80), (1, 0.82)):
                out.append({"label": label, "config_id": f"{label}-{depth}", "core": core,
                            "depth": depth, "width": 8, "seed": seed, "test_acc": acc,
                            "mask_k": depth if k == "depth" else k,
                            "mask_density": None if k == 0 else 0.5, "status": "ok"})
    return out


def _arm_titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title().startswith("Distinct")]


def test_masks_panel_without_a_shared_mask_does_not_say_shared():
    # the committed quick and deq_vs_wt sweeps: no mask, distinct masks, untied; no shared mask
    # (their masks.png was titled "Distinct vs shared vs no mask" over a legend without one)
    fig = plot.plot_masks(_rows([("WT", "unrolled", 0), ("WT + distinct masks", "unrolled",
                                                          "depth"), ("untied", "untied", 0)]))
    assert _arm_titles(fig) == ["Distinct vs no mask, width 8, density 0.5"]


def test_masks_panel_without_no_mask_names_shared_only():
    fig = plot.plot_masks(_rows([("WT + shared mask", "unrolled", 1),
                                 ("WT + distinct masks", "unrolled", "depth")]))
    assert _arm_titles(fig) == ["Distinct vs shared mask, width 8, density 0.5"]


def test_masks_panel_with_every_arm_keeps_its_title():
    fig = plot.plot_masks(_rows([("WT", "unrolled", 0), ("WT + shared mask", "unrolled", 1),
                                 ("WT + distinct masks", "unrolled", "depth"),
                                 ("untied", "untied", 0)]))
    assert _arm_titles(fig) == ["Distinct vs shared vs no mask, width 8, density 0.5"]


def test_masks_panel_against_untied_only_says_untied():
    fig = plot.plot_masks(_rows([("WT + distinct masks", "unrolled", "depth"),
                                 ("untied", "untied", 0)]))
    assert _arm_titles(fig) == ["Distinct vs untied, width 8, density 0.5"]
