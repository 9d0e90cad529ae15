"""Data science: leakage, subsets, normalisation statistics, resizing, label mapping.

Known answers come from independent computations: scikit-learn's own split and numpy statistics,
idx bytes parsed here with gzip + numpy, numpy's ``default_rng`` draw the README documents,
``torch.nn.functional.interpolate`` (antialiased bilinear) as the oracle of ``--image-size``, and
the README's constants typed in by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.data.test_data_correctness import _write_cifar10
from wtmodels.data import SyntheticImages, get_datasets

torch.set_num_threads(1)

# the README's Data section, typed in
DIGITS = ((0.3053,), (0.3760,))
FASHION = ((0.2860,), (0.3530,))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _raw(x: torch.Tensor, stats) -> torch.Tensor:
    """Undo the documented normalisation: pixels in [0, 1]."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in stats)
    return x * std + mean


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def _window(padded: torch.Tensor, got: torch.Tensor, size: int, pad: int) -> list:
    """The (flip, dy, dx) whose zero-padded window of the raw image equals ``got``."""
    return [(flip, dy, dx) for flip in (False, True) for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose((padded.flip(-1) if flip else padded)[..., dy:dy + size,
                                                                    dx:dx + size], got,
                              atol=1e-5)]


def test_digits_train_and_test_partition_the_1797_images_and_the_statistics_are_documented():
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test, _ = get_datasets("digits", augment=False)
    seen = {"train": [], "test": []}
    for split, ds in (("train", train), ("test", test)):
        for x, y in ds:
            pixels = (_raw(x, DIGITS)[0] * 16).numpy()
            assert np.allclose(pixels, pixels.round(), atol=1e-4)
            seen[split].append((_digest(pixels.round().astype(np.int64)), y))
    everything = sorted((_digest(im.astype(np.int64)), int(t))
                        for im, t in zip(digits.images, digits.target, strict=True))
    # every image once, with its own label, in exactly one split; no test image in train
    assert sorted(seen["train"] + seen["test"]) == everything
    assert not {d for d, _ in seen["train"]} & {d for d, _ in seen["test"]}
    # README: all 1797 give 0.3053 / 0.3760 (used), the 1437 training images 0.3054 / 0.3761
    train_pixels = np.stack([(_raw(x, DIGITS)[0]).numpy() for x, _ in train]).astype(np.float64)
    assert abs(train_pixels.mean() - 0.3054) < 5e-5 and abs(train_pixels.std() - 0.3761) < 5e-5
    every = digits.images / 16.0
    assert abs(every.mean() - DIGITS[0][0]) < 5e-5 and abs(every.std() - DIGITS[1][0]) < 5e-5


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_official_split_labels_and_training_statistics():
    def read(name):
        raw = gzip.decompress((FASHION_DIR / name).read_bytes())
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)

    x_tr, y_tr = read("train-images-idx3-ubyte.gz"), read("train-labels-idx1-ubyte.gz")
    x_te, y_te = read("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz")
    train, test, _ = get_datasets("fashion_mnist", augment=False)
    assert (len(train), len(test)) == (60000, 10000)
    for ds, images, labels in ((train, x_tr, y_tr), (test, x_te, y_te)):
        for i in (0, 1, 12345 % len(ds), len(ds) - 1):
            x, y = ds[i]
            assert y == labels[i]
            assert torch.allclose(_raw(x, FASHION)[0] * 255, torch.tensor(images[i]).float(),
                                  atol=1e-3)
    # the official t10k files are the test set, and none of its images is a training image
    assert not {_digest(a) for a in x_tr} & {_digest(a) for a in x_te}
    # the constants are the training split's statistics (the test split gives 0.2868 / 0.3524)
    pixels = x_tr.astype(np.float64) / 255
    assert abs(pixels.mean() - FASHION[0][0]) < 5e-5 and abs(pixels.std() - FASHION[1][0]) < 5e-5


def test_subsets_are_the_documented_seeded_uniform_draw_in_any_process():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(np.arange(1797), test_size=0.2,
                                           stratify=digits.target, random_state=0)
    for seed in (0, 5, 2**64 - 1):  # the test subset uses seed + 1, past 2**64 - 1 too
        train, test, _ = get_datasets("digits", train_size=100, test_size=50, seed=seed,
                                      augment=False)
        want_train = np.sort(np.random.default_rng(seed).permutation(1437)[:100])
        want_test = np.sort(np.random.default_rng(seed + 1).permutation(360)[:50])
        assert list(train.indices) == want_train.tolist()
        assert list(test.indices) == want_test.tolist()
        for pos in (0, 49):
            x, y = test[pos]
            source = idx_test[want_test[pos]]
            assert y == digits.target[source]
            assert torch.allclose(_raw(x, DIGITS)[0] * 16,
                                  torch.tensor(digits.images[source]).float(), atol=1e-4)
        assert train[99][1] == digits.target[idx_train[want_train[99]]]
    # another process (as another rank or a rerun) draws the same images
    code = ("from wtmodels.data import get_datasets; "
            "a, b, _ = get_datasets('digits', train_size=100, test_size=50, seed=5); "
            "print(list(a.indices), list(b.indices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    want = (np.sort(np.random.default_rng(5).permutation(1437)[:100]).tolist(),
            np.sort(np.random.default_rng(6).permutation(360)[:50]).tolist())
    assert out == f"{want[0]} {want[1]}"


