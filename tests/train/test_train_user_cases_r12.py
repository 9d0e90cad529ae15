"""Datasets and the single-run command, tried as a new user would.

Every dataset here is written by the test in its real on-disk format and read back through the
real loading code; expected values come from the files written, not from the code under test.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wtmodels.data import NORMALISATION, get_datasets


def _raw_imagefolder(x: torch.Tensor) -> torch.Tensor:
    """Undo the imagefolder normalisation: pixels in 0..255."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALISATION["imagefolder"])
    return (x * std + mean) * 255


def test_imagefolder_skips_hidden_folders_and_files(tmp_path: Path):
    """A Jupyter ``.ipynb_checkpoints`` folder is not a class, and a macOS ``._x.png`` resource
    fork or a file in a hidden sub-folder is not an image (the shell's ``<class>/*`` skips
    them). Before: ``.ipynb_checkpoints`` was refused as a class without images, or, holding
    an image, trained on as a third class; ``._x.png`` failed to decode mid-training."""
    colours = {"cat": (250, 10, 20), "dog": (5, 100, 200)}
    for split in ("train", "val"):
        for cls, colour in colours.items():
            (tmp_path / split / cls / ".cache").mkdir(parents=True)
            Image.new("RGB", (9, 7), colour).save(tmp_path / split / cls / "0.png")
            Image.new("RGB", (9, 7), (0, 0, 0)).save(tmp_path / split / cls / ".cache" / "1.png")
            (tmp_path / split / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    train, test, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=4,
                                     augment=False)
    assert info["num_classes"] == 2 and train.classes == ["cat", "dog"]
    assert (len(train), len(test)) == (2, 2)
    for ds in (train, test):
        for i, colour in enumerate(colours.values()):
            x, y = ds[i]
            assert y == i
            assert torch.allclose(_raw_imagefolder(x).mean(dim=(1, 2)),
                                  torch.tensor(colour, dtype=torch.float32), atol=0.01)
    # loader workers started by spawn / forkserver pickle the dataset
    again = pickle.loads(pickle.dumps(train))
    assert again.samples == train.samples and torch.equal(again[1][0], train[1][0])
    # a hidden folder holding an image was a class of its own
    Image.new("RGB", (9, 7)).save(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "val" / ".ipynb_checkpoints" / "x.png")
    train, _, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=4)
    assert info["num_classes"] == 2 and len(train) == 2
    # an empty visible class is still refused, naming the supported extensions
    (tmp_path / "val" / "bird").mkdir()
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"train: Found no valid file for the classes bird\. "
                                         r"Supported extensions are: \.jpg"):
        get_datasets("imagefolder", data_dir=tmp_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_torchvision_layout_with_more_images_than_labels_is_refused(tmp_path: Path):
    """Two well-formed idx files that do not pair up (20 images, 15 labels) in torchvision's
    ``MNIST/raw`` layout: before, they loaded as 20 images, and reading image 17 raised an
    IndexError mid-training (a loose folder of idx files was already refused)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(15) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(6) % 10)
    with pytest.raises(ValueError, match="20 train images but 15 labels"):
        get_datasets("mnist", data_dir=tmp_path)
    # the same files, paired, load with the labels written
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    train, test, _ = get_datasets("mnist", data_dir=tmp_path)
    assert [train[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    assert len(test) == 6


def test_a_flag_overrides_a_model_setting_nested_in_the_config_file(tmp_path: Path):
    """``--config FILE`` with flags: "flags override the file", also for a model setting the
    file gives under ``model_overrides`` (config.json's form); it was refused as given twice."""
    from wtmodels.cli import parse_settings
    from wtmodels.train_config import resolve_config

    path = tmp_path / "c.yaml"
    path.write_text("model: test_wt\nlr: 0.1\nmodel_overrides:\n  depth: 2\n  width: 8\n")
    cfg = resolve_config(parse_settings(["--config", str(path), "--depth", "3"]))
    assert cfg.model_overrides == {"depth": 3, "width": 8} and cfg.lr == 0.1
    cfg = resolve_config(parse_settings(["--config", str(path)]))
    assert cfg.model_overrides == {"depth": 2, "width": 8}


def test_a_run_directory_config_json_given_as_config_names_the_way_out():
    """A run's ``config.json`` (train / model_overrides / model_config / data_info / env) is no
    config file; the error says so and what to pass instead of only listing valid keys."""
    from wtmodels.train_config import resolve_config

    run_json = {"train": {"model": "test_wt"}, "model_overrides": {}, "model_config": {},
                "data_info": {}, "env": {}}
    with pytest.raises(ValueError, match="run directory's config.json: pass its 'train' and "
                                         "'model_overrides' entries flattened"):
        resolve_config(run_json)
    with pytest.raises(ValueError, match=r"unknown setting 'lrr'; valid: ") as err:
        resolve_config({"model": "test_wt", "lrr": 0.1})
    assert "config.json" not in str(err.value)
