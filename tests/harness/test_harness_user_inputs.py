"""Acceptance review of the training and benchmark harness: inputs a researcher gives by hand.

Each test pins a bug found by trying the commands as the README describes them: a corrupt image
in an ImageFolder tree named nowhere (or only as "worker process 0"), a config file in another
encoding, an empty ``--out`` writing a run into the current directory, a sweep ``--out`` that
cannot be created, and hand-edited results files without a ``label`` or ``test_acc`` column.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import plot
from benchmarks.extrapolate import extrapolate_sweep
from benchmarks.recommend import main as recommend_main
from benchmarks.results_io import write_rows
from benchmarks.run import main as run_main
from wtmodels.train import main

FAST = ["--model", "test_wt", "--epochs", "1", "--threads", "1", "--progress", "none"]


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _image_tree(root: Path) -> Path:
    """ROOT/{train,val}/<class>/*.png of odd sizes and modes (RGB, L, RGBA)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i, mode in enumerate(("RGB", "L", "RGBA")):
                h, w = int(rng.integers(5, 20)), int(rng.integers(5, 20))
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_image_is_named_in_the_error(tmp_path, capsys, workers):
    root = _image_tree(tmp_path / "data")
    bad = root / "train" / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a download cut short: PIL says only "truncated"
    code = main([*FAST, "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8",
                 "--num-workers", str(workers), "--out", str(tmp_path / "run")])
    assert code == 2
    line = _one_error_line(capsys, "wtmodels.train")
    # before: "OSError: image file is truncated" (which of a million files?) and, with loader
    # workers, "OSError: Caught OSError in DataLoader worker process 0." (not even the error)
    assert str(bad) in line and "truncated" in line, line
    assert "worker process" not in line


def test_a_config_file_that_is_not_utf8_is_named_and_a_bom_is_accepted(tmp_path, capsys):
    latin = tmp_path / "c.json"
    latin.write_bytes('{"model": "test_wt", "label": "caf\xe9"}'.encode("latin-1"))
    assert main(["--config", str(latin), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys, "wtmodels.train")
    assert str(latin) in line and "UTF-8" in line, line  # before: only "'utf-8' codec can't..."
    bom = tmp_path / "bom.json"  # as some Windows editors save JSON
    bom.write_bytes(b'\xef\xbb\xbf{"train_size": 32, "test_size": 16}')
    assert main([*FAST, "--config", str(bom), "--out", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("flag", ["--out", "--data-dir"])
def test_an_empty_path_is_refused_not_taken_as_the_current_directory(tmp_path, capsys,
                                                                     monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # before: --out "" (an unset shell variable) trained here
    argv = [*FAST, "--train-size", "32", "--test-size", "16", "--out", "run", flag, ""]
    assert main(argv) == 2
    line = _one_error_line(capsys, "wtmodels.train")
    assert "empty" in line, line
    assert sorted(os.listdir(tmp_path)) == []


def test_a_sweep_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = run_main(["quick", "--smoke", "--out", "/proc/no/such/sweep", "--no-plots"])
    assert code == 2  # before: a FileNotFoundError traceback
    line = _one_error_line(capsys, "python -m benchmarks.run")
    assert "/proc/no/such/sweep" in line


def _rows(n=4):
    return [{"run_id": f"r{i}", "label": "WT" if i % 2 else "untied", "config_id": f"c{i % 2}",
             "status": "ok", "model": "wt_s", "core": "unrolled", "depth": 2 + 2 * (i // 2),
             "width": 8, "seed": i, "test_acc": 0.5 + 0.1 * i, "params": 1000 * (1 + i % 2),
             "train_time_s": 1.0 + i} for i in range(n)]


def test_plot_draws_results_without_a_label_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label"} for r in _rows(8)]
    for r in rows:
        r["config_id"] = f"{r['depth']}"
    write_rows(tmp_path / "results.csv", rows)
    paths, table = plot.make_report(str(tmp_path))  # before: TypeError in the depth panel
    assert any(p.endswith("accuracy_vs_depth.png") for p in paths)
    assert "wt_s" in table


def test_recommend_without_accuracies_says_so(tmp_path, capsys):
    write_rows(tmp_path / "results.csv",
               [{k: v for k, v in r.items() if k != "test_acc"} for r in _rows()])
    assert recommend_main([str(tmp_path), "--time", "1e9"]) == 2
    line = _one_error_line(capsys, "python -m benchmarks.recommend")
    # before: "no measured configuration has train_time_s <= 1e+09; the smallest measured is 1"
    assert "test_acc" in line, line


def test_extrapolate_says_which_runs_had_no_checkpoint(tmp_path):
    write_rows(tmp_path / "results.csv", _rows(1))  # results copied without runs/
    said = []
    assert extrapolate_sweep(str(tmp_path), [1.0], echo=said.append) == 0
    assert len(said) == 1 and "r0" in said[0] and "checkpoint" in said[0], said


def test_a_relative_data_dir_is_saved_absolute_so_resume_works_from_elsewhere(tmp_path, capsys,
                                                                             monkeypatch):
    _image_tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = [*FAST, "--dataset", "imagefolder", "--data-dir", "data", "--image-size", "8"]
    assert main([*argv, "--epochs", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]["data_dir"]
    assert saved == str(tmp_path / "data")  # before: "data", found only from tmp_path
    # a killed run resumed (or a sweep's checkpoint extrapolated) from another folder
    (out / "done.json").unlink()
    monkeypatch.chdir(tmp_path.parent)
    assert main(["--out", str(out), "--resume"]) == 0, capsys.readouterr().err
