"""Datasets load through the real code from tiny files written here in the real on-disk formats.

(Fashion-)MNIST: idx files, plain in torchvision's ``<root>/<Class>/raw`` layout and gzipped in a
loose folder (as Debian's ``dataset-fashion-mnist`` installs them). CIFAR: pickled batches in the
real format. torchvision checks CIFAR's MD5 sums against the official files; the CIFAR tests
register the MD5 sums of the files they wrote on the torchvision class (``monkeypatch``), so the
integrity check still runs for real, and a corrupted byte is shown to be caught.
"""

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
from wtmodels.data import build_loaders, get_datasets, list_datasets


def _denorm(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = data.NORMALISATION[name]
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return x * std + mean


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _mnist_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) * 7 + seed) % 10
    return images, labels.astype(np.uint8)


def _write_mnist_folder(folder: Path, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, seed in (("train", 20, 1), ("t10k", 10, 2)):
        images, labels = _mnist_arrays(n, seed)
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def test_list_and_unknown_dataset():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder",
            "synthetic"} <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits"):
        get_datasets("nope")


def test_digits_fixed_stratified_split_and_real_pixels():
    train, test, info = get_datasets("digits", augment=False)
    assert info == {"name": "digits", "num_classes": 10, "in_chans": 1, "image_size": 8}
    assert (len(train), len(test)) == (1437, 360)
    counts = np.bincount([y for _, y in test], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 of each digit
    # load_digits pixels are integers 0..16: the normalisation must invert exactly to them
    x, _ = test[0]
    pixels = _denorm(x, "digits") * 16
    assert torch.allclose(pixels, pixels.round(), atol=1e-4) and pixels.max() <= 16 + 1e-4
    # the split is fixed: a second build gives the same test images in the same order
    _, test2, _ = get_datasets("digits", augment=False)
    assert torch.equal(test2[7][0], test[7][0]) and test2[7][1] == test[7][1]


def test_digits_augmentation_shifts_train_only():
    train_aug, test_aug, _ = get_datasets("digits", augment=True)
    train, test, _ = get_datasets("digits", augment=False)
    torch.manual_seed(0)
    changed = sum(not torch.equal(train_aug[i][0], train[i][0]) for i in range(50))
    assert changed > 20  # pad-1 random crops move most images
    assert all(torch.equal(test_aug[i][0], test[i][0]) for i in range(20))


def test_mnist_torchvision_layout(tmp_path):
    arrays = _write_mnist_folder(tmp_path / "MNIST" / "raw", gz=False)
    train, test, info = get_datasets("mnist", data_dir=tmp_path, augment=False)
    assert isinstance(train, tvd.MNIST)  # torchvision's own class reads its own layout
    assert (len(train), len(test), info["image_size"]) == (20, 10, 28)
    images, labels = arrays["t10k"]
    x, y = test[3]
    assert y == labels[3]
    assert torch.allclose(_denorm(x, "mnist")[0] * 255, torch.tensor(images[3]).float(),
                          atol=1e-3)


def test_fashion_mnist_gz_folder_found_like_the_debian_package(tmp_path, monkeypatch):
    system_dir = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = _write_mnist_folder(system_dir, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(system_dir)])
    train, test, info = get_datasets("fashion_mnist", augment=False)  # no data_dir, no download
    assert (len(train), len(test)) == (20, 10)
    images, labels = arrays["train"]
    x, y = train[5]
    assert y == labels[5]
    assert torch.allclose(_denorm(x, "fashion_mnist")[0] * 255, torch.tensor(images[5]).float(),
                          atol=1e-3)
    assert train.classes[9] == "Ankle boot"
    # a truncated idx file is refused with a clear error
    raw = gzip.decompress((system_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (system_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        get_datasets("fashion_mnist")


def test_mnist_missing_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "absent")])
    with pytest.raises(ValueError, match="no idx files.*--download"):
        get_datasets("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no idx files"):
        get_datasets("fashion_mnist")


def test_named_data_dir_without_files_is_an_error_not_the_system_copy(tmp_path, monkeypatch):
    system_dir = tmp_path / "system"
    _write_mnist_folder(system_dir, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", [str(system_dir)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no idx files.*empty"):
        get_datasets("fashion_mnist", data_dir=tmp_path / "empty")