@pytest.mark.parametrize("size", [16, 5])
def test_digits_image_size_is_an_antialiased_bilinear_resize_then_the_pad1_crop(size):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(np.arange(1797), test_size=0.2,
                                           stratify=digits.target, random_state=0)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    train, test, info = get_datasets("digits", image_size=size, augment=True)
    assert info["image_size"] == size
    want = _resize(images[idx_test[:4]], size)
    got = torch.stack([_raw(test[i][0], DIGITS) for i in range(4)])
    assert torch.allclose(got, want, atol=1e-5)  # the test set is resized, never augmented
    moved = 0
    for i in range(12):
        torch.manual_seed(i)
        got = _raw(train[i][0], DIGITS)
        padded = F.pad(_resize(images[idx_train[i]][None], size)[0], (1, 1, 1, 1))
        found = _window(padded, got, size, 1)
        assert found and not any(flip for flip, _, _ in found), i  # digits are never mirrored
        moved += (False, 1, 1) not in found
    assert moved > 3


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_idx_files_resized_and_augmented_as_documented(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(10)[:n]
        _write_idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (torch.tensor(images).float().unsqueeze(1) / 255, labels)
    train, test, _ = get_datasets("fashion_mnist", data_dir=tmp_path, image_size=14)
    images, labels = arrays["t10k"]
    for i in range(4):
        x, y = test[i]
        assert y == labels[i]
        assert torch.allclose(_raw(x, FASHION), _resize(images[i:i + 1], 14)[0], atol=1e-5)
    images, labels = arrays["train"]
    flips = set()
    for i in range(6):
        torch.manual_seed(i)
        x, y = train[i]
        assert y == labels[i]
        padded = F.pad(_resize(images[i:i + 1], 14)[0], (2, 2, 2, 2))  # pad 2 at any size
        found = _window(padded, _raw(x, FASHION), 14, 2)
        assert found, i
        flips |= {flip for flip, _, _ in found}
    assert flips == {False, True}


def test_cifar_image_size_resizes_both_splits_and_pads_the_crop_by_size_over_8(tmp_path,
                                                                               monkeypatch):
    # 2 images per batch, in the real pickle format (uint8 -> [0, 1] for the comparisons)
    batches = {name: (torch.tensor(images).float() / 255, labels) for name, (images, labels)
               in _write_cifar10(tmp_path, monkeypatch, n=2).items()}
    train, test, info = get_datasets("cifar10", data_dir=tmp_path, image_size=16)
    assert info["image_size"] == 16 and (len(train), len(test)) == (10, 2)
    images, labels = batches["test_batch"]  # the test set is test_batch, resized, not augmented
    for i in range(2):
        x, y = test[i]
        assert y == labels[i]
        assert torch.allclose(_raw(x, CIFAR10), _resize(images[i:i + 1], 16)[0], atol=1e-5)
    images, labels = batches["data_batch_3"]
    torch.manual_seed(0)
    x, y = train[4]  # the first image of the third training batch
    assert y == labels[0]
    padded = F.pad(_resize(images[:1], 16)[0], (2, 2, 2, 2))  # 16 // 8 = 2
    assert _window(padded, _raw(x, CIFAR10), 16, 2)


def _documented_synthetic(ds: SyntheticImages, index: int, seed_key: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed_key)
    shift = torch.randint(-2, 3, (2,), generator=gen)
    image = torch.roll(ds.prototypes[index % ds.num_classes],
                       shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
    return image + ds.noise * torch.randn(ds.shape, generator=gen)


def test_synthetic_test_images_share_no_noise_with_training_images():
    """Image ``i`` drew from a generator seeded ``(seed * P + split) * P + i`` (P = 1000003), so
    training image ``P + i`` had test image ``i``'s shift and noise: a train set over a million
    images held every test image's noise. Images below index P keep their documented draw."""
    p = 1_000_003
    train = SyntheticImages(p + 3, num_classes=10, shape=(1, 8, 8), seed=0, split=0)
    test = SyntheticImages(3, num_classes=10, shape=(1, 8, 8), seed=0, split=1)
    for i in range(3):
        x_tr, y_tr = train[p + i]
        x_te, y_te = test[i]
        # subtract each image's own prototype under every shift: the noises must differ
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                noise_tr = x_tr - train.prototypes[y_tr].roll((dy, dx), (1, 2))
                noise_te = x_te - test.prototypes[y_te].roll((dy, dx), (1, 2))
                assert not torch.allclose(noise_tr, noise_te, atol=1e-4), (i, dy, dx)
    # recorded results stay reproducible: images below index P are the documented draw
    for split, ds in ((0, train), (1, test)):
        for i in (0, 2):
            assert torch.equal(ds[i][0], _documented_synthetic(ds, i, (0 * p + split) * p + i))
    seeded = SyntheticImages(20, num_classes=4, shape=(2, 6, 6), seed=7, split=1)
    assert torch.equal(seeded[13][0], _documented_synthetic(seeded, 13, (7 * p + 1) * p + 13))
