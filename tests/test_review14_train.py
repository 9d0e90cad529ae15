"""Review 14: training harness (resume refusals, schedule, metrics) against known answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wtmodels import train as train_mod
from wtmodels.train import run

TINY = dict(model="test_wt", dataset="digits", train_size=40, test_size=20, batch_size=16,
            threads=1, progress="none", seed=0, device="cpu", epochs=1)


def _snapshot(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("r14") / "run"
    run({**TINY, "out": str(out)})
    return out


def test_resume_names_every_differing_setting(finished, capsys):
    # lr and epochs both differ: one line naming both (it named epochs alone, so the retry
    # with the epochs fixed failed again on lr)
    before = _snapshot(finished)
    code = train_mod.main(["--out", str(finished), "--resume", "--lr", "0.5", "--epochs", "2",
                           "--depth", "2"])  # depth 2 is the run's own (test_wt's default)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "epochs=2" in err and "lr=0.5" in err and "depth" not in err, err
    assert "epochs=1" in err and "lr=0.01" in err, err  # the run's values
    assert _snapshot(finished) == before


@pytest.mark.parametrize("damage", ["no_history", "short_history", "epoch_str", "rng_empty",
                                    "rng_bad"])
def test_a_damaged_checkpoint_of_ours_is_one_line_and_exit_2(finished, tmp_path, capsys,
                                                             damage):
    # a file with our format marker but a key missing or malformed raised a KeyError /
    # TypeError traceback (exit 1); README: a truncated or foreign checkpoint is exit 2
    import shutil

    from wtmodels.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = load_checkpoint(out / "checkpoint.pt")
    state.pop("format")
    if damage == "no_history":
        del state["history"]
    elif damage == "short_history":
        state["history"] = []
    elif damage == "epoch_str":
        state["epoch"] = "1"
    elif damage == "rng_empty":
        state["rng"] = []
    else:
        state["rng"] = [{"torch": state["rng"][0]["torch"]}]  # numpy and python states lost
    save_checkpoint(out / "checkpoint.pt", state)
    before = _snapshot(out)
    code = train_mod.main(["--out", str(out), "--resume", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "damaged" in err, err
    assert _snapshot(out) == before