def test_labels_out_of_range_are_refused_when_loading(tmp_path):
    folder = tmp_path / "bad"
    _write_mnist_folder(folder, gz=False)
    _, labels = _mnist_arrays(20, 1)
    labels[3] = 200
    _write_idx(folder / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), found 0..200"):
        get_datasets("mnist", data_dir=folder)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    train, test, info = get_datasets("fashion_mnist", augment=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert int(train.targets[0]) == 9  # the first training image is an ankle boot
    mean = train.data.float().mean().item() / 255
    assert abs(mean - data.NORMALISATION["fashion_mnist"][0][0]) < 1e-3


def _write_cifar(root: Path, tv_cls, monkeypatch, n_per_batch: int = 6):
    """Write CIFAR python batches in the real format; register their MD5s with torchvision."""
    folder = root / tv_cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine = tv_cls is tvd.CIFAR100
    label_key = "fine_labels" if fine else "labels"
    written = {}

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
        written[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()

    batches = {}
    for name, _ in tv_cls.train_list + tv_cls.test_list:
        images = rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100 if fine else 10, size=n_per_batch).tolist()
        batches[name] = (images, labels)
        dump(name, {"batch_label": name, label_key: labels, "data": images.reshape(n_per_batch, -1),
                    "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)]})
    names = [f"class{i}" for i in range(100 if fine else 10)]
    dump(tv_cls.meta["filename"], {tv_cls.meta["key"]: names})
    monkeypatch.setattr(tv_cls, "train_list", [[n, written[n]] for n, _ in tv_cls.train_list])
    monkeypatch.setattr(tv_cls, "test_list", [[n, written[n]] for n, _ in tv_cls.test_list])
    monkeypatch.setattr(tv_cls, "meta", {**tv_cls.meta, "md5": written[tv_cls.meta["filename"]]})
    return folder, batches


@pytest.mark.parametrize("name,tv_cls,classes", [("cifar10", tvd.CIFAR10, 10),
                                                  ("cifar100", tvd.CIFAR100, 100)])
def test_cifar_pickled_batches(tmp_path, monkeypatch, name, tv_cls, classes):
    folder, batches = _write_cifar(tmp_path, tv_cls, monkeypatch)
    train, test, info = get_datasets(name, data_dir=tmp_path, augment=False)
    assert info == {"name": name, "num_classes": classes, "in_chans": 3, "image_size": 32}
    assert len(train) == 6 * len(tv_cls.train_list) and len(test) == 6
    images, labels = batches[tv_cls.test_list[0][0]]
    x, y = test[2]
    assert y == labels[2]
    assert torch.allclose(_denorm(x, name) * 255, torch.tensor(images[2]).float(), atol=1e-3)
    # torchvision's MD5 check is live: one flipped byte makes the data set refused
    first = folder / tv_cls.train_list[0][0]
    blob = bytearray(first.read_bytes())
    blob[-10] ^= 0xFF
    first.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="MD5"):
        get_datasets(name, data_dir=tmp_path)


def test_cifar_augmentation_and_missing_dir(tmp_path, monkeypatch):
    _write_cifar(tmp_path, tvd.CIFAR10, monkeypatch)
    train, _, _ = get_datasets("cifar10", data_dir=tmp_path, augment=True)
    plain, _, _ = get_datasets("cifar10", data_dir=tmp_path, augment=False)
    torch.manual_seed(0)
    assert sum(not torch.equal(train[i][0], plain[i][0]) for i in range(20)) > 10
    with pytest.raises(ValueError, match="does not exist"):
        get_datasets("cifar10", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="--data-dir"):
        get_datasets("cifar10")


def _write_png_tree(root: Path, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                colour = (255, 0, 0) if c == 0 else (0, 0, 255)
                Image.new("RGB", (20 + i, 24), colour).save(root / split / cls / f"{i}.png")


def test_imagefolder_png_tree(tmp_path):
    _write_png_tree(tmp_path)
    train, test, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=16)
    assert info == {"name": "imagefolder", "num_classes": 2, "in_chans": 3, "image_size": 16}
    assert (len(train), len(test)) == (6, 6)
    x, y = test[0]  # a red "cat"
    assert tuple(x.shape) == (3, 16, 16) and y == 0
    rgb = _denorm(x, "imagefolder").mean(dim=(1, 2))
    assert rgb[0] > 0.99 and rgb[2] < 0.01
    x, y = train[5]  # a blue "dog", randomly cropped and flipped: still blue, still 16x16
    assert tuple(x.shape) == (3, 16, 16) and y == 1
    assert _denorm(x, "imagefolder").mean(dim=(1, 2))[2] > 0.99


def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="val"):
        (tmp_path / "a" / "train" / "x").mkdir(parents=True)
        get_datasets("imagefolder", data_dir=tmp_path / "a")
    _write_png_tree(tmp_path / "b")
    (tmp_path / "b" / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match="differ"):
        get_datasets("imagefolder", data_dir=tmp_path / "b")


def test_synthetic_is_deterministic_and_learnable():
    train, test, info = get_datasets("synthetic", train_size=200, test_size=100, image_size=12,
                                     channels=2, classes=5, seed=3)
    assert info == {"name": "synthetic", "num_classes": 5, "in_chans": 2, "image_size": 12}
    assert torch.equal(train[17][0], train[17][0]) and not torch.equal(train[17][0], test[17][0])
    x_tr = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    y_tr = torch.tensor([train[i][1] for i in range(len(train))])
    x_te = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
    y_te = torch.tensor([test[i][1] for i in range(len(test))])
    means = torch.stack([x_tr[y_tr == c].mean(0) for c in range(5)])
    pred = torch.cdist(x_te, means).argmin(1)
    assert (pred == y_te).float().mean() > 0.9  # a nearest-class-mean classifier learns it


def test_seeded_subsets():
    a, b, _ = get_datasets("digits", train_size=100, test_size=50, seed=1, augment=False)
    a2, _, _ = get_datasets("digits", train_size=100, test_size=50, seed=1, augment=False)
    a3, _, _ = get_datasets("digits", train_size=100, seed=2, augment=False)
    assert (len(a), len(b)) == (100, 50)
    assert a.indices == a2.indices and a.indices != a3.indices
    with pytest.raises(ValueError, match="train_size must be in \\[1, 1437\\]"):
        get_datasets("digits", train_size=5000)
    with pytest.raises(ValueError, match="test_size"):
        get_datasets("digits", test_size=0)


def _epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_augmentation_follows_seed_epoch_and_index_not_workers_or_ranks():
    train, test, _ = get_datasets("digits", train_size=64, test_size=16, augment=True)
    plain, _ = build_loaders(train, test, batch_size=16, seed=7)
    workers, _ = build_loaders(train, test, batch_size=16, seed=7, num_workers=2)
    ranks = [build_loaders(train, test, batch_size=16, seed=7, rank=r, world_size=2)[0]
             for r in range(2)]
    for epoch in (0, 1):
        want = _epoch_batches(plain, epoch)
        got = _epoch_batches(workers, epoch)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(want, got, strict=True))
        shards = [_epoch_batches(loader, epoch) for loader in ranks]
        for step, (x, _) in enumerate(want):  # rank r holds samples r, r + 2, ... of a batch
            assert torch.equal(x[0::2], shards[0][step][0])
            assert torch.equal(x[1::2], shards[1][step][0])
    # augmentation is on: two epochs crop the same image differently, and reading data leaves
    # the caller's random stream alone
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds = plain.dataset
    ds.set_epoch(0)
    first = ds[5][0]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[5][0])
    assert torch.equal(torch.rand(3), expected)
    ds.set_epoch(0)
    assert torch.equal(first, ds[5][0])


