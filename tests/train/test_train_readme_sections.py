"""The README's Data and Training sections, as a new user: the defects found."""
from __future__ import annotations

import pytest

from wtmodels import train as train_mod
from wtmodels.data import build_loaders, get_datasets
from wtmodels.train import run

TINY = dict(model="test_wt", dataset="digits", epochs=1, train_size=32, test_size=16,
            batch_size=16, progress="none")


def test_a_data_seed_no_subset_reads_is_refused(tmp_path, capsys):
    # digits without --train-size / --test-size draws nothing from --data-seed: it was
    # silently ignored (two "seeds" of one experiment were the same run)
    out = tmp_path / "r"
    assert train_mod.main(["--model", "test_wt", "--data-seed", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_seed" in err[0] and not out.exists()
    # with a subset, or on synthetic data, it is read
    run({**TINY, "data_seed": 5})
    run({**TINY, "data_seed": 5, "train_size": None})  # the test subset still reads it
    run({**TINY, "dataset": "synthetic", "data_seed": 5, "train_size": None, "test_size": None,
         "image_size": 8})


@pytest.mark.parametrize("seed", [-1, 2**64, True, 1.5])
def test_data_api_seeds_out_of_range_name_the_seed(seed):
    # were: numpy's "expected non-negative integer", torch's "Overflow when unpacking long
    # long", and seed -1 silently gave the synthetic images of seed 2**64 - 1
    with pytest.raises(ValueError, match="seed must be an integer in"):
        get_datasets("digits", train_size=8, seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        get_datasets("synthetic", train_size=8, test_size=8, image_size=4, seed=seed)
    tr, te, _ = get_datasets("digits", train_size=8, test_size=8)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        build_loaders(tr, te, batch_size=4, seed=seed)


def test_data_api_seed_at_the_end_of_its_range_works():
    tr, te, _ = get_datasets("digits", train_size=8, test_size=8, seed=2**64 - 1)
    loader, _ = build_loaders(tr, te, batch_size=4, seed=2**64 - 1)
    loader.sampler.set_epoch(0)
    assert next(iter(loader))[0].shape == (4, 1, 8, 8)


def test_a_left_over_temporary_stopped_file_is_removed(tmp_path):
    # a kill while stopped.json was being written left its temporary file for good
    out = tmp_path / "r"
    run({**TINY, "epochs": 2, "out": str(out)})
    leftover = out / "stopped.json.k1ll3d.tmp"
    leftover.write_bytes(b"partial")
    run({"out": str(out), "resume": True, "progress": "none"})
    assert not leftover.exists()
