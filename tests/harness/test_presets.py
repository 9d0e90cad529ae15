"""Sweep presets: every run of every preset is a valid training config, ids are stable."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from benchmarks import presets
from benchmarks.presets import build_runs, get_preset, list_presets, run_id_for
from wtmodels.models import get_config
from wtmodels.train_config import resolve_config, settings_without_effect

TRAIN_PRESETS = [p for p in list_presets() if get_preset(p).runner is None]
REQUIRED = {"quick", "deq_vs_wt", "depth", "width", "sparsity", "fashion", "cifar10",
            "cifar100", "capaboost"}


def test_every_required_preset_is_registered():
    assert REQUIRED <= set(list_presets())


@pytest.mark.parametrize("name", TRAIN_PRESETS)
@pytest.mark.parametrize("smoke", [True, False])
def test_every_run_is_a_valid_training_config(name, smoke):
    runs = build_runs(name, smoke=smoke, seeds=[0])
    assert runs
    for run in runs:
        cfg = resolve_config(dict(run.config))  # raises on an unknown key or a bad value
        # the model fields must build: sizes, norm groups dividing widths, solver names
        get_config(cfg.model, **cfg.model_overrides)
        assert settings_without_effect(cfg) == {}  # the trainer would refuse the run
        if smoke:
            assert cfg.model.startswith("test_") and cfg.epochs == 1
            assert cfg.dataset in ("digits", "synthetic")  # nothing the tests would lack
            assert (cfg.train_size or 10**9) <= 128


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_smoke_size_keeps_the_labels_of_the_full_size(name):
    assert {r.label for r in build_runs(name, smoke=True)} == {
        r.label for r in build_runs(name, smoke=False)}


def test_run_ids_are_stable_unique_and_depend_on_every_argument():
    a = build_runs("depth", seeds=[0, 1])
    b = build_runs("depth", seeds=[0, 1])
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert len({r.run_id for r in a}) == len(a)
    base = {"model": "wt_s", "depth": 4, "width": 32, "seed": 0}
    assert run_id_for("WT", base) != run_id_for("WT", {**base, "lr": 0.01})
    assert run_id_for("WT", base) != run_id_for("untied", base)
    assert run_id_for("WT", base).startswith("wt_d4_w32_s0_")


def test_seeds_cross_every_variant():
    one = build_runs("quick", smoke=True, seeds=[0])
    three = build_runs("quick", smoke=True, seeds=[0, 5, 7])
    assert len(three) == 3 * len(one)
    assert sorted({r.config["seed"] for r in three}) == [0, 5, 7]
    assert get_preset("quick").seeds == (0, 1)
    assert len(build_runs("quick")) == 2 * len(build_runs("quick", seeds=[0]))


def test_quick_compares_the_four_families_at_several_depths():
    runs = build_runs("quick", seeds=[0])
    cores = {r.label: get_config(r.config["model"]).core for r in runs}
    assert cores == {"WT": "unrolled", "WT + distinct masks": "unrolled", "untied": "untied",
                     "DEQ": "deq"}
    for label in ("WT", "WT + distinct masks", "untied"):
        assert len({r.config["depth"] for r in runs if r.label == label}) >= 3
    masked = [r for r in runs if r.label == "WT + distinct masks"]
    assert all(r.config["mask_k"] == r.config["depth"] for r in masked)  # a mask per iteration


def test_sparsity_crosses_density_and_mask_count_with_shared_and_no_mask():
    runs = build_runs("sparsity", seeds=[0])
    masked = {(r.config["mask_k"], r.config["mask_density"]) for r in runs
              if r.config.get("mask_k")}
    assert {k for k, _ in masked} == {1, 2, 4, 8}
    assert {d for _, d in masked} == {0.25, 0.5, 0.75}
    assert len(masked) == 12
    assert any(r.label == "WT" and not r.config.get("mask_k") for r in runs)  # no mask
    assert {r.label for r in runs if r.config.get("mask_k") == 1} == {"WT + shared mask"}


def test_deq_vs_wt_covers_solvers_gradients_and_ode():
    runs = build_runs("deq_vs_wt", seeds=[0])
    deq = {(r.config["f_solver"], r.config["grad"]) for r in runs if "f_solver" in r.config}
    assert deq == {("anderson", "ift"), ("anderson", "phantom"), ("broyden", "ift"),
                   ("broyden", "phantom")}
    assert any(get_config(r.config["model"]).core == "ode" for r in runs)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="quick"):
        get_preset("nope")
    with pytest.raises(ValueError, match="seeds"):
        build_runs("quick", seeds=[])


def test_custom_runner_preset_lists_its_runs_from_its_module(monkeypatch):
    pytest.importorskip("benchmarks.capaboost")
    runs = build_runs("capaboost", smoke=True, seeds=[0, 1])
    assert runs and all(r.runner == "benchmarks.capaboost:run" for r in runs)
    assert len({r.run_id for r in runs}) == len(runs)


@pytest.mark.parametrize("setting, message", [
    ({"finetune_epoch": 10}, "unknown setting 'finetune_epoch'; valid settings:"),
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
])
def test_custom_runner_settings_are_checked_before_any_run(setting, message):
    # the capaboost runner's own check_config runs in validate_runs: a typo in --set used to
    # train every run with the defaults under a new run id
    pytest.importorskip("benchmarks.capaboost")
    from benchmarks.run import validate_runs

    runs = build_runs("capaboost", smoke=True, seeds=[0], overrides=setting)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_runs(runs)
    validate_runs(build_runs("capaboost", smoke=True, seeds=[0]))  # the preset itself is fine


def test_custom_runner_preset_without_its_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(presets._PRESETS, "ghost", presets.Preset(
        "ghost", "missing module", build=None, runner="benchmarks.no_such_module:run",
        source="benchmarks.no_such_module:sweep"))
    with pytest.raises(ValueError, match="no_such_module.*not there"):
        build_runs("ghost")


def test_dry_run_lists_every_run_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "sparsity", "--out", str(out),
                           "--dry-run", "--seeds", "0,1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(build_runs("sparsity", seeds=[0, 1])) + 1
    assert all(line.split()[0] == "todo" for line in lines[:-1])
    assert not out.exists()


def test_bad_command_line_is_one_line_exit_2_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "nope", "--out",
                           str(tmp_path / "X")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "preset" in proc.stderr and "quick" in proc.stderr
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("args, field", [
    (["quick", "--out", "X", "--seeds", "a,b"], "seeds"),
    (["quick", "--out", "X", "--jobs", "0"], "jobs"),
    (["quick", "--out", "X", "--threads", "0"], "threads"),
    (["quick", "--out", "X", "--launcher", "k8s"], "launcher"),
    (["quick"], "--out"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, field):
    from benchmarks.run import main

    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and field in err
    assert not (tmp_path / "X").exists()


def test_set_of_a_key_the_preset_sweeps_is_refused():
    # deq_vs_wt's DEQ variants differ in grad: one --set value would run them all alike under
    # their own labels ("anderson / phantom" training with grad=unroll)
    with pytest.raises(ValueError, match=r"preset 'deq_vs_wt' sweeps grad .*--only"):
        build_runs("deq_vs_wt", smoke=True, overrides={"grad": "unroll"})
    with pytest.raises(ValueError, match="sweeps depth"):
        build_runs("quick", smoke=True, overrides={"depth": 3})
    # a key only one variant sets is not swept: quick's DEQ may take another gradient
    runs = build_runs("quick", smoke=True, overrides={"grad": "phantom", "epochs": 1})
    assert all(r.config["epochs"] == 1 for r in runs)
    assert {r.label for r in runs if r.config.get("grad") == "phantom"} == {"DEQ"}


def test_set_reaches_only_the_runs_that_read_it():
    plain = {(r.label, r.config.get("depth")): r
             for r in build_runs("quick", smoke=True, seeds=[0])}
    runs = build_runs("quick", smoke=True, seeds=[0],
                      overrides={"f_max_iter": 7, "jac_reg_weight": 0.1, "mask_seed": 3})
    for run in runs:
        deq, masked = run.label == "DEQ", "masks" in run.label
        assert (run.config.get("f_max_iter") == 7) == deq
        assert (run.config.get("jac_reg_weight") == 0.1) == deq
        assert (run.config.get("mask_seed") == 3) == masked
        # a run that reads none of them is the run without the overrides (same id)
        same = run.run_id == plain[(run.label, run.config.get("depth"))].run_id
        assert same == (not deq and not masked)
        assert settings_without_effect(resolve_config(dict(run.config))) == {}
    with pytest.raises(ValueError, match=r"no run of preset 'depth' reads f_max_iter"):
        build_runs("depth", smoke=True, overrides={"f_max_iter": 7, "epochs": 1})