def test_loaders_shard_global_batches_across_ranks():
    train, test, _ = get_datasets("digits", train_size=96, test_size=30, augment=False)
    one, test_one = build_loaders(train, test, batch_size=16, seed=5)
    ranks = [build_loaders(train, test, batch_size=16, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for loader in [one] + [tr for tr, _ in ranks]:
        loader.sampler.set_epoch(3)
    labels_one = [y for _, y in one]
    x_one = [x for x, _ in one]
    shards = [list(tr) for tr, _ in ranks]
    assert len(x_one) == 6 and all(len(s) == 6 for s in shards)
    for step in range(6):  # each global batch is the union of the two ranks' half batches
        merged = torch.cat([shards[0][step][0], shards[1][step][0]])
        key = lambda t: sorted(t.flatten(1).sum(1).tolist())  # noqa: E731
        assert key(merged) == key(x_one[step])
        assert len(labels_one[step]) == 16
    # the test shards partition the test set
    test_counts = [sum(len(y) for _, y in te) for _, te in ranks]
    assert sum(test_counts) == 30 == sum(len(y) for _, y in test_one)
    with pytest.raises(ValueError, match="multiple"):
        build_loaders(train, test, batch_size=15, world_size=2)


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "crc"])
def test_corrupt_gzipped_idx_files_are_a_value_error(tmp_path, damage):
    # a truncated or corrupt .gz crashed with EOFError / BadGzipFile (a traceback on the CLI)
    _write_mnist_folder(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "not_gzip":
        path.write_bytes(gzip.decompress(raw))
    else:
        flipped = bytearray(raw)
        flipped[-6] ^= 0xFF  # inside the CRC trailer
        path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz cannot be read"):
        get_datasets("fashion_mnist", data_dir=tmp_path)


def test_truncated_idx_file_in_the_torchvision_layout_is_a_value_error(tmp_path):
    # torchvision's own reader failed its reshape with a RuntimeError (a traceback on the CLI)
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist_folder(raw, gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cannot be read"):
        get_datasets("mnist", data_dir=tmp_path)


def test_imagefolder_mixed_modes_sizes_and_an_empty_class(tmp_path):
    """Grayscale, RGB and RGBA PNGs of different sizes load as 3-channel images of one size;
    a class folder without images is refused naming the split it is in."""
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("L", (9 + c, 13), 200).save(tmp_path / split / cls / "gray.png")
            Image.new("RGB", (31, 17 + c), (0, 255, 0)).save(tmp_path / split / cls / "rgb.png")
            Image.new("RGBA", (5, 40), (0, 0, 255, 10)).save(tmp_path / split / cls / "rgba.png")
    train, test, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=12)
    assert info["in_chans"] == 3 and (len(train), len(test)) == (6, 6)
    loader, _ = build_loaders(train, test, batch_size=6)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (6, 3, 12, 12) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "val" / "c").mkdir()
    (tmp_path / "train" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "0.png")
    with pytest.raises(ValueError, match=r"val: Found no valid file for the classes c"):
        get_datasets("imagefolder", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_failed_download_is_a_value_error(tmp_path, monkeypatch, name):
    # offline, --download crashed with URLError / RuntimeError tracebacks; every request goes
    # to a closed local port here, so nothing can be fetched
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=f"dataset {name}: downloading into .* failed"):
        get_datasets(name, data_dir=tmp_path / "dl", download=True)


