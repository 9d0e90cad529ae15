"""Acceptance review of the models and benchmark-harness README sections (round 8).

Each test pins a bug found by trying the commands as the README describes them: the
``cifar100`` smoke size trained a 10-class head (its runs were the ``cifar10`` smoke runs, ids
included), ``recommend`` left a configuration whose every run failed out of its output without
a word, and ``benchmarks.run --only ... --set KEY=VALUE`` accepted a key that none of the picked
runs reads (the option was silently ignored); `--set lr=.01` was "not a number".
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.presets import build_runs
from benchmarks.recommend import main as recommend_main
from benchmarks.recommend import recommend
from benchmarks.results_io import read_rows, write_rows
from benchmarks.rows import failed_rows
from benchmarks.run import main as run_main
from benchmarks.run import sweep


def test_cifar100_smoke_has_100_classes():
    c10 = build_runs("cifar10", smoke=True)
    c100 = build_runs("cifar100", smoke=True)
    assert {r.config["synthetic_classes"] for r in c10} == {10}
    assert {r.config["synthetic_classes"] for r in c100} == {100}
    assert not {r.run_id for r in c10} & {r.run_id for r in c100}


def _sweep_dir(tmp_path) -> str:
    rows = [{"run_id": f"m{s}", "label": "WT + distinct masks", "config_id": "m",
             "dataset": "digits", "depth": 2, "width": 8, "mask_k": 2, "mask_density": 0.5,
             "seed": s, "status": "ok", "test_acc": 0.5 + 0.01 * s, "params": 1000,
             "train_time_s": 1.0} for s in (0, 1)]
    write_rows(tmp_path / "results.csv", rows)
    run_dir = tmp_path / "runs" / "wt_crashed"  # crashed: no done.json, no row
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(
        {"run_id": "wt_crashed", "label": "WT",
         "config": {"model": "wt_s", "dataset": "digits", "depth": 4, "width": 8, "seed": 0}}))
    return str(tmp_path)


def test_recommend_lists_configuration_whose_every_run_failed(tmp_path, capsys):
    out = _sweep_dir(tmp_path)
    rows = read_rows(os.path.join(out, "results.csv"))
    rows += failed_rows(out, {r["run_id"] for r in rows})
    pick = recommend(rows, params=10_000)
    assert pick["choice"]["label"] == "WT + distinct masks"
    assert [g["label"] for g in pick["unmeasured"]] == ["WT"]
    assert recommend_main([out, "--params", "10000"]) == 0
    text = capsys.readouterr().out
    assert "every run failed" in text and "WT, depth 4, width 8" in text


def test_only_with_set_that_no_picked_run_reads_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="f_max_iter"):
        sweep("quick", str(tmp_path / "a"), smoke=True, dry_run=True, only="wt_",
              overrides={"f_max_iter": 10}, echo=lambda *a: None)
    assert run_main(["quick", "--smoke", "--out", str(tmp_path / "b"), "--dry-run",
                     "--only", "wt_", "--set", "f_max_iter=10"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "f_max_iter" in err
    # the DEQ run it picks reads it: accepted, and part of that run's id
    report = sweep("quick", str(tmp_path / "c"), smoke=True, dry_run=True, only="deq",
                   overrides={"f_max_iter": 10}, echo=lambda *a: None)
    assert report.planned == 1


def test_set_float_spelled_without_leading_zero_is_a_number():
    # --set lr=.01 was refused with "lr must be a number; got '.01'" (JSON does not spell it),
    # though the trainer's --lr .01 reads it; it is the preset's own lr: the same run id
    plain = build_runs("quick", smoke=True)
    dotted = build_runs("quick", smoke=True, overrides={"lr": ".01"})
    assert [r.run_id for r in plain] == [r.run_id for r in dotted]
    assert {r.config["lr"] for r in dotted} == {0.01}


def test_sweep_setting_compares_values_as_the_runs_read_them(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep_setting.json").write_text(json.dumps({"smoke": True,
                                                        "overrides": {"lr": 0.01}}))
    report = sweep("quick", str(out), smoke=True, dry_run=True, overrides={"lr": ".01"},
                   echo=lambda *a: None)
    assert report.planned == len(build_runs("quick", smoke=True))
    with pytest.raises(ValueError, match="one setting"):
        sweep("quick", str(out), smoke=True, dry_run=True, overrides={"lr": ".02"},
              echo=lambda *a: None)
