"""Checkpoints, atomic writes, provenance and resume, as a new user meets them.

Known answers: a resumed run equals an uninterrupted one bit for bit (CPU); generator draws after
a restore equal the draws made right after the capture; the ranks of a DDP run hold distinct
generators; git's own view of the work tree decides ``-dirty``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.serialization

from wtmodels import atomic
from wtmodels import train as train_mod
from wtmodels.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from wtmodels.provenance import git_sha
from wtmodels.train import run

TIMING = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}
BASE = dict(model="test_wt", dataset="digits", train_size=128, test_size=64, batch_size=32,
            threads=1, progress="none", dropout=0.2, augment=True, seed=3, device="cpu")


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_checkpoint(d / "checkpoint.pt")["model"] for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_generator_is_put_back_including_numpy_s_cached_gaussian():
    gen = torch.Generator().manual_seed(5)
    np.random.seed(0)  # noqa: NPY002 - the global generator is what a checkpoint saves
    np.random.normal()  # noqa: NPY002 - the legacy polar method caches a second gaussian
    state = capture_rng_state(gen)
    assert state["numpy"]["has_gauss"] == 1

    def draws():
        return (torch.rand(3).tolist(), np.random.normal(), np.random.rand(),  # noqa: NPY002
                random.random(), random.gauss(0, 1), torch.rand(2, generator=gen).tolist())

    first = draws()
    torch.manual_seed(99)
    np.random.seed(99)  # noqa: NPY002
    random.seed(99)
    gen.manual_seed(99)
    restore_rng_state(state, gen)
    assert draws() == first


def test_a_failed_checkpoint_write_keeps_the_last_epoch_and_resumes_exactly(tmp_path,
                                                                            monkeypatch):
    # disk full at the rename of epoch 2's checkpoint: epoch 1's stays, no temporary is left,
    # metrics.jsonl agrees with it, and --resume ends where an uninterrupted run ends
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run({**BASE, "epochs": 3, "out": str(ref)})
    real, seen = os.replace, []

    def full_disk(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            seen.append(dst)
            if len(seen) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run({**BASE, "epochs": 3, "out": str(crashed)})
    monkeypatch.undo()
    assert sorted(p.name for p in crashed.iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.jsonl", "model_info.json"]
    assert load_checkpoint(crashed / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in _rows(crashed)] == [1]
    run({"out": str(crashed), "resume": True, "progress": "none"})
    assert _rows(crashed) == _rows(ref) and [r["epoch"] for r in _rows(ref)] == [1, 2, 3]
    assert _same_weights(ref, crashed)


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_machine_without_one(tmp_path, monkeypatch,
                                                                     train_killed_after_epoch):
    # a run on "cuda:0" stores its tensors with that location and a CUDA generator state; a
    # CPU-only machine must map them to the CPU and continue exactly as the CPU run would
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run({**BASE, "epochs": 2, "out": str(ref)})
    train_killed_after_epoch({**BASE, "epochs": 2, "out": str(moved)})
    state = load_checkpoint(moved / "checkpoint.pt")
    state["rng"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # one GPU's generator
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(moved / "checkpoint.pt", state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="CUDA"):  # what a plain torch.load would do
        torch.load(moved / "checkpoint.pt", weights_only=True)
    run({"out": str(moved), "resume": True, "progress": "none"})
    assert _rows(moved) == _rows(ref) and _same_weights(ref, moved)


def test_a_run_resumed_on_more_processes_gives_each_rank_its_own_generators(
        tmp_path, train_killed_after_epoch):
    # a 1-process checkpoint resumed under torchrun with 2 ranks: rank 1 took rank 0's
    # generators and drew the same dropout masks as rank 0 for the rest of the run (the final
    # checkpoint held two equal states); a fresh 2-process run seeds each rank apart
    out = tmp_path / "run"
    train_killed_after_epoch({**BASE, "epochs": 2, "out": str(out)})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wtmodels.train", "--out", str(out), "--resume", "--progress", "none"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["rng"]) == 2
    rank0, rank1 = state["rng"]
    assert not torch.equal(rank0["torch"], rank1["torch"])
    assert rank0["python"] != rank1["python"]


def _git_repo(root: Path) -> str:
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=n"]
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "wtmodels").mkdir()
    (root / "wtmodels" / "a.py").write_text("x = 1\n")
    (root / "benchmarks" / "results" / "t.md").write_text("numbers\n")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run([*git, *cmd], cwd=root, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_sha_dirty_follows_the_tracked_code_only(tmp_path):
    sha = _git_repo(tmp_path)
    code = tmp_path / "wtmodels" / "a.py"
    assert git_sha(str(tmp_path)) == sha and len(sha) == 12
    (tmp_path / "wtmodels" / "new.py").write_text("y = 2\n")  # untracked: not counted
    assert git_sha(str(tmp_path)) == sha
    code.write_text("x = 2\n")
    subprocess.run(["git", "add", "wtmodels/a.py"], cwd=tmp_path, check=True)
    code.write_text("x = 1\n")  # staged edit, work tree back to HEAD: still not HEAD's code
    assert git_sha(str(tmp_path)) == sha + "-dirty"
    subprocess.run(["git", "reset", "-q"], cwd=tmp_path, check=True)
    assert git_sha(str(tmp_path)) == sha
    (tmp_path / "benchmarks" / "results" / "t.md").unlink()  # a results file removed: clean
    assert git_sha(str(tmp_path)) == sha
    code.unlink()  # a code file removed: dirty
    assert git_sha(str(tmp_path)) == sha + "-dirty"


def test_a_gpu_run_resumed_on_a_machine_without_one_says_how(tmp_path, monkeypatch, capsys):
    # a run started with --device cuda (its config.json says so), resumed where there is no GPU:
    # the refusal named only "device=cuda", which the user never typed for this --resume
    out = tmp_path / "run"
    run({**BASE, "epochs": 1, "out": str(out)})
    config = json.loads((out / "config.json").read_text())
    config["train"]["device"] = "cuda"
    (out / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert train_mod.main(["--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--device cpu" in err, err
    assert train_mod.main(["--resume", "--out", str(out), "--device", "cpu",
                           "--progress", "none"]) == 0
