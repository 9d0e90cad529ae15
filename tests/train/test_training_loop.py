"""The training loop: learning, metrics schema, schedules, DEQ practice, non-finite steps.

Runs use the registered tiny models (``test_wt``, ``test_deq``, ``test_ode``) on subsets of the
built-in digits with one CPU thread, so each takes about a second.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from wtmodels import models as model_registry
from wtmodels import train as train_mod
from wtmodels.checkpoint import load_checkpoint
from wtmodels.optim import warmup_cosine
from wtmodels.train import BadInput, TrainingDiverged, jac_reg_step, run
from wtmodels.train_config import TrainConfig

BASE = dict(model="test_wt", dataset="digits", train_size=256, test_size=128, batch_size=32,
            threads=1, progress="none")
STEPS_PER_EPOCH = 256 // 32


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_learns_digits_and_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    final = run({**BASE, "train_size": None, "epochs": 8, "lr": 0.02, "out": str(out)})
    assert final["test_acc"] > 0.3  # chance is 0.1; seeds 0-5 reach 0.72-0.88 in 8 epochs
    assert final["train_loss"] < math.log(10)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
                "images_per_s", "peak_mem_mb", "skipped_steps", "lr", "cell_evals"):
        assert key in rows[0], key
    assert rows[0]["cell_evals"] == 2.0  # test_wt: depth 2, one stage
    assert rows[-1]["steps"] == 8 * math.ceil(1437 / 32)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"] == "test_wt" and config["model_config"]["depth"] == 2
    assert config["data_info"] == {"name": "digits", "num_classes": 10, "in_chans": 1,
                                   "image_size": 8}
    assert config["env"]["torch_version"] == torch.__version__
    info = json.loads((out / "model_info.json").read_text())
    assert info["params"] == sum(p.numel() for p in
                                 model_registry.create_model("test_wt", in_chans=1).parameters())
    done = json.loads((out / "done.json").read_text())
    assert done["epochs"] == 8 and done["final"]["test_acc"] == final["test_acc"]
    assert final["best_test_acc"] == max(r["test_acc"] for r in rows)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 8 and ckpt["global_step"] == rows[-1]["steps"]


def test_run_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run({**BASE, "epochs": 1})
    assert list(tmp_path.iterdir()) == []


def test_out_and_data_dir_may_be_paths(tmp_path):
    # run({"out": tmp_path / "run"}) was refused: "out must be a string; got PosixPath(...)"
    from PIL import Image
    data = tmp_path / "images"  # an ImageFolder tree: digits reads no data_dir (refused)
    for split in ("train", "val"):
        for c in range(2):
            (data / split / str(c)).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (255 * c, 0, 0)).save(data / split / str(c) / f"{i}.png")
    out = tmp_path / "run"
    run({**BASE, "dataset": "imagefolder", "image_size": 8, "train_size": None,
         "test_size": None, "epochs": 1, "out": out, "data_dir": data})
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["out"] == str(out) and config["train"]["data_dir"] == str(data)
    assert run({"out": out, "resume": True, "progress": "none"})["epoch"] == 1


def test_threads_are_restored():
    before = torch.get_num_threads()
    run({**BASE, "epochs": 1, "threads": 1, "train_size": 64})
    assert torch.get_num_threads() == before


def test_deq_metrics_and_eval_budget(tmp_path):
    out = tmp_path / "deq"
    run({**BASE, "model": "test_deq", "epochs": 1, "eval_f_max_iter": 3, "f_max_iter": 6,
         "out": str(out)})
    (row,) = _rows(out)
    for key in ("nstep", "rel_residual", "rel_residual_max", "converged", "diverged",
                "cell_evals", "train_nstep"):
        assert key in row, key
    assert 1 <= row["nstep"] <= 3  # the test pass uses the eval budget ...
    assert row["train_nstep"] <= 6  # ... the training pass the training one
    assert 0.0 <= row["converged"] <= 1.0 and row["rel_residual_max"] >= row["rel_residual"]


def test_ode_metrics_have_nfe(tmp_path):
    final = run({**BASE, "model": "test_ode", "epochs": 1, "train_size": 64, "test_size": 32})
    assert final["nfe"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_and_cosine_schedule(optimizer):
    final = run({**BASE, "optimizer": optimizer, "epochs": 2, "lr": 0.05, "warmup_epochs": 0.5,
                 "min_lr": 0.001})
    total, warm = 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH // 2
    # the last step of the run uses the cosine's value at step total-1
    expected = 0.001 + (0.05 - 0.001) * 0.5 * (1 + math.cos(math.pi * (total - 1 - warm)
                                                            / (total - warm)))
    assert final["lr"] == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(final["train_loss"])


def test_constant_schedule_and_warmup_values():
    final = run({**BASE, "epochs": 1, "schedule": "constant", "warmup_epochs": 0, "lr": 0.01})
    assert final["lr"] == pytest.approx(0.01)
    assert [warmup_cosine(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(52, 100, 4) == pytest.approx(0.5)


def _spy_models(monkeypatch, on_create):
    """Wrap create_model so a test can watch or perturb the model the trainer builds."""
    real = model_registry.create_model

    def create(name, **overrides):
        model = real(name, **overrides)
        on_create(model)
        return model

    monkeypatch.setattr(model_registry, "create_model", create)


def test_pretrain_steps_then_solver(monkeypatch):
    calls = []

    def watch(model):
        real = model.set_pretrain
        model.set_pretrain = lambda enabled: (calls.append(bool(enabled)), real(enabled))[1]

    _spy_models(monkeypatch, watch)
    final = run({**BASE, "model": "test_deq", "epochs": 2, "pretrain_steps": 5})
    # epoch 1: on at step 0, off at step 5, off for the evaluation; epoch 2 (steps 8-15):
    # the training mode is set again at its first step (off), then off for the evaluation
    assert calls == [True, False, False, False, False]
    assert "nstep" in final


def test_jacobian_regularisation_weight_and_frequency(monkeypatch):
    enabled = []

    def watch(model):
        real = model.set_jac_reg
        model.set_jac_reg = lambda on: (enabled.append(bool(on)), real(on))[1]

    _spy_models(monkeypatch, watch)
    final = run({**BASE, "model": "test_deq", "epochs": 1, "jac_reg_weight": 0.5,
                 "jac_reg_freq": 0.5, "seed": 4})
    train_calls = enabled[:STEPS_PER_EPOCH]
    assert train_calls == [jac_reg_step(4, s, 0.5) for s in range(STEPS_PER_EPOCH)]
    assert 0 < sum(train_calls) < STEPS_PER_EPOCH
    assert final["jac_loss"] > 0


def test_jac_loss_is_not_computed_during_the_unrolled_warm_up(tmp_path):
    # 10 warm-up steps cover all of epoch 1 (8 steps): no DEQ solve there, so no Jacobian
    # term (its zeros used to dilute the logged mean)
    out = tmp_path / "run"
    run({**BASE, "model": "test_deq", "epochs": 2, "pretrain_steps": 10, "jac_reg_weight": 0.3,
         "out": str(out)})
    rows = _rows(out)
    assert rows[0]["jac_loss"] is None and rows[1]["jac_loss"] > 0


def _poison(model, bad_steps):
    """Make the training forward pass return NaN logits at the given call numbers."""
    real_forward = model.forward
    count = {"n": 0}

    def forward(x):
        logits = real_forward(x)
        if model.training:
            count["n"] += 1
            if count["n"] - 1 in bad_steps:
                return logits * float("nan")
        return logits

    model.forward = forward


def test_non_finite_losses_are_skipped_and_counted(monkeypatch, tmp_path):
    _spy_models(monkeypatch, lambda m: _poison(m, {2, 5, 11}))
    out = tmp_path / "skip"
    final = run({**BASE, "epochs": 2, "out": str(out)})
    rows = _rows(out)
    assert [r["skipped_steps"] for r in rows] == [2, 1]
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["test_loss"])
    weights = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_non_finite_gradient_with_a_finite_loss_is_skipped_without_clipping(monkeypatch,
                                                                           tmp_path):
    # with --grad-clip 0 the gradient norm was never computed, so a NaN gradient behind a
    # finite loss reached optimizer.step() and made every weight NaN for good
    def poison_grads(model):
        count = {"n": 0}

        def hook(grad):
            count["n"] += 1
            return grad * float("nan") if count["n"] == 3 else grad

        model.head.weight.register_hook(hook)

    _spy_models(monkeypatch, poison_grads)
    out = tmp_path / "noclip"
    final = run({**BASE, "epochs": 1, "grad_clip": 0.0, "out": str(out)})
    assert final["skipped_steps"] == 1
    weights = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert math.isfinite(final["test_loss"])


def test_a_run_of_non_finite_losses_stops_with_the_checkpoint_intact(monkeypatch, tmp_path):
    _spy_models(monkeypatch, lambda m: _poison(m, set(range(STEPS_PER_EPOCH + 3, 10_000))))
    out = tmp_path / "diverge"
    with pytest.raises(TrainingDiverged, match="5 consecutive non-finite losses in epoch 2.*"
                                               "last good checkpoint .* \\(epoch 1\\)"):
        run({**BASE, "epochs": 3, "max_bad_steps": 5, "out": str(out)})
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in _rows(out)] == [1]
    assert not (out / "done.json").exists()
    # the unfinished epoch's skipped steps, which no metrics row holds, are in stopped.json
    stopped = json.loads((out / "stopped.json").read_text())
    assert (stopped["epoch"], stopped["skipped_steps"]) == (2, 5)
    assert "5 consecutive non-finite losses" in stopped["reason"]
    monkeypatch.undo()  # healthy again: --resume trains, and clears it
    run({"out": str(out), "resume": True})
    assert (out / "done.json").exists() and not (out / "stopped.json").exists()


def test_diverged_exit_status_and_message(monkeypatch, tmp_path, capsys):
    _spy_models(monkeypatch, lambda m: _poison(m, set(range(10_000))))
    code = train_mod.main(["--model", "test_wt", "--train-size", "64", "--batch-size", "16",
                           "--threads", "1",
                           "--progress", "none", "--max-bad-steps", "2", "--out",
                           str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == train_mod.EXIT_DIVERGED == 3
    assert err.count("\n") == 1 and "no checkpoint had been written yet" in err


def test_amp_bf16_and_channels_last_run(tmp_path):
    for masks in (0, 2):
        final = run({**BASE, "epochs": 1, "amp": True, "channels_last": True, "mask_k": masks})
        assert math.isfinite(final["train_loss"]) and final["test_acc"] >= 0


def test_label_smoothing_and_sgd_nesterov_run():
    final = run({**BASE, "epochs": 1, "optimizer": "sgd", "nesterov": True,
                 "label_smoothing": 0.1, "grad_clip": 0.0})
    assert math.isfinite(final["train_loss"])


def test_progress_lines_bar_and_none(capsys):
    run({**BASE, "epochs": 2, "train_size": 64, "progress": "lines"})
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in out] == ["epoch 1/2", "epoch 2/2"]
    assert "test_acc" in out[0] and "img/s" in out[0]
    run({**BASE, "epochs": 1, "train_size": 64, "progress": "bar"})
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err  # the tqdm bar (stderr) ...
    assert captured.out.startswith("epoch 1/1")  # ... then the epoch line
    run({**BASE, "epochs": 1, "train_size": 64, "progress": "none"})
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        not os.environ.get("WTMODELS_TEST_INDUCTOR"),
        reason="1-2 min of C++ code generation on a 2-core CPU; WTMODELS_TEST_INDUCTOR=1 runs it")),
])
def test_compiled_deq_with_ift_trains_past_a_recompilation(tmp_path, monkeypatch, backend):
    # the IFT backward solve calls the compiled backward once per iteration: with donated
    # buffers (torch's default) the recompilation at the last, smaller batch crashed the run.
    # Donated buffers belong to AOTAutograd, which every backend here goes through: "aot_eager"
    # (no code generation) crashed the same way without the fix, in a fifth of the time.
    import torch._functorch.config as functorch_config

    compile_with_inductor = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compile_with_inductor(model, backend=backend, **kw))
    before = getattr(functorch_config, "donated_buffer", None)  # (torch 2.4 has no such flag)
    out = tmp_path / "run"
    final = run({**BASE, "model": "test_deq", "train_size": 80, "epochs": 1, "compile": True,
                 "out": str(out)})  # batches 32, 32, 16
    assert math.isfinite(final["train_loss"]) and (out / "done.json").exists()
    assert getattr(functorch_config, "donated_buffer", None) == before  # restored after the run


@pytest.mark.parametrize("settings, unread", [
    ({"dataset": "digits", "data_dir": "/data"}, {"data_dir"}),
    ({"dataset": "synthetic", "download": True}, {"download"}),
    ({"dataset": "imagefolder", "data_dir": "/data", "download": True}, {"download"}),
    ({"dataset": "cifar10", "data_dir": "/data", "download": True}, set()),
])
def test_data_settings_a_dataset_never_reads_are_refused(settings, unread):
    from wtmodels.train_config import settings_without_effect
    assert set(settings_without_effect(TrainConfig(model="test_wt", **settings))) == unread
    if unread:
        with pytest.raises(BadInput, match="would silently ignore " + next(iter(unread))):
            run({**BASE, **settings, "epochs": 1})


def test_a_warm_up_longer_than_the_run_is_refused(capsys):
    with pytest.raises(ValueError, match=r"warmup_epochs must be <= epochs \(2\); got 3"):
        TrainConfig(model="test_wt", epochs=2, warmup_epochs=3)
    assert TrainConfig(model="test_wt", epochs=2, warmup_epochs=2).warmup_epochs == 2
    assert train_mod.main(["--epochs", "1", "--warmup-epochs", "1.5", "--out", "x"]) == 2
    assert "warmup_epochs must be <= epochs (1)" in capsys.readouterr().err
