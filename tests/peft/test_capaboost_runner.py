"""Tests of the CapaBoost experiment runner and the PEFT speed benchmark (smoke sizes)."""

import csv
import json
import os

import pytest

from benchmarks import capaboost, peft_speed


def test_sweep_holds_equal_parameter_variants():
    configs = capaboost.sweep(smoke=False)
    labels = [c["label"] for c in configs]
    assert labels.count("LoRA") == labels.count("CapaBoost d=2") == labels.count("CapaBoost d=4")
    assert {c["rank"] for c in configs if c["method"] == "capaboost"} == set(capaboost.RANKS)
    assert all(c["density"] == 0.5 for c in configs if c["method"] == "capaboost")


def test_smoke_experiment_writes_results_plots_and_reuses_runs(tmp_path):
    out = tmp_path / "cb"
    rows = capaboost.run_capaboost(str(out), smoke=True, seeds=(0,), threads=None)
    assert {r["label"] for r in rows} == {"head only", "full", "LoRA", "CapaBoost d=2",
                                         "CapaBoost d=4"}
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 5
    by_label = {r["label"]: r for r in table}
    # equal trainable parameters for LoRA and CapaBoost at the same rank; rank grows with d
    assert by_label["LoRA"]["params"] == by_label["CapaBoost d=4"]["params"]
    assert int(by_label["head only"]["params"]) < int(by_label["LoRA"]["params"])
    assert int(by_label["LoRA"]["params"]) < int(by_label["full"]["params"])
    ranks = [float(by_label[k]["update_rank"]) for k in ("LoRA", "CapaBoost d=2",
                                                          "CapaBoost d=4")]
    assert ranks == [1.0, 2.0, 4.0]  # rank 1 per copy; the smoke model's layers allow 4
    for r in table:
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and r["git_sha"] and r["run_id"]
    # it learns: above chance (5 classes) after fine-tuning, full fine-tuning clearly so
    assert float(by_label["full"]["test_acc"]) > 0.35
    assert all(float(r["test_acc"]) > 0.22 for r in table)
    for name in ("accuracy_vs_params.png", "rank_vs_copies.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    # a rerun finds every finished run (done.json) and does not train again
    stamp = {p: os.path.getmtime(p) for p in out.glob("runs/*/metrics.jsonl")}
    again = capaboost.run_capaboost(str(out), smoke=True, seeds=(0,), threads=None)
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]
    assert stamp == {p: os.path.getmtime(p) for p in out.glob("runs/*/metrics.jsonl")}


def test_harness_runner_contract(tmp_path):
    config = {**capaboost.sweep(smoke=True)[2], "seed": 1}
    config.pop("label")
    metrics = capaboost.run(config, str(tmp_path / "runs" / "x"))
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["update_rank"] == 1.0
    assert (tmp_path / "runs" / "_pretrained").is_dir()  # the cache beside the run dirs
    lines = (tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == config["finetune_epochs"]


@pytest.mark.parametrize("argv,match", [
    (["--out", "X", "--smoke", "--dataset", "cifar"], "valid datasets: auto, fashion_mnist"),
    (["--out", "X", "--smoke", "--seeds", "a,b"], "seeds"),
    (["--out", "X", "--threads", "0"], "threads"),
    (["--smoke"], "--out"),
])
def test_capaboost_cli_bad_input_one_line_exit_2(tmp_path, capsys, argv, match):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    assert capaboost.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err
    assert not (tmp_path / "X").exists()


def test_bad_run_config_names_field(tmp_path):
    with pytest.raises(ValueError, match="method must be one of head, lora, capaboost, full"):
        capaboost.run({"method": "prefix"}, str(tmp_path))


def test_speed_benchmark_writes_ratios(tmp_path):
    rows = peft_speed.run_speed(str(tmp_path), cases=("capaboost_model",), batch=2, repeats=1)
    train = {r["variant"]: r for r in rows if r["measure"] == "train_step"}
    assert train["lora"]["ratio"] == 1.0 and train["capaboost_d4"]["ratio"] > 0
    assert {r["variant"] for r in rows if r["measure"] == "inference"} == {
        "base", "capaboost_d4_merged"}
    assert "| capaboost_model | inference |" in (tmp_path / "peft_speed.md").read_text()
    with open(tmp_path / "peft_speed.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_speed_cli_bad_case(capsys, tmp_path):
    assert peft_speed.main(["--out", str(tmp_path), "--cases", "vit"]) == 2
    assert "valid cases: wt_s, capaboost_model" in capsys.readouterr().err


def test_smoke_caps_the_sizes_only_on_a_dataset_other_than_digits():
    digits = capaboost.experiment_configs(smoke=True, seeds=(0,))
    assert all(c["pretrain_size"] is None for _, c in digits)  # all ~720 digits per task
    fashion = capaboost.experiment_configs(smoke=True, seeds=(0,), dataset="fashion_mnist")
    assert all(c[k] == v for _, c in fashion for k, v in capaboost.SMOKE_CAPS.items())
    full = capaboost.experiment_configs(seeds=(0,), dataset="fashion_mnist")
    assert all(c["pretrain_size"] == capaboost.SETTINGS["pretrain_size"] for _, c in full)


def _summary_rows(accs: dict[str, list[float]]) -> list[dict]:
    common = {"dataset": "digits", "model": "test_wt", "width": 8, "depth": 2, "stages": 1,
              "pretrain_test_acc": 0.5, "finetune_images": 10, "finetune_epochs": 1,
              "lr": 0.003, "test_images": 20, "git_sha": "x", "torch_version": "t",
              "threads": 1, "date": "d", "params": 9, "train_time_s": 1.0}
    rows = []
    for label, values in accs.items():
        for seed, acc in enumerate(values):
            ranked = label != "head only"
            rows.append({**common, "label": label, "seed": seed, "test_acc": acc,
                         "rank": 1 if ranked else None,
                         "update_rank": 1.0 if ranked else None,
                         "update_erank": 1.0 if ranked else None})
    return rows


def test_summary_numbers_by_hand(tmp_path):
    # LoRA 50, 60, 70 -> mean 60, sample std 10; CapaBoost 52, 60, 68 -> paired differences
    # +2, 0 (a tie is no win), -2 -> mean +0.00, 1 win of 3
    rows = _summary_rows({"LoRA": [0.5, 0.6, 0.7], "CapaBoost d=2": [0.52, 0.6, 0.68]})
    text = capaboost.write_summary(rows, str(tmp_path))
    assert "| LoRA | 1 | 9 | 60.00 +- 10.00 |  |" in text
    assert "| CapaBoost d=2 | 1 | 9 | 60.00 +- 8.00 | +0.00 (1/3) |" in text


def test_summary_single_seed_shows_no_std(tmp_path):
    # a sample std of one value is undefined: "+- 0.00" would claim a spread of zero
    rows = _summary_rows({"head only": [0.3], "LoRA": [0.5], "CapaBoost d=2": [0.55]})
    text = capaboost.write_summary(rows, str(tmp_path))
    assert "+-" not in text.split("| --- |")[-1]
    assert "| LoRA | 1 | 9 | 50.00 |  |" in text and "| +5.00 (1/1) |" in text
