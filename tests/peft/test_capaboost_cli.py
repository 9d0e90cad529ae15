"""CLI checks of the CapaBoost experiment (benchmarks/capaboost.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import capaboost
from benchmarks import capaboost as cb


def test_seed_beyond_torch_range_is_refused_before_anything_is_written(tmp_path, capsys):
    # a seed of 2**64 passed the check, pretrained the model into --out, then failed inside
    # torch.manual_seed with "Overflow when unpacking long long", leaving the folder behind
    with pytest.raises((ValueError, RuntimeError)):  # (RuntimeError on torch 2.4)
        torch.manual_seed(2**64)  # torch's own range ends at 2**64 - 1 (the oracle)
    out = tmp_path / "x"
    assert cb.main(["--smoke", "--seeds", str(2**64), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2**64" in err
    assert not out.exists()


def test_largest_torch_seed_is_accepted():
    torch.manual_seed(2**64 - 1)  # torch accepts it, so the experiment must too
    torch.manual_seed(0)
    assert {c["seed"] for _, c in cb.experiment_configs(smoke=True, seeds=(2**64 - 1,))} == {
        2**64 - 1}


def test_check_config_refuses_seed_out_of_range():
    config = {**cb.sweep(smoke=True)[2], "seed": 2**64}
    config.pop("label")
    with pytest.raises(ValueError, match=r"2\*\*64"):
        cb.check_config(config)
    with pytest.raises(ValueError, match="seed"):
        cb.check_config({**config, "seed": -1})


@pytest.mark.parametrize("kind", ["file", "below_file"])
def test_capaboost_cli_unusable_out_one_line_exit_2(tmp_path, capsys, kind):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "sub"
    assert capaboost.main(["--out", str(out), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err
