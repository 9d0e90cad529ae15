"""The sweep harness (benchmarks/run.py, benchmarks/presets.py), against hand-worked
answers; --dry-run and plain functions only, so each test takes about a second."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import run as bench_run
from benchmarks.presets import build_runs
from wtmodels.cli import parse_settings


def test_threads_over_the_benchmarks_limit_is_refused_before_anything_is_written(tmp_path,
                                                                                 capsys):
    # OMP_NUM_THREADS=100000 crashed every run's process (a sklearn import failed to map
    # memory) after machine.json and sweep_setting.json were written: exit 1, one failure per
    # run; the other benchmarks refuse more than 1024 threads up front
    out = tmp_path / "sweep"
    for extra in (["--dry-run"], ["--no-plots", "--no-extrapolation"]):
        code = bench_run.main(["quick", "--smoke", "--out", str(out), "--only", "deq",
                               "--threads", "100000", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "1024" in err[0], err
        assert not out.exists()
    assert bench_run.main(["quick", "--smoke", "--out", str(out), "--dry-run",
                           "--threads", "1024"]) == 0


@pytest.mark.parametrize("smoke", [True, False])
def test_set_that_makes_two_labels_one_configuration_is_refused(smoke):
    # deq_vs_wt's WT has no mask (mask_k 0 by the model's default) and its "WT + distinct
    # masks" has mask_k = depth: --set mask_k=4 gave both test_wt / wt_s, same depth, width,
    # mask_k 4 and density 0.5: one model trained twice under two labels
    for key, value in (("mask_k", 4), ("mask_k", 0), ("core", "deq")):
        with pytest.raises(ValueError, match=key):
            build_runs("deq_vs_wt", smoke=smoke, overrides={key: value})
    # a setting the variants share is still fine: every WT / masks / untied run at depth 4
    runs = build_runs("deq_vs_wt", smoke=smoke, seeds=[0], overrides={"depth": 4})
    depths = {r.label: r.config.get("depth") for r in runs}
    assert depths["WT"] == depths["WT + distinct masks"] == depths["untied"] == 4


def test_training_flag_values_reach_the_trainer_as_given():
    # a value starting with '-' was read by the trainer's argparse as an option: every run
    # failed with "--data-dir: expected one argument" after the harness had validated it
    for config in ({"data_dir": "-data"}, {"data_dir": "/d", "lr": 1e-05, "mask_seed": 3},
                   {"augment": False, "weight_norm": True}, {"min_lr": -0.0}):
        cmd = bench_run.train_command(config, "r", resume=False)
        settings = parse_settings(cmd[3:])
        assert {k: settings[k] for k in config} == config, cmd


def test_out_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch, capsys):
    # --out=~/x reaches Python unexpanded (no shell expands a tilde after '='): the harness
    # made a directory named '~' in the current one instead of using $HOME/x (the trainer
    # expands its own out / data_dir)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "x").mkdir(parents=True)
    cwd.mkdir()
    (home / "x" / "sweep_setting.json").write_text(json.dumps({"smoke": False,
                                                               "overrides": {}}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    # the full-size setting recorded in $HOME/x refuses a --smoke sweep into it
    assert bench_run.main(["quick", "--smoke", "--out=~/x", "--dry-run"]) == 2
    assert "full size" in capsys.readouterr().err
    assert os.listdir(cwd) == []
