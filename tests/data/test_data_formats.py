"""Data: CIFAR / ImageFolder / synthetic, written here in their real on-disk formats.

Known answers: pixels and labels equal the ones written (after undoing the documented
normalisation by hand, and PIL's own resize as the oracle of the documented resize); damaged or
missing files give one ValueError naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from wtmodels.data import SyntheticImages, get_datasets

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the README's "ImageNet's statistics"
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _to_255(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)) * 255


def _write_cifar(root: Path, tv_cls, monkeypatch, n: int = 3, register: bool = True):
    """CIFAR python batches in the real format; their MD5s registered on the torchvision class
    (``register``) so that its integrity check runs for real on the files written here."""
    folder = root / tv_cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    fine = tv_cls is tvd.CIFAR100
    md5, batches = {}, {}
    for name, _ in tv_cls.train_list + tv_cls.test_list:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100 if fine else 10, size=n).tolist()
        obj = {"batch_label": name, "data": images.reshape(n, -1),
               "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if fine:  # coarse labels (20 superclasses) differ from the fine ones
            obj.update(fine_labels=labels, coarse_labels=[(lab + 7) % 20 for lab in labels])
        else:
            obj["labels"] = labels
        batches[name] = (images, labels)
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    meta_key = tv_cls.meta["key"]
    with open(folder / tv_cls.meta["filename"], "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(100 if fine else 10)]}, f, protocol=2)
    for path in folder.iterdir():
        md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    if register:
        monkeypatch.setattr(tv_cls, "train_list", [[k, md5[k]] for k, _ in tv_cls.train_list])
        monkeypatch.setattr(tv_cls, "test_list", [[k, md5[k]] for k, _ in tv_cls.test_list])
        monkeypatch.setattr(tv_cls, "meta", {**tv_cls.meta, "md5": md5[tv_cls.meta["filename"]]})
    return folder, batches


def test_cifar100_reads_fine_labels_and_pixels_normalised_by_the_documented_statistics(
        tmp_path, monkeypatch):
    _, batches = _write_cifar(tmp_path, tvd.CIFAR100, monkeypatch)
    train, test, info = get_datasets("cifar100", data_dir=tmp_path, augment=False)
    assert info == {"name": "cifar100", "num_classes": 100, "in_chans": 3, "image_size": 32}
    images, labels = batches["test"]
    for i in range(3):
        x, y = test[i]
        assert y == labels[i]  # the fine label, not the coarse one
        assert torch.allclose(_to_255(x, CIFAR100_MEAN, CIFAR100_STD),
                              torch.tensor(images[i]).float(), atol=1e-3)
    images, labels = batches["train"]
    assert [train[i][1] for i in range(3)] == labels


@pytest.mark.parametrize("damage", ["truncate", "remove"])
@pytest.mark.parametrize("tv_cls,name,victim", [(tvd.CIFAR10, "cifar10", "data_batch_3"),
                                                (tvd.CIFAR10, "cifar10", "batches.meta"),
                                                (tvd.CIFAR100, "cifar100", "test")])
def test_a_damaged_or_missing_cifar_file_is_named(tmp_path, monkeypatch, tv_cls, name, victim,
                                                  damage):
    # the message said "no intact cifar-10-batches-py under ROOT (files missing or MD5 mismatch:
    # Dataset not found or corrupted. You can use download=True ...)": which of the 7 files?
    folder, _ = _write_cifar(tmp_path, tv_cls, monkeypatch)
    path = folder / victim
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
        what = f"{path} fails its MD5 check"
    else:
        path.unlink()
        what = f"{path} is missing"
    with pytest.raises(ValueError) as err:
        get_datasets(name, data_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"dataset {name}: {what}") and "--download" in msg, msg
    assert "\n" not in msg and "download=True" not in msg


def test_a_cifar_archive_not_yet_extracted_is_pointed_at(tmp_path, monkeypatch):
    # torchvision's --download reuses an archive whose MD5 matches, without the network
    (tmp_path / tvd.CIFAR10.filename).write_bytes(b"pretend archive")
    with pytest.raises(ValueError) as err:
        get_datasets("cifar10", data_dir=tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / tvd.CIFAR10.base_folder} does not exist" in msg
    assert f"{tmp_path / tvd.CIFAR10.filename}" in msg and "--download" in msg


def test_cli_cifar_with_a_damaged_batch_is_one_line_exit_2(tmp_path):
    # real torchvision MD5s (a subprocess cannot be monkeypatched): every written file fails them
    folder = tmp_path / tvd.CIFAR10.base_folder
    folder.mkdir()
    for name, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list:
        (folder / name).write_bytes(b"\x80\x02}q\x00.")  # a tiny (wrong) pickle
    (folder / "data_batch_1").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "wtmodels.train", "--dataset", "cifar10", "--data-dir",
         str(tmp_path), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{folder / 'data_batch_1'} fails its MD5 check" in lines[0] and "--download" in lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _tree(root: Path, splits=("train", "val"), classes=("a", "b")):
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (9, 7), (10, 20, 30)).save(root / split / c / "0.png")


def test_imagefolder_modes_p_l_rgba_jpeg_give_the_written_colours_at_the_documented_size(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
        pal = Image.new("P", (30, 20), 1)
        pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        pal.save(tmp_path / split / "a" / "pal.png")
        Image.new("L", (20, 20), 77).save(tmp_path / split / "b" / "gray.PNG")
        Image.new("RGBA", (16, 40), (5, 6, 7, 0)).save(tmp_path / split / "b" / "rgba.png")
        # a gradient: the resize + center crop is checked against PIL's own resize
        grad = np.add.outer(np.arange(24) * 9, np.arange(36) * 3).astype(np.uint8)
        Image.fromarray(np.stack([grad, grad[::-1], 255 - grad], -1)).save(
            tmp_path / split / "a" / "grad.png")
    train, test, info = get_datasets("imagefolder", data_dir=tmp_path, image_size=14,
                                     augment=False)
    assert info == {"name": "imagefolder", "num_classes": 2, "in_chans": 3, "image_size": 14}
    assert test.classes == ["a", "b"] and len(train) == len(test) == 4
    got = {Path(p).name: (test[i][0], test[i][1]) for i, (p, _) in enumerate(test.samples)}
    for fname, label, rgb in (("pal.png", 0, (200, 100, 50)), ("gray.PNG", 1, (77, 77, 77)),
                              ("rgba.png", 1, (5, 6, 7))):  # alpha dropped, not composited
        x, y = got[fname]
        assert y == label and tuple(x.shape) == (3, 14, 14)
        want = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 14, 14)
        assert torch.allclose(_to_255(x, IMAGENET_MEAN, IMAGENET_STD), want, atol=1e-3), fname
    # shorter side (24) to round(14 / 0.875) = 16, longer 36 * 16 / 24 = 24, centre 14x14
    img = Image.open(tmp_path / "val" / "a" / "grad.png").resize((24, 16), Image.BILINEAR)
    want = torch.tensor(np.asarray(img.crop((5, 1, 19, 15)))).permute(2, 0, 1).float()
    assert torch.allclose(_to_255(got["grad.png"][0], IMAGENET_MEAN, IMAGENET_STD), want,
                          atol=1e-3)


def test_imagefolder_class_mismatch_names_only_the_differing_classes(tmp_path):
    classes = [f"n{i:08d}" for i in range(40)]
    _tree(tmp_path, splits=("train",), classes=classes)
    _tree(tmp_path, splits=("val",), classes=[c for c in classes if c != "n00000017"] + ["extra"])
    with pytest.raises(ValueError) as err:
        get_datasets("imagefolder", data_dir=tmp_path)
    msg = str(err.value)
    assert "n00000017" in msg and "extra" in msg
    assert "n00000016" not in msg  # the 39 shared classes are not listed (ImageNet: 1000)


def test_imagefolder_with_test_instead_of_val_says_so(tmp_path):
    _tree(tmp_path, splits=("train", "test"))
    with pytest.raises(ValueError) as err:
        get_datasets("imagefolder", data_dir=tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'val'} is not a directory" in msg and f"{tmp_path / 'test'}" in msg


@pytest.mark.parametrize("shape", [(1, 1, 1)])
def test_synthetic_images_of_one_value_are_refused_not_nan(shape):
    # a 1x1 single-channel set gave NaN images (std of one value) and a UserWarning
    with pytest.raises(ValueError, match="at least 2"):
        SyntheticImages(8, num_classes=2, shape=shape)
    with pytest.raises(ValueError, match="at least 2"):
        get_datasets("synthetic", image_size=1, channels=1, train_size=4, test_size=4)
    train, _, _ = get_datasets("synthetic", image_size=1, channels=2, train_size=4, test_size=4)
    assert torch.isfinite(train[0][0]).all()


def test_an_image_over_pils_pixel_limit_is_named(tmp_path, monkeypatch):
    # PIL's DecompressionBombError is no OSError: it passed through the loader without the file
    _tree(tmp_path)
    big = tmp_path / "train" / "b" / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > 2 * 500: refused
    train, _, _ = get_datasets("imagefolder", data_dir=tmp_path, image_size=4)
    index = [Path(p).name for p, _ in train.samples].index("big.png")
    assert torch.isfinite(train[0][0]).all()  # a 9x7 image passes
    with pytest.raises(OSError) as err:
        train[index]
    assert str(big) in str(err.value) and "MAX_IMAGE_PIXELS" in str(err.value)
