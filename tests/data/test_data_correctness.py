"""The data are right, not only loadable: pixels and labels equal the raw files after undoing the
documented normalisation, augmentation is exactly what the README names, the digits split is the
documented one, and odd-but-real inputs (16-bit PNGs, numpy sizes, idx files of another size) are
read correctly or refused. Every file is written here in its real format; no downloads."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from wtmodels import data
from wtmodels.data import build_loaders, get_datasets


def _raw(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo the normalisation: pixels in [0, 255]."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in data.NORMALISATION[name])
    return (x * std + mean) * 255


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_imagefolder_16bit_grayscale_png_keeps_its_grey_levels(tmp_path):
    # torchvision's loader converts PIL mode I;16 to RGB by clipping at 255: every 16-bit image
    # came out pure white, so the classes below were indistinguishable
    levels = {"dark": 0, "mid": 128 * 257, "light": 65535}
    for split in ("train", "val"):
        for cls, level in levels.items():
            (tmp_path / split / cls).mkdir(parents=True)
            array = np.full((10, 14), level, dtype=np.uint16)
            Image.fromarray(array).save(tmp_path / split / cls / "0.png")
    assert Image.open(tmp_path / "val" / "mid" / "0.png").mode.startswith("I")
    _, test, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=8)
    assert test.classes == ["dark", "light", "mid"] and info["in_chans"] == 3
    got = {test.classes[y]: _raw(x, "imagefolder") for x, y in test}
    for cls, level in levels.items():
        assert tuple(got[cls].shape) == (3, 8, 8)
        assert torch.allclose(got[cls], torch.full((3, 8, 8), level / 257), atol=0.05), cls


def test_sizes_accept_numpy_integers_and_refuse_bools():
    # np.int64(100) was refused as "must be a positive integer, got np.int64(100)"; True was
    # taken as 1
    train, test, info = get_datasets("digits", train_size=np.int64(100), test_size=np.int32(50),
                                     image_size=np.int64(8))
    assert (len(train), len(test), info["image_size"]) == (100, 50, 8)
    assert type(info["image_size"]) is int
    with pytest.raises(ValueError, match="train_size must be a positive integer, got True"):
        get_datasets("digits", train_size=True)


def test_idx_images_not_28x28_are_refused(tmp_path):
    # a folder of 32x32 idx images loaded with info image_size 28: the train crop silently cut
    # them to 28x28 while the test images stayed 32x32
    for prefix, n in (("train", 12), ("t10k", 6)):
        _write_idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                      np.zeros((n, 32, 32), dtype=np.uint8))
        _write_idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    with pytest.raises(ValueError, match=r"\(32, 32\) pixels, not .*28x28"):
        get_datasets("mnist", data_dir=tmp_path)


def test_digits_split_is_the_documented_one():
    """scikit-learn ``train_test_split(test_size=0.2, stratify=target, random_state=0)``: the test
    set is these images of ``load_digits`` in this order (pinned, so a library change shows)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test, _ = get_datasets("digits", augment=False)
    for position, index in enumerate([1496, 188, 705, 820, 413]):
        x, y = test[position]
        assert y == digits.target[index]
        assert torch.allclose(_raw(x, "digits") / 255 * 16, torch.tensor(digits.images[index],
                                                                         dtype=torch.float32),
                              atol=1e-4)
    x, y = train[0]
    assert y == digits.target[1346]
    assert torch.allclose(_raw(x, "digits") / 255 * 16,
                          torch.tensor(digits.images[1346], dtype=torch.float32), atol=1e-4)
    # the normalisation constant is the pixel statistics of the set (see data.NORMALISATION)
    pixels = digits.images / 16
    assert abs(pixels.mean() - data.NORMALISATION["digits"][0][0]) < 1e-4
    assert abs(pixels.std() - data.NORMALISATION["digits"][1][0]) < 1e-4


