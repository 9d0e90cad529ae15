"""``python -m wtmodels.train``: generated flags, config files, and bad input.

Bad input must give exactly one line on stderr, exit status 2, no traceback, and leave every
existing file untouched. Most cases call ``main(argv)`` in-process (fast); one runs the real
module in a subprocess to check the process-level behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wtmodels.cli import build_parser, parse_settings
from wtmodels.train import main, run

FAST = ["--dataset", "digits", "--train-size", "64", "--test-size", "32", "--threads", "1",
        "--progress", "none"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _bad(argv, capsys, match: str):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("wtmodels.train: error: ")
    assert "Traceback" not in captured.err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(["--model", "test_wt", "--epochs", "1", "--out", str(out), *FAST]) == 0
    return out


def test_one_flag_per_config_field():
    text = build_parser().format_help()
    for flag in ("--model", "--dataset", "--epochs", "--out", "--seed", "--resume", "--data-dir",
                 "--download", "--config", "--lr", "--label-smoothing", "--amp", "--no-amp",
                 "--channels-last", "--compile", "--pretrain-steps", "--jac-reg-weight",
                 "--jac-reg-freq", "--depth", "--width", "--mask-density", "--mask-k",
                 "--f-solver", "--eval-f-max-iter", "--ode-method"):
        assert flag in text, flag
    assert parse_settings(["--mask-density", "0.25", "--f-solver", "broyden", "--amp",
                           "--eval-f-max-iter", "none"]) == {
        "mask_density": 0.25, "f_solver": "broyden", "amp": True, "eval_f_max_iter": None}


def test_flags_reach_the_model_and_the_run_files(tmp_path):
    out = tmp_path / "r"
    assert main(["--model", "test_wt", "--epochs", "1", "--depth", "3", "--width", "12",
                 "--mask-k", "2", "--lr", "0.01", "--out", str(out), *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_overrides"] == {"depth": 3, "mask_k": 2, "width": 12}
    assert config["model_config"]["depth"] == 3 and config["train"]["lr"] == 0.01
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["cell_evals"] == 3.0


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_with_flags_overriding_it(tmp_path, suffix):
    settings = {"model": "test_wt", "epochs": 1, "lr": 0.02, "depth": 3, "train-size": 64,
                "test_size": 32, "threads": 1, "progress": "none"}
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    out = tmp_path / "r"
    assert main(["--config", str(path), "--lr", "0.03", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 0.03  # the flag wins over the file
    assert config["train"]["train_size"] == 64 and config["model_config"]["depth"] == 3


@pytest.mark.parametrize("argv,match", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--mask-density", "1.5"], "mask_density"),
    (["--depth", "0"], "depth"),
    (["--jac-reg-freq", "0"], "jac_reg_freq must be > 0"),
    (["--train-size", "99999"], "train_size must be in [1, 1437]"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--dataset", "imagefolder"], "needs --data-dir"),
    (["--num-classes", "3"], "num_classes=3 does not match dataset digits (10)"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--min-lr", "1"], "min_lr must be <= lr"),
    (["--jac-reg-weight", "inf"], "jac_reg_weight must be a finite number; got inf"),
    (["--lr", "nan"], "lr must be a finite number; got nan"),
    # settings the model would never read: refused, not silently ignored
    (["--f-max-iter", "5"], "(test_wt) would silently ignore f_max_iter (read by core 'deq'"),
    (["--jac-reg-weight", "0.1"], "ignore jac_reg_weight"),
    (["--ode-method", "euler"], "ignore ode_method"),
    (["--mask-density", "0.25"], "ignore mask_density (read only with mask_k > 0)"),
    (["--model", "test_deq", "--jac-reg-freq", "0.5"], "read only with jac_reg_weight > 0"),
    (["--momentum", "0.5"], "ignore momentum (read only with optimizer 'sgd')"),
    (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], "ignore nesterov"),
    (["--schedule", "constant", "--min-lr", "0.001"], "ignore min_lr"),
    (["--amp-dtype", "float16"], "ignore amp_dtype (read only with amp)"),
    (["--synthetic-classes", "4"], "ignore synthetic_classes (read by dataset 'synthetic' only)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    _bad(["--model", "test_wt", *FAST, "--out", str(out), *argv], capsys, match)
    assert not out.exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_bad_input(tmp_path, capsys):
    _bad(["--model", "test_wt", *FAST, "--device", "cuda", "--out", str(tmp_path / "c")],
         capsys, "no CUDA device")


def test_corrupt_image_found_while_training_is_one_line_and_exit_2(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    line = _bad(["--model", "test_wt", "--dataset", "imagefolder", "--data-dir", str(tmp_path),
                 "--image-size", "8", "--threads", "1", "--progress", "none", "--out",
                 str(tmp_path / "run")], capsys, "reading the data failed")
    assert "UnidentifiedImageError" in line


def test_missing_out_and_bad_config_files(tmp_path, capsys):
    _bad(["--model", "test_wt"], capsys, "--out DIR is required")
    _bad(["--config", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "o")], capsys,
         "config file")
    (tmp_path / "bad.json").write_text("{not json")
    _bad(["--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")], capsys,
         "is not valid JSON")
    (tmp_path / "unknown.yaml").write_text("lr: 0.1\nfrobnicate: 3\n")
    _bad(["--config", str(tmp_path / "unknown.yaml"), "--out", str(tmp_path / "o")], capsys,
         "unknown setting 'frobnicate'")
    assert not (tmp_path / "o").exists()


def test_out_holding_a_run_is_not_overwritten(finished_run, capsys):
    before = _snapshot(finished_run)
    _bad(["--model", "test_deq", "--epochs", "1", "--out", str(finished_run), *FAST], capsys,
         "already holds a run; add --resume")
    assert _snapshot(finished_run) == before


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    _bad(["--resume", "--out", str(tmp_path / "empty")], capsys, "holds no run to resume")
    (tmp_path / "plain").mkdir()
    _bad(["--resume", "--out", str(tmp_path / "plain")], capsys, "holds no run to resume")


def test_resume_with_a_different_setting_is_refused(finished_run, capsys):
    before = _snapshot(finished_run)
    _bad(["--resume", "--out", str(finished_run), "--lr", "0.5"], capsys,
         "lr=0.5 differs from the run")
    _bad(["--resume", "--out", str(finished_run), "--depth", "7"], capsys,
         "depth=7 differs from the run")
    assert _snapshot(finished_run) == before


def test_truncated_checkpoint(finished_run, capsys):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    before = _snapshot(finished_run)
    _bad(["--resume", "--out", str(finished_run)], capsys, "is unreadable (truncated")
    assert _snapshot(finished_run) == before


def test_foreign_checkpoints(finished_run, tmp_path, capsys):
    ckpt = finished_run / "checkpoint.pt"
    torch.save({"weight": torch.ones(3)}, ckpt)  # e.g. a bare state_dict
    before = _snapshot(finished_run)
    _bad(["--resume", "--out", str(finished_run)], capsys, "not a wtmodels training checkpoint")
    assert _snapshot(finished_run) == before
    ckpt.write_bytes(b"garbage, not a torch file")
    _bad(["--resume", "--out", str(finished_run)], capsys, "is unreadable")
    # a real checkpoint of another run (another model and learning rate)
    other = tmp_path / "other"
    run({"model": "test_deq", "epochs": 1, "lr": 0.02, "train_size": 64, "test_size": 32,
         "threads": 1, "progress": "none", "out": str(other)})
    ckpt.write_bytes((other / "checkpoint.pt").read_bytes())
    before = _snapshot(finished_run)
    _bad(["--resume", "--out", str(finished_run)], capsys,
         "belongs to a different run (differs in: lr, model)")
    assert _snapshot(finished_run) == before


def test_real_process_exit_status_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wtmodels.train", "--model", "test_wt",
                           "--lr", "fast", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "wtmodels.train: error: argument --lr: invalid float value: 'fast'"]
    assert proc.stdout == "" and not (tmp_path / "x").exists()


def test_run_records_the_same_commit_id_as_the_sweep_results(finished_run):
    from wtmodels.provenance import git_sha

    config = json.loads((finished_run / "config.json").read_text())
    assert config["env"]["git_sha"] == git_sha()  # 12 characters, "-dirty" when edited


def test_a_reader_that_goes_away_ends_a_command_quietly():
    # `python -m benchmarks.recommend DIR | head -3` printed a BrokenPipeError traceback
    code = ("from wtmodels.cli import exit_with\n"
            "def main():\n"
            "    for i in range(200000):\n"
            "        print(i)\n"
            "    return 0\n"
            "exit_with(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err


def test_yaml_config_reads_exponent_floats(tmp_path):
    # PyYAML follows YAML 1.1, where 1e-3 (no dot) and 1.0e3 (no exponent sign) are strings:
    # "lr: 1e-3" was refused with "lr must be a number; got '1e-3'"
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2e-2\nmin_lr: 1.0e-4\nweight_decay: 5E-4\nlabel_smoothing: .5e-1\n"
                    "grad_clip: 1.0e0\nepochs: 3\nmodel: test_wt\n")
    assert parse_settings(["--config", str(path)]) == {
        "lr": 0.02, "min_lr": 1e-4, "weight_decay": 5e-4, "label_smoothing": 0.05,
        "grad_clip": 1.0, "epochs": 3, "model": "test_wt"}


def test_a_setting_spelled_twice_is_refused(tmp_path, capsys):
    # "train-size" and "train_size" name the same setting: one of them silently won
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "test_wt", "train-size": 64, "train_size": 32}))
    _bad(["--config", str(path), "--out", str(tmp_path / "o")], capsys,
         "train_size given twice")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="depth given twice"):
        run({"model": "test_wt", "depth": 2, "model_overrides": {"depth": 3}, "epochs": 1})
    with pytest.raises(ValueError, match="train_size given twice"):
        run({"model": "test_wt", "train-size": 64, "train_size": 32, "epochs": 1})


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"model": "test_wt", "epochs": 1, "lr": 0.1, "epochs": 2}'),
    (".yaml", "model: test_wt\nepochs: 1\nlr: 0.1\nepochs: 2\n"),
    (".yaml", "model: test_wt\nmodel_overrides:\n  depth: 2\n  depth: 3\n"),
])
def test_a_key_repeated_in_a_config_file_is_refused(tmp_path, capsys, suffix, text):
    # json and PyYAML both kept the last of two equal keys silently (epochs 2, depth 3)
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    _bad(["--config", str(path), "--out", str(tmp_path / "o"), *FAST], capsys, "given twice")
    assert not (tmp_path / "o").exists()


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {depth: 2, width: 8}\nmodel_overrides:\n  <<: *b\n  depth: 3\n")
    assert parse_settings(["--config", str(path)])["model_overrides"] == {"depth": 3, "width": 8}


@pytest.mark.parametrize("value", ["3", "[1, 2]", "deep"])
def test_model_overrides_that_is_not_a_mapping(tmp_path, capsys, value):
    # 'model_overrides: 3' crashed with a TypeError traceback
    path = tmp_path / "c.yaml"
    path.write_text(f"model: test_wt\nmodel_overrides: {value}\n")
    _bad(["--config", str(path), "--out", str(tmp_path / "o"), *FAST], capsys,
         "model_overrides must be a mapping")
    with pytest.raises(ValueError, match="model_overrides must be a mapping"):
        run({"model": "test_wt", "model_overrides": [("depth", 2)]})


def test_an_out_that_cannot_be_created(tmp_path, capsys):
    # --out under a file crashed with NotADirectoryError (a traceback) after loading the data
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _bad(["--model", "test_wt", "--epochs", "1", "--out", str(blocker / "run" / "a"), *FAST],
         capsys, "cannot be created")
    assert blocker.read_text() == "x"


def test_a_model_too_large_to_allocate_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    # width 10**7: the first cell's weight alone is 10**14 x 9 floats, 3.6 PB, beyond any
    # address space, so its allocation fails on every machine (before: a RuntimeError
    # traceback from torch's allocator, exit 1)
    out = tmp_path / "run"
    line = _bad(["--model", "test_wt", "--width", str(10**7), "--out", str(out), *FAST], capsys,
                "model test_wt (width 10000000, depth")
    assert "does not fit in memory (tried to allocate 3.6 PB)" in line  # 10**14 x 9 x 4 bytes
    assert not out.exists()
    # a width past ~2.6e17 overflows torch's 64-bit size count (a RuntimeError), past 2**63
    # the argument itself (a TypeError): both were tracebacks
    for width in (10**18, 2**63):
        _bad(["--model", "test_wt", "--width", str(width), "--out", str(out), *FAST], capsys,
             f"(width {width}, depth 2, stages 1) does not fit in memory (its size overflows a "
             "64-bit count)")
        assert not out.exists()
    # a GPU's out-of-memory error takes the same way (torch.OutOfMemoryError's first line)
    import wtmodels.models as registry

    def no_memory(*args, **kwargs):  # torch's message: one line of ~400 characters
        raise torch.cuda.OutOfMemoryError(  # torch.OutOfMemoryError from torch 2.5
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.15 GiB of which 5.25 MiB is free. Of the allocated memory 78.6 GiB is allocated "
            "by PyTorch. See documentation for Memory Management")

    monkeypatch.setattr(registry, "create_model", no_memory)
    line = _bad(["--model", "test_wt", "--out", str(out), *FAST], capsys,
                "(width 8, depth 2, stages 1) does not fit in memory (tried to allocate "
                "2.00 GiB); use a smaller width")
    assert "capacity" not in line
    assert not out.exists()
    # any other error of the build is not read as a memory error
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["--model", "test_wt", "--out", str(out), *FAST])

    def not_allocated(*args, **kwargs):  # mentions allocation, is no memory shortage
        raise RuntimeError("The tensor has a non-zero number of elements, but its data is not "
                           "allocated yet")

    monkeypatch.setattr(registry, "create_model", not_allocated)
    with pytest.raises(RuntimeError, match="not allocated yet"):
        main(["--model", "test_wt", "--out", str(out), *FAST])
