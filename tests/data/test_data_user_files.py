"""A new user's real files, loaded through the real code.

Files are written here in the real on-disk formats (idx in torchvision's ``<root>/MNIST/raw``
layout); expectations come from the idx format itself, not from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wtmodels.data import get_datasets


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
