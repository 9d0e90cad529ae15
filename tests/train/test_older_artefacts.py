"""Run directories written by older versions of the trainer, resumed by this one.

An older version saved fewer settings: a setting added since (e.g. ``tf32``) is missing from its
``config.json`` and from its checkpoint's identity. Such a run computed what the setting's
default computes, so ``--resume`` must continue it (it refused it as "a different run"), while
a setting that really differs is still refused. The old artefacts are written here by editing a
fresh run's files the way the older version wrote them (no git worktree needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wtmodels.checkpoint import load_checkpoint, save_checkpoint
from wtmodels.train import main, run

BASE = {"model": "test_wt", "dataset": "digits", "train_size": 64, "test_size": 32,
        "threads": 1, "progress": "none", "epochs": 2}
TIMING_KEYS = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _as_older_version(out: Path, dropped: str, **identity_train) -> None:
    """Rewrite ``out``'s config.json and checkpoint as a version without setting ``dropped``
    wrote them (``identity_train``: other values of the checkpoint's identity)."""
    config = json.loads((out / "config.json").read_text())
    del config["train"][dropped]
    (out / "config.json").write_text(json.dumps(config))
    state = load_checkpoint(out / "checkpoint.pt")
    del state["identity"]["train"][dropped]
    state["identity"]["train"].update(identity_train)
    save_checkpoint(out / "checkpoint.pt", state)


def test_resume_of_a_run_saved_before_a_setting_existed(tmp_path, train_killed_after_epoch,
                                                        capsys):
    ref, old = tmp_path / "ref", tmp_path / "old"
    run({**BASE, "out": str(ref)})
    train_killed_after_epoch({**BASE, "out": str(old)}, epoch=1)
    _as_older_version(old, "tf32")
    assert "tf32" not in load_checkpoint(old / "checkpoint.pt")["identity"]["train"]

    assert main(["--out", str(old), "--resume"]) == 0, capsys.readouterr().err
    # continued from epoch 1 (not restarted, not refused): the uninterrupted run's numbers
    assert [r["epoch"] for r in _rows(old)] == [1, 2]
    assert _rows(old) == _rows(ref)
    mine, theirs = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (old, ref))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert (old / "done.json").exists()


def test_an_older_checkpoint_of_another_run_is_still_refused(tmp_path, train_killed_after_epoch,
                                                             capsys):
    old = tmp_path / "old"
    train_killed_after_epoch({**BASE, "out": str(old)}, epoch=1)
    # the older checkpoint lacks tf32 and was trained at another learning rate than the
    # config.json beside it says: the missing key is its default, not a wildcard
    _as_older_version(old, "tf32", lr=0.5)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    assert main(["--out", str(old), "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"wtmodels.train: error: checkpoint {old / 'checkpoint.pt'} belongs to a "
                   "different run (differs in: lr)"]
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before


def test_an_older_cuda_run_keeps_tf32_missing():
    """Before tf32 existed a CUDA run's convolutions used TF32 (torch's default
    cudnn.allow_tf32=True, matmuls off): tf32=False (the default now) turns them off and
    tf32=True adds TF32 matmuls, so neither value is what it computed."""
    from wtmodels.train import _ran_on_cuda, _saved_identity

    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    state = {"identity": {"train": {"lr": 0.01}, "model_overrides": {}},
             "rng": [{"cuda": [], "torch": None}]}
    assert _saved_identity(state)["train"]["tf32"] is False  # a CPU run: the default
    assert "tf32" not in _saved_identity(state, ran_on_cuda=True)["train"]
    assert _saved_identity(state, ran_on_cuda=True)["train"]["lr"] == 0.01
    assert not _ran_on_cuda(state, {"env": {"device": "cpu"}})
    assert _ran_on_cuda(state, {"env": {"device": "cuda:0"}})
    assert _ran_on_cuda(state, {"env": {"device": "cpu"},
                                "resumes": [{"from_epoch": 1, "env": {"device": "cuda:1"}}]})
    assert _ran_on_cuda({**state, "rng": [{"cuda": [torch.zeros(16, dtype=torch.uint8)]}]}, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_older_cuda_run_resumed_on_cuda_is_refused(tmp_path, train_killed_after_epoch,
                                                      capsys):
    old = tmp_path / "old"
    train_killed_after_epoch({**BASE, "out": str(old), "device": "cuda"}, epoch=1)
    _as_older_version(old, "tf32")
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    assert main(["--out", str(old), "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "(differs in: tf32); it was saved before the tf32" in err[0]
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