def test_neighbouring_seeds_do_not_share_their_data_order():
    # torch's DistributedSampler seeds with seed + epoch: seed 0's epoch 1 was seed 1's epoch 0
    from wtmodels.data import build_loaders, get_datasets

    train, test, _ = get_datasets("digits", train_size=64, augment=False)

    def order(seed, epoch, rank=0, world=1):
        loader, _ = build_loaders(train, test, batch_size=8, seed=seed, rank=rank,
                                  world_size=world)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0, 1) != order(1, 0) and order(0, 2) != order(2, 0)
    assert order(3, 2) == order(3, 2) and sorted(order(3, 2)) == list(range(64))
    # two ranks split exactly the one-process order
    assert sorted(order(3, 2, 0, 2) + order(3, 2, 1, 2)) == list(range(64))
    assert order(3, 2, 0, 2) == order(3, 2)[0::2]


def test_the_order_is_padded_to_a_multiple_of_the_ranks():
    from wtmodels.data import build_loaders, get_datasets

    train, test, _ = get_datasets("digits", train_size=63, augment=False)
    parts = []
    for rank in (0, 1):
        loader, _ = build_loaders(train, test, batch_size=8, seed=0, rank=rank, world_size=2)
        loader.sampler.set_epoch(0)
        parts.append(list(loader.sampler))
    assert len(parts[0]) == len(parts[1]) == 32 and set(parts[0] + parts[1]) == set(range(63))
