"""Training harness (resume refusals, schedule, metrics) against known answers."""

from __future__ import annotations

import hashlib
import json
import math
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


def test_schedule_after_a_kill_and_resume_follows_the_hand_formula(tmp_path,
                                                                   train_killed_after_epoch):
    # 40 images / batch 16 = 3 steps per epoch, 3 epochs: T = 9 steps, warm-up 1 epoch = 3
    # steps; the row's lr is its last step's: step s (0-based) has lr * (s + 1) / 3 in the
    # warm-up, then min + (lr - min) * (1 + cos(pi * (s - 3) / 6)) / 2
    out = tmp_path / "run"
    settings = {**TINY, "epochs": 3, "warmup_epochs": 1.0, "min_lr": 1e-3, "out": str(out)}
    train_killed_after_epoch(settings)
    run({"out": str(out), "resume": True, "progress": "none"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["steps"] for r in rows] == [3, 6, 9]
    want = [0.01 * 3 / 3,
            1e-3 + (0.01 - 1e-3) * (1 + math.cos(math.pi * 2 / 6)) / 2,  # step 5
            1e-3 + (0.01 - 1e-3) * (1 + math.cos(math.pi * 5 / 6)) / 2]  # step 8
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)


def test_test_metrics_are_per_image_means_with_a_short_last_batch(tmp_path):
    # 20 test images in batches of 16 + 4: the mean over images, not over the two batches
    import torch
    import torch.nn.functional as F

    from wtmodels import data, models
    from wtmodels.checkpoint import load_checkpoint

    out = tmp_path / "run"
    final = run({**TINY, "test_batch_size": 16, "out": str(out)})
    _, test_ds, _ = data.get_datasets("digits", train_size=40, test_size=20)
    model = models.create_model("test_wt", num_classes=10, in_chans=1).eval()
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    x = torch.stack([test_ds[i][0] for i in range(20)])
    y = torch.tensor([int(test_ds[i][1]) for i in range(20)])
    with torch.no_grad():
        logits = model(x)
    assert final["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert final["test_acc"] == (logits.argmax(1) == y).sum().item() / 20
    assert final["images_per_s"] == pytest.approx(40 / final["epoch_time_s"], rel=1e-12)


def test_an_existing_out_that_takes_no_files_is_one_line_and_exit_2(tmp_path, capsys,
                                                                     monkeypatch):
    # an existing directory where files cannot be created (read-only, /proc; root ignores
    # chmod, so the write is made to fail): it was a PermissionError traceback, exit 1
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out / "config.json.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code = train_mod.main(["--model", "test_wt", "--train-size", "32", "--test-size", "16",
                           "--epochs", "1", "--progress", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot take the run's files: Permission denied" in err, err
    assert list(out.iterdir()) == []


def test_a_nan_in_a_max_statistic_is_not_dropped():
    # max(-inf, nan) is -inf in Python: a batch whose statistic was NaN vanished from the
    # epoch's maximum (a finite *_max beside a NaN mean); it counts as +inf (logged as null)
    from wtmodels.metrics import EpochMeter

    meter = EpochMeter()
    meter.update(1.0, 1, 2, {"rel_residual": float("nan"), "rel_residual_max": float("nan")})
    meter.update(1.0, 1, 2, {"rel_residual": 0.1, "rel_residual_max": 0.2})
    out = meter.reduce()
    assert math.isnan(out["rel_residual"]) and out["rel_residual_max"] == math.inf
    meter = EpochMeter()
    meter.update(1.0, 1, 2, {"rel_residual_max": 0.2})
    meter.update(1.0, 1, 2, {"rel_residual_max": 0.5})
    assert meter.reduce()["rel_residual_max"] == 0.5


def test_an_out_under_home_in_a_config_file_is_expanded(tmp_path, monkeypatch):
    # no shell expands `out: ~/...` in a config file: it made a directory named "~" in the cwd
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = cwd / "c.json"
    config.write_text(json.dumps({**TINY, "out": "~/runs/a"}))
    assert train_mod.main(["--config", str(config)]) == 0
    assert (home / "runs" / "a" / "done.json").is_file()
    assert not (cwd / "~").exists()