def _write_cifar10(root: Path, monkeypatch, n: int = 3):
    folder = root / tvd.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    md5, batches = {}, {}
    for name, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list + [["batches.meta", ""]]:
        if name == "batches.meta":
            obj = {"label_names": [f"c{i}" for i in range(10)]}
        else:
            images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n).tolist()
            batches[name] = (images, labels)
            obj = {"batch_label": name, "labels": labels, "data": images.reshape(n, -1),
                   "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    cls = tvd.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[k, md5[k]] for k, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[k, md5[k]] for k, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
    return batches


def test_cifar_every_train_image_in_batch_order_and_augmentation_is_pad4_crop_plus_flip(
        tmp_path, monkeypatch):
    batches = _write_cifar10(tmp_path, monkeypatch)
    images = np.concatenate([batches[k][0] for k, _ in tvd.CIFAR10.train_list])
    labels = sum((batches[k][1] for k, _ in tvd.CIFAR10.train_list), [])
    plain, _, _ = get_datasets("cifar10", data_dir=tmp_path, augment=False)
    assert len(plain) == len(labels) == 15
    for i, (x, y) in enumerate(plain):
        assert y == labels[i]
        assert torch.allclose(_raw(x, "cifar10"), torch.tensor(images[i]).float(), atol=1e-3)
    augmented, _, _ = get_datasets("cifar10", data_dir=tmp_path, augment=True)
    flips = set()
    for i in range(len(augmented)):
        torch.manual_seed(i)
        got = _raw(augmented[i][0], "cifar10").round()
        padded = torch.nn.functional.pad(torch.tensor(images[i]).float(), (4, 4, 4, 4))
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(9) for dx in range(9)
                   if torch.equal((padded.flip(-1) if flip else padded)[:, dy:dy + 32, dx:dx + 32],
                                  got)]
        assert matches, i  # a zero-padded 32x32 window of the raw image, maybe mirrored
        flips.add(matches[0][0])
    assert flips == {False, True}


def test_imagefolder_batches_do_not_depend_on_workers(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                rng = np.random.default_rng(10 * c + i)
                Image.fromarray(rng.integers(0, 256, (20 + i, 17, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    train, test, _ = get_datasets("imagefolder", data_dir=tmp_path, image_size=12)
    zero, _ = build_loaders(train, test, batch_size=4, seed=2)
    two, _ = build_loaders(train, test, batch_size=4, seed=2, num_workers=2)
    for epoch in (0, 1):
        zero.sampler.set_epoch(epoch)
        two.sampler.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(zero, two, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_the_raw_idx_files():
    folder = Path("/usr/share/datasets/fashion-mnist")

    def read(name, offset):
        return np.frombuffer(gzip.decompress((folder / name).read_bytes()), np.uint8,
                             offset=offset)

    images = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read("t10k-labels-idx1-ubyte.gz", 8)
    train, test, _ = get_datasets("fashion_mnist", augment=False)
    for i in (0, 1, 4999, 9999):
        x, y = test[i]
        assert y == labels[i]
        assert torch.allclose(_raw(x, "fashion_mnist")[0], torch.tensor(images[i]).float(),
                              atol=1e-3)
    pixels = train.data.float() / 255  # the constants are the training set's statistics
    assert abs(pixels.std().item() - data.NORMALISATION["fashion_mnist"][1][0]) < 1e-3


def test_cifar_data_dir_at_the_batches_folder_names_the_folder_above(tmp_path, monkeypatch):
    # genuine files, but --data-dir named cifar-10-batches-py itself: the message said
    # "add --download", which would fetch 170 MB into a nested folder
    _write_cifar10(tmp_path, monkeypatch)
    inner = tmp_path / tvd.CIFAR10.base_folder
    with pytest.raises(ValueError, match=f"pass the folder above it: --data-dir {tmp_path}$"):
        get_datasets("cifar10", data_dir=inner)
    assert len(get_datasets("cifar10", data_dir=tmp_path)[0]) == 15
