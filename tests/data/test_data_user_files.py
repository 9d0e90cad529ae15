"""A new user's real files, loaded through the real code.

Files are written here in the real on-disk formats (idx in torchvision's ``<root>/MNIST/raw``
layout, image folders with the hidden files and folders a shell or an editor leaves there);
expectations come from the files written and the idx format itself, not from the code under test.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wtmodels.data import NORMALISATION, get_datasets


def _write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def _mnist_raw(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte",
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return raw


def _not_idx(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>" * 40)  # a failed download saved as the file


def _float_images(path: Path) -> None:
    _write_idx(path, np.zeros((6, 28, 28), ">f4"), type_code=0x0D)  # idx, but float32 pixels


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _labels_3d(path: Path) -> None:
    _write_idx(path, np.zeros((6, 1, 1), np.uint8))


@pytest.mark.parametrize("damage, file", [
    (_not_idx, "train-images-idx3-ubyte"),  # torchvision: a bare AssertionError (traceback)
    (_float_images, "train-images-idx3-ubyte"),  # torchvision: TypeError (traceback)
    (_empty, "t10k-labels-idx1-ubyte"),  # "invalid literal for int() with base 16: b''"
    (_labels_3d, "train-labels-idx1-ubyte"),  # "x should have 1 dimension instead of 3"
])
def test_a_file_in_the_torchvision_layout_that_is_not_uint8_idx_names_itself(tmp_path, damage,
                                                                             file):
    """In ``DIR/MNIST/raw`` torchvision's own reader ran unguarded against anything but a
    truncation: a non-idx or float idx file escaped as AssertionError / TypeError (a traceback on
    the command line), an empty or mis-shaped one as a ValueError naming no file."""
    raw = _mnist_raw(tmp_path)
    damage(raw / file)
    with pytest.raises(ValueError, match=f"cannot be read.*{file}"):
        get_datasets("mnist", data_dir=tmp_path)


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


def test_mnist_torchvision_layout_with_more_images_than_labels_is_refused(tmp_path: Path):
    """Two well-formed idx files that do not pair up (20 images, 15 labels) in torchvision's
    ``MNIST/raw`` layout: before, they loaded as 20 images, and reading image 17 raised an
    IndexError mid-training (a loose folder of idx files was already refused)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte",
               rng.integers(0, 256, (20, 28, 28)).astype(np.uint8))
    _write_idx(raw / "train-labels-idx1-ubyte", (np.arange(15) % 10).astype(np.uint8))
    _write_idx(raw / "t10k-images-idx3-ubyte",
               rng.integers(0, 256, (6, 28, 28)).astype(np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte", (np.arange(6) % 10).astype(np.uint8))
    with pytest.raises(ValueError, match="20 train images but 15 labels"):
        get_datasets("mnist", data_dir=tmp_path)
    # the same files, paired, load with the labels written
    _write_idx(raw / "train-labels-idx1-ubyte", (np.arange(20) % 10).astype(np.uint8))
    train, test, _ = get_datasets("mnist", data_dir=tmp_path)
    assert [train[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    assert len(test) == 6
