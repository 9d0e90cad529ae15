"""``--resume`` continues bit-exactly on the CPU after a crash or a kill at any moment.

Every comparison is against an uninterrupted run with the same settings: final weights equal
exactly (``torch.equal``), every metrics line equal except the timing and memory fields, and
``metrics.jsonl`` holds each epoch exactly once. The runs use augmentation, dropout and (for the
DEQ) a randomly scheduled Hutchinson Jacobian term, so every random generator matters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wtmodels import train as train_mod
from wtmodels.atomic import atomic_write, atomic_write_bytes
from wtmodels.checkpoint import load_checkpoint
from wtmodels.train import run

TIMING_KEYS = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}
# device="cpu": these checks compare runs bit for bit, which CUDA kernels do not promise
BASE = dict(model="test_wt", dataset="digits", train_size=192, test_size=96, batch_size=32,
            threads=1, progress="none", dropout=0.2, augment=True, seed=3, device="cpu")
DEQ = dict(BASE, model="test_deq", jac_reg_weight=0.1, jac_reg_freq=0.5, pretrain_steps=4)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _assert_same_run(a: Path, b: Path):
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["epoch"] for r in rows_b] == list(range(1, len(rows_a) + 1))
    assert _strip(rows_a) == _strip(rows_b)
    wa = load_checkpoint(a / "checkpoint.pt")["model"]
    wb = load_checkpoint(b / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "done.json").read_text())["final"].keys() == \
        json.loads((b / "done.json").read_text())["final"].keys()


def test_crash_between_checkpoint_and_metrics_then_resume(tmp_path, monkeypatch):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run({**BASE, "epochs": 3, "out": str(ref)})

    real = train_mod.atomic_write_jsonl
    calls = {"n": 0}

    def flaky(path, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # start, epoch 1, then die after epoch 2's checkpoint was saved
            raise KeyboardInterrupt("simulated kill")
        real(path, rows)

    monkeypatch.setattr(train_mod, "atomic_write_jsonl", flaky)
    with pytest.raises(KeyboardInterrupt):
        run({**BASE, "epochs": 3, "out": str(crashed)})
    monkeypatch.setattr(train_mod, "atomic_write_jsonl", real)
    assert load_checkpoint(crashed / "checkpoint.pt")["epoch"] == 2
    assert [r["epoch"] for r in _rows(crashed)] == [1]  # metrics lag the checkpoint here

    run({"out": str(crashed), "resume": True, "progress": "none"})
    _assert_same_run(ref, crashed)


def test_resume_with_other_data_loader_workers_is_exact(tmp_path, train_killed_after_epoch):
    # augmentation follows (seed, epoch, index) in whichever process draws it: a run with two
    # workers, killed and resumed without workers, equals one run without workers
    settings = {**BASE, "epochs": 3, "num_workers": 2}
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run({**settings, "num_workers": 0, "out": str(ref)})
    train_killed_after_epoch({**settings, "out": str(crashed)}, epoch=2)
    assert load_checkpoint(crashed / "checkpoint.pt")["epoch"] == 2
    run({"out": str(crashed), "resume": True, "progress": "none", "num_workers": 0})
    _assert_same_run(ref, crashed)


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch):
    ref, early = tmp_path / "ref", tmp_path / "early"
    run({**BASE, "epochs": 2, "out": str(ref)})
    monkeypatch.setattr(train_mod._Trainer, "_save", lambda self, e: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run({**BASE, "epochs": 2, "out": str(early)})
    monkeypatch.undo()
    assert (early / "config.json").exists() and not (early / "checkpoint.pt").exists()
    run({**BASE, "epochs": 2, "out": str(early), "resume": True})
    _assert_same_run(ref, early)


def test_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    out = tmp_path / "done"
    first = run({**BASE, "epochs": 1, "out": str(out)})
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    again = run({"out": str(out), "resume": True, "progress": "none"})
    assert again == first and capsys.readouterr().out == ""
    assert (out / "checkpoint.pt").read_bytes() == before
    # with progress on, it says so instead of exiting silently
    run({"out": str(out), "resume": True, "progress": "lines"})
    said = capsys.readouterr().out
    assert "nothing to train" in said and "epoch 1/1" in said


def test_kill_a_real_process_mid_run_then_resume(tmp_path):
    """SIGKILL a training subprocess right after its first checkpoint, resume, compare."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    settings = {**DEQ, "epochs": 5}
    run({**settings, "out": str(ref)})

    argv = [sys.executable, "-m", "wtmodels.train", "--out", str(killed)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    epochs_done = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert 1 <= epochs_done < 5

    assert train_mod.main(["--out", str(killed), "--resume", "--progress", "none"]) == 0
    _assert_same_run(ref, killed)


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"good")

    def dies(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp left


def test_resume_refuses_a_model_whose_registered_definition_changed(tmp_path, monkeypatch):
    from wtmodels import models as model_registry

    out = tmp_path / "run"
    run({**BASE, "epochs": 1, "out": str(out)})
    original = model_registry._REGISTRY["test_wt"]
    monkeypatch.setitem(model_registry._REGISTRY, "test_wt", lambda: {**original(), "depth": 3})
    message = r"registered model 'test_wt' now differs .*\(in: depth\)"
    with pytest.raises(ValueError, match=message):
        run({**BASE, "epochs": 1, "out": str(out), "resume": True})
    monkeypatch.setitem(model_registry._REGISTRY, "test_wt", original)
    assert run({**BASE, "epochs": 1, "out": str(out), "resume": True})["epoch"] == 1


def test_resume_computes_on_the_saved_device_unless_given_anew(tmp_path, monkeypatch):
    # the process context was built from the flags before the saved settings were read, so a
    # run started with --device cpu and resumed with plain --resume went to the GPU ("auto")
    out = tmp_path / "run"
    run({**BASE, "epochs": 1, "device": "cpu", "out": str(out)})
    asked = []
    real = train_mod.DistContext.from_env
    monkeypatch.setattr(train_mod.DistContext, "from_env",
                        lambda device="auto": (asked.append(device), real(device))[1])
    run({"out": str(out), "resume": True, "progress": "none"})
    run({"out": str(out), "resume": True, "progress": "none", "device": "auto"})
    assert asked == ["cpu", "auto"]


def test_resume_removes_the_temporary_files_a_kill_left(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = train_mod.atomic_write_jsonl, {"n": 0}

    def dies_after_epoch_1(path, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # start, epoch 1, then die after epoch 2's checkpoint
            raise KeyboardInterrupt("simulated kill")
        real(path, rows)

    monkeypatch.setattr(train_mod, "atomic_write_jsonl", dies_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run({**BASE, "epochs": 3, "out": str(out)})
    monkeypatch.undo()
    leftovers = [out / "checkpoint.pt.k1ll3d.tmp", out / "metrics.jsonl.x9.tmp"]
    kept = out / "notes.txt.1.tmp"  # not one of the run's files: left alone
    for path in [*leftovers, kept]:
        path.write_bytes(b"partial")
    run({"out": str(out), "resume": True, "progress": "none"})
    assert not any(p.exists() for p in leftovers) and kept.exists()
    assert [r["epoch"] for r in _rows(out)] == [1, 2, 3]
