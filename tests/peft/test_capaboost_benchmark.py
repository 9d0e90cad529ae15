"""The CapaBoost benchmark (benchmarks/capaboost.py) against independent answers."""

from __future__ import annotations

import pytest
import torch

from benchmarks import capaboost as cb


def _tiny(config: dict) -> dict:
    """The experiment's sizes and data, on the tiny model for one epoch (seconds)."""
    return {**config, "model": "test_wt", "width": 8, "depth": 2, "stages": 1,
            "pretrain_epochs": 1, "finetune_epochs": 1}


def _digits_task_b_images() -> int:
    from sklearn.datasets import load_digits

    return int((torch.as_tensor(load_digits().target) >= 5).sum())  # all 1797 images


def test_full_size_settings_run_on_digits(tmp_path):
    # --dataset digits (and auto without Fashion-MNIST installed, which README promises falls
    # back to digits) used the Fashion-MNIST sizes: pretrain_size 12000 > digits' 1437
    # training images, and every run failed with "train_size must be in [1, 1437]"
    (label, config), = [(lab, c) for lab, c in cb.experiment_configs(
        seeds=(0,), dataset="digits") if c["method"] == "lora" and c["rank"] == 1]
    assert config["pretrain_size"] == 12000 and config["test_size"] == 4000
    metrics = cb.run(_tiny(config), str(tmp_path / "runs" / "one"))
    # every digits image of classes 5-9 (train and test splits together) is used
    assert metrics["finetune_images"] + metrics["test_images"] == _digits_task_b_images()
    assert metrics["dataset"] == "digits" and metrics["update_rank"] == 1


def test_smaller_digits_sizes_are_kept():
    assert cb.fit_sizes({"pretrain_size": 600, "test_size": 4000}, "digits") == {
        "pretrain_size": 600, "test_size": None}
    fashion = {"pretrain_size": 12000, "test_size": 4000}
    assert cb.fit_sizes(fashion, "fashion_mnist") == fashion


def test_smoke_auto_falling_back_to_digits_uses_all_images(monkeypatch, tmp_path):
    # --smoke capped the sizes for auto too when auto meant digits: test_size 1000 > 360
    monkeypatch.setattr(cb, "_fashion_mnist_dir", lambda: None)
    configs = cb.experiment_configs(smoke=True, seeds=(0,), dataset="auto")
    assert all(c["pretrain_size"] is None and c["test_size"] is None for _, c in configs)
    _, config = configs[0]
    metrics = cb.run(_tiny(config), str(tmp_path / "runs" / "head"))
    assert metrics["finetune_images"] + metrics["test_images"] == _digits_task_b_images()


def test_rank_bound_of_identical_copies_is_the_rank():
    # density 1: the d copies are one update times d, of rank <= r; the bound said d * r
    from torch import nn

    from wtmodels.peft import add_lora

    torch.manual_seed(0)
    for copies, density, bound in ((4, 1.0, 2), (4, 0.5, 8), (1, 1.0, 2)):
        net = nn.Sequential(nn.Linear(8, 8))
        (layer,) = add_lora(net, rank=2, copies=copies, density=density, targets=nn.Linear)
        nn.init.normal_(layer.lora_B)
        (row,) = cb.update_ranks(net)
        assert row["bound"] == bound and row["rank"] <= row["bound"]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))
