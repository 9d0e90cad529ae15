"""Datasets, transforms and loaders for the training harness.

Every dataset is reached by name through :func:`get_datasets`, which returns the train and test
sets (already carrying their normalisation and, for the train set, augmentation) and an ``info``
dict ``{"name", "num_classes", "in_chans", "image_size"}`` that sizes the model.

================  ==========================================================================
name              source
================  ==========================================================================
``digits``        scikit-learn's ``load_digits`` (1797 real 8x8 digits shipped inside the
                  package), fixed stratified split: 1437 train / 360 test. Nothing to download.
``mnist``         torchvision ``MNIST`` from ``data_dir`` (``download=True`` fetches it).
``fashion_mnist`` torchvision ``FashionMNIST`` from ``data_dir``; without one, when the Debian
                  package ``dataset-fashion-mnist`` is installed its files are used.
``cifar10``       torchvision ``CIFAR10`` from ``data_dir`` (MD5 sums checked by torchvision).
``cifar100``      torchvision ``CIFAR100`` likewise.
``imagefolder``   ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (ImageNet layout).
``synthetic``     a learnable generated set of any size and shape (class prototypes + noise).
================  ==========================================================================

The library writes nothing unless ``download=True`` is passed.

Example:
    >>> from wtmodels.data import get_datasets, build_loaders
    >>> train_ds, test_ds, info = get_datasets("digits")
    >>> info["num_classes"], info["in_chans"], info["image_size"], len(train_ds), len(test_ds)
    (10, 1, 8, 1437, 360)
    >>> train_loader, test_loader = build_loaders(train_ds, test_ds, batch_size=64)
    >>> x, y = next(iter(train_loader))
    >>> tuple(x.shape), tuple(y.shape)
    ((64, 1, 8, 8), (64,))
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import numbers
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from wtmodels.keywords import keyword_names, refuse_unknown

# torchvision is imported where a dataset needs it (its import, which pulls in torch._dynamo,
# takes seconds of every training process's start): digits and synthetic never do.

# Debian's dataset-fashion-mnist installs the four idx .gz files here.
FASHION_MNIST_SYSTEM_DIRS = ["/usr/share/datasets/fashion-mnist"]

# per-channel (mean, std) of the training images, in [0, 1] pixel units; imagefolder uses
# ImageNet's. digits: over all 1797 images, test split included (its 1437 training images
# give 0.3054 / 0.3761); kept so that recorded digits results stay reproducible.
NORMALISATION = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

# the digits split (wtmodels/digits_split.py): scikit-learn's stratified train_test_split of the
# 1797 images with this test fraction and random_state
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class TensorImageDataset(Dataset):
    """Images held in memory as a float tensor, with an optional per-image transform.

    Args:
        images: float tensor ``(N, C, H, W)`` with pixels in [0, 1].
        targets: integer labels ``(N,)``.
        transform: callable applied to each ``(C, H, W)`` image.

    Example:
        >>> import torch
        >>> ds = TensorImageDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
        >>> x, y = ds[1]
        >>> tuple(x.shape), y
        ((1, 8, 8), 1)
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None):
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(targets); got {tuple(images.shape)} "
                f"and {len(targets)} targets"
            )
        self.images = images  # (N, C, H, W)
        self.targets = targets.long()  # (N,)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]  # (C, H, W)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class SyntheticImages(Dataset):
    """A learnable generated classification set of any size and shape.

    Each class has a fixed smooth random prototype (drawn from ``seed``); image ``i`` of a split
    is its class prototype circularly shifted by up to two pixels plus Gaussian noise, both drawn
    from a generator seeded by ``(seed, split, i)``, so an image is the same whenever it is read
    and nothing is held in memory. Labels cycle through the classes (``i % num_classes``).

    Args:
        size: number of images.
        num_classes: number of classes.
        shape: ``(C, H, W)`` of each image.
        seed: seed of the prototypes and noise.
        split: 0 for train, 1 for test (different noise, same prototypes).
        noise: standard deviation of the additive noise (the prototypes have unit std).

    Example:
        >>> ds = SyntheticImages(100, num_classes=4, shape=(3, 16, 16))
        >>> x, y = ds[5]
        >>> tuple(x.shape), y, bool((ds[5][0] == x).all())
        ((3, 16, 16), 1, True)
    """

    def __init__(self, size: int, num_classes: int = 10, shape=(3, 32, 32), seed: int = 0,
                 split: int = 0, noise: float = 0.5):
        self.size = int(size)
        self.num_classes = int(num_classes)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.split = int(split)
        self.noise = float(noise)
        c, h, w = self.shape
        if c * h * w < 2:  # one value: its prototypes, centred, are all zero (and were NaN)
            raise ValueError(f"synthetic images need at least 2 values (channels * image_size**2),"
                             f" got shape {self.shape}: raise image_size or channels")
        gen = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, c, max(2, h // 4), max(2, w // 4), generator=gen)
        protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                                 align_corners=False)  # (K, C, H, W)
        protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
        self.prototypes = protos / protos.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % self.num_classes
        # modulo 2**64, torch's seed range (a large seed overflowed; smaller ones keep theirs).
        # From index P = 1000003 on that key was test image index - P's: hashed there instead
        # (a training set over a million images held every test image's shift and noise)
        if index < _SYNTHETIC_P:
            key = ((self.seed * _SYNTHETIC_P + self.split) * _SYNTHETIC_P + index) & _MASK64
        else:
            key = _hash_seed(self.seed, self.split, index)
        gen = torch.Generator().manual_seed(key)
        shift = torch.randint(-2, 3, (2,), generator=gen)
        image = torch.roll(self.prototypes[label], shifts=(int(shift[0]), int(shift[1])),
                           dims=(1, 2))  # (C, H, W)
        image = image + self.noise * torch.randn(self.shape, generator=gen)
        return image, label


# ---------------------------------------------------------------------------------------------
# transforms

def _to_float_image() -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _normalise(name: str) -> Callable:
    from torchvision.transforms import v2

    mean, std = NORMALISATION[name]
    return v2.Normalize(mean=list(mean), std=list(std))


def _small_image_transforms(name: str, image_size: int, augment: bool, crop_pad: int,
                            flip: bool, resize: int | None):
    """(train, test) transforms for fixed-size PIL datasets: to float, optional resize, pad-crop,
    flip, normalise."""
    from torchvision.transforms import v2

    base = [_to_float_image()]
    if resize is not None:
        base.append(v2.Resize((resize, resize), antialias=True))
    aug = []
    if augment and crop_pad > 0:
        aug.append(v2.RandomCrop(image_size, padding=crop_pad))
    if augment and flip:
        aug.append(v2.RandomHorizontalFlip())
    norm = [_normalise(name)]
    return v2.Compose(base + aug + norm), v2.Compose(base + norm)


class TensorImageTransform:
    """Resize, pad-and-random-crop and normalise a float ``(C, H, W)`` image tensor (or a batch
    ``(..., C, H, W)``, one crop for all): what torchvision's ``v2.Resize((size, size),
    antialias=True)``, ``v2.RandomCrop(size, padding=crop_pad)`` and ``v2.Normalize(mean, std)``
    do, bit for bit, with the crop offsets drawn from torch's global generator as they draw them
    (top, then left), but without importing torchvision. The digits transform.

    Args:
        mean, std: per-channel normalisation.
        size: output side; the image is resized to ``(size, size)`` first unless it has that
            size already.
        crop_pad: zero padding on every side before a random ``size x size`` crop; 0: no crop.

    Example:
        >>> import torch
        >>> tf = TensorImageTransform(mean=(0.5,), std=(0.25,), size=4, crop_pad=1)
        >>> _ = torch.manual_seed(0)
        >>> out = tf(torch.full((1, 8, 8), 0.75))
        >>> tuple(out.shape), float(out.max())
        ((1, 4, 4), 1.0)
    """

    def __init__(self, mean, std, size: int, crop_pad: int = 0):
        if any(s == 0 for s in std):
            raise ValueError(f"std must have no zero entry, got {tuple(std)}")
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if isinstance(crop_pad, bool) or not isinstance(crop_pad, numbers.Integral) or crop_pad < 0:
            raise ValueError(f"crop_pad must be an integer >= 0, got {crop_pad!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.size, self.crop_pad = int(size), int(crop_pad)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(image) or not image.is_floating_point() or image.ndim < 3:
            what = (f"{image.dtype} tensor of shape {tuple(image.shape)}" if torch.is_tensor(image)
                    else type(image).__name__)
            raise ValueError("TensorImageTransform takes a floating-point (C, H, W) or "
                             f"(..., C, H, W) image tensor, got a {what}")
        side = self.size
        if tuple(image.shape[-2:]) != (side, side):
            # as v2.Resize: leading dims flattened into a batch, and half / bfloat16 (which
            # interpolate's antialiased bilinear lacks) resized in float32 and cast back
            shape, dtype = image.shape, image.dtype
            batch = image.reshape(-1, *shape[-3:])  # (B, C, H, W)
            if dtype not in (torch.float32, torch.float64):
                batch = batch.float()
            batch = F.interpolate(batch, size=[side, side], mode="bilinear",
                                  align_corners=False, antialias=True)  # (B, C, side, side)
            image = batch.to(dtype).reshape(*shape[:-2], side, side)
        if self.crop_pad > 0:
            pad = self.crop_pad
            padded = F.pad(image, [pad, pad, pad, pad])  # (..., C, side + 2 pad, ...), zeros
            top = int(torch.randint(0, 2 * pad + 1, size=()))
            left = int(torch.randint(0, 2 * pad + 1, size=()))
            image = padded[..., top:top + side, left:left + side]  # (..., C, side, side)
        mean = torch.as_tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return image.sub(mean).div_(std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean}, std={self.std}, size={self.size}, "
                f"crop_pad={self.crop_pad})")


# ---------------------------------------------------------------------------------------------
# subsets


def _check_labels(ds: Dataset, num_classes: int, what: str) -> None:
    """``ValueError`` if a dataset's ``targets`` (when it lists them) leave ``[0, num_classes)``:
    a corrupt label file would otherwise fail deep inside the loss, mid-training."""
    targets = getattr(ds, "targets", None)
    if targets is None or len(targets) == 0:
        return
    targets = torch.as_tensor(targets)
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), found {low}..{high} "
                         "(a corrupt label file?)")


def _subset(ds: Dataset, size: int | None, seed: int, field: str) -> Dataset:
    """A fixed seeded subset of ``size`` items (indices kept in ascending order)."""
    if size is None or size == len(ds):
        return ds
    if size < 1 or size > len(ds):
        raise ValueError(f"{field} must be in [1, {len(ds)}] for this dataset, got {size}")
    indices = np.sort(np.random.default_rng(seed).permutation(len(ds))[:size])
    return Subset(ds, indices.tolist())


# ---------------------------------------------------------------------------------------------
# the datasets


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as ``(images (1797, 8, 8) float64 in 0..16, targets (1797,)
    int)``, equal to ``load_digits()``'s ``images`` and ``target``, read from the CSV scikit-learn
    ships without importing scikit-learn (about a second of every training process's start);
    through ``load_digits`` where the file is not where scikit-learn keeps it.

    Example:
        >>> images, targets = load_digits_arrays()
        >>> images.shape, targets.shape, float(images.max()), int(targets[:10].sum())
        ((1797, 8, 8), (1797,), 16.0, 45)
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")  # (1797, 65): 64 pixels, then the label
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _digits(data_dir, download, augment, image_size, opts):
    from wtmodels.digits_split import TEST_INDICES, TRAIN_INDICES

    raw_images, raw_targets = load_digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    targets = torch.tensor(raw_targets)  # (N,)
    idx_train, idx_test = list(TRAIN_INDICES), list(TEST_INDICES)
    size = image_size or 8
    mean, std = NORMALISATION["digits"]
    train_tf = TensorImageTransform(mean, std, size, crop_pad=1 if augment else 0)
    test_tf = TensorImageTransform(mean, std, size)
    train = TensorImageDataset(images[idx_train], targets[idx_train], train_tf)
    test = TensorImageDataset(images[idx_test], targets[idx_test], test_tf)
    return train, test, {"num_classes": 10, "in_chans": 1, "image_size": size}


def _read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (``.gz`` or plain) holding unsigned bytes, e.g. MNIST images/labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # truncated or not gzip, unreadable
        raise ValueError(f"{path} cannot be read (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 3:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, holds {len(data) - offset} "
                         "bytes")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*dims)


def _check_idx_header(path: Path, ndim: int) -> None:
    """``ValueError`` naming ``path`` unless its header is that of an idx file of unsigned bytes
    with ``ndim`` dimensions (reads the header only)."""
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim or head[:3] != b"\0\0\x08" or head[3] != ndim:
        raise ValueError(f"{path} is not an idx file of unsigned bytes with {ndim} "
                         f"dimension{'s' if ndim > 1 else ''}")


def _idx_files(folder: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) idx files of a split in ``folder``, plain or gzipped, if present."""
    prefix = "train" if train else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            return None
    return found[0], found[1]


def _download_failed(name: str, root: Path, err: Exception) -> str:
    """The one-line message of a failed ``download=True``."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return (f"dataset {name}: downloading into {root} failed (no network?): {reason[:300]}; "
            "put the files there yourself and drop --download")


def _mnist_like(name: str, tv_name: str, data_dir, download, augment, image_size,
                search: list[str]):
    """(Fashion-)MNIST through torchvision, from its own layout or any folder of idx files."""
    import torchvision.datasets as tvd

    tv_cls = getattr(tvd, tv_name)
    size = image_size or 28
    resize = None if size == 28 else size
    train_tf, test_tf = _small_image_transforms(name, size, augment, crop_pad=2,
                                                flip=name == "fashion_mnist",
                                                resize=resize)
    info = {"num_classes": 10, "in_chans": 1, "image_size": size}
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if download and root is None:
        raise ValueError(f"dataset {name}: --download needs --data-dir DIR to download into")
    if root is not None and download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            return (tv_cls(root, train=True, transform=train_tf, download=True),
                    tv_cls(root, train=False, transform=test_tf, download=True),
                    _read_from(info, root / tv_name / "raw"))
        except (RuntimeError, OSError) as err:  # no network, a failed mirror, a bad folder
            raise ValueError(_download_failed(name, root, err)) from None
    candidates = []
    if root is not None:
        tv_raw = root / tv_name / "raw"
        if all(f and f[0].suffix != ".gz" and f[1].suffix != ".gz"
               for f in (_idx_files(tv_raw, True), _idx_files(tv_raw, False))):
            # torchvision's own layout, uncompressed: its class reads it as is
            try:
                for train in (True, False):
                    images, labels = _idx_files(tv_raw, train)
                    _check_idx_header(images, 3)
                    _check_idx_header(labels, 1)
                pair = (tv_cls(root, train=True, transform=train_tf),
                        tv_cls(root, train=False, transform=test_tf))
            except (RuntimeError, OSError, ValueError) as err:  # a truncated file fails its
                # reshape; a non-idx, float or mis-shaped one: torchvision raised AssertionError,
                # TypeError or a ValueError naming no file, so the headers are checked first
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ValueError(f"dataset {name}: the idx files in {tv_raw} cannot be read "
                                 f"(truncated or corrupt?): {first}") from None
            for ds in pair:
                _check_28x28(ds.data, name, tv_raw)
                if len(ds.data) != len(ds.targets):  # torchvision does not check: an image
                    # without a label failed with an IndexError mid-training
                    split = "train" if ds.train else "t10k"
                    raise ValueError(f"dataset {name}: {tv_raw} holds {len(ds.data)} {split} "
                                     f"images but {len(ds.targets)} labels: the images and "
                                     "labels files do not form a pair")
            return (*pair, _read_from(info, tv_raw))
        candidates += [tv_raw, root]
    else:  # the system copies only when no folder was named
        candidates += [Path(p) for p in search]
    for folder in candidates:
        files = (_idx_files(folder, True), _idx_files(folder, False))
        if files[0] and files[1]:
            return (_IdxImages(tv_cls, *files[0], train_tf), _IdxImages(tv_cls, *files[1], test_tf),
                    _read_from(info, folder))
    where = ", ".join(str(c) for c in candidates) or "nowhere (no --data-dir)"
    raise ValueError(f"dataset {name}: no idx files (train-/t10k-images-idx3-ubyte[.gz]) found in "
                     f"{where}; pass --data-dir DIR or --download")


def _read_from(info: dict, folder: Path) -> dict:
    """``info`` with ``source``: the absolute folder the idx files were read from (a run that
    found the system copy, without ``--data-dir``, records where its data came from)."""
    return {**info, "source": str(folder.expanduser().absolute())}


def _check_28x28(images: torch.Tensor, name: str, where) -> None:
    """``ValueError`` unless ``images`` is ``(N, 28, 28)``: ``info`` declares 28 px, and other
    idx images were silently cropped to 28 px by the augmentation (test images kept their size)."""
    if tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"dataset {name}: {where} holds images of {tuple(images.shape[1:])} "
                         "pixels, not (Fashion-)MNIST's 28x28")


class _IdxImages(Dataset):
    """A torchvision (Fashion-)MNIST dataset whose idx files may sit in any folder, gzipped."""

    def __init__(self, tv_cls, images_path: Path, labels_path: Path, transform):
        self.data = _read_idx(images_path)  # (N, 28, 28) uint8
        self.targets = _read_idx(labels_path).long()  # (N,)
        if self.data.ndim != 3 or self.targets.ndim != 1 or len(self.data) != len(self.targets):
            raise ValueError(f"{images_path} and {labels_path} do not form an image/label pair")
        _check_28x28(self.data, tv_cls.__name__, images_path)
        self.classes = list(tv_cls.classes)
        # reuse torchvision's item logic (uint8 array -> PIL "L" image -> transform)
        self._tv_getitem = tv_cls.__getitem__
        self.transform = transform
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self._tv_getitem(self, index)


def _mnist(data_dir, download, augment, image_size, opts):
    return _mnist_like("mnist", "MNIST", data_dir, download, augment, image_size, [])


def _fashion_mnist(data_dir, download, augment, image_size, opts):
    return _mnist_like("fashion_mnist", "FashionMNIST", data_dir, download, augment, image_size,
                       FASHION_MNIST_SYSTEM_DIRS)


def _cifar(name: str, tv_name: str, num_classes: int, data_dir, download, augment, image_size):
    import torchvision.datasets as tvd

    if data_dir is None:
        raise ValueError(f"dataset {name} needs --data-dir (add --download to fetch it there)")
    root = Path(data_dir).expanduser()
    if not root.is_dir() and not download:
        raise ValueError(f"dataset {name}: data dir {root} does not exist (add --download)")
    tv_cls = getattr(tvd, tv_name)
    size = image_size or 32
    resize = None if size == 32 else size
    train_tf, test_tf = _small_image_transforms(name, size, augment, crop_pad=size // 8,
                                                flip=True, resize=resize)
    try:
        train = tv_cls(root, train=True, transform=train_tf, download=download)
        test = tv_cls(root, train=False, transform=test_tf, download=download)
    except (RuntimeError, OSError) as err:
        if download:  # no network, a failed mirror, a download failing its MD5 check
            raise ValueError(_download_failed(name, root, err)) from None
        if (root / tv_cls.train_list[0][0]).is_file():  # pointed at the batches folder itself
            raise ValueError(f"dataset {name}: {root} holds the batches themselves; pass the "
                             f"folder above it: --data-dir {root.parent}") from None
        # torchvision: files missing or failing their MD5 check ("Dataset not found or
        # corrupted. You can use download=True"): say which file
        problem = _cifar_problem(tv_cls, root) or " ".join(str(err).split())
        archive = root / tv_cls.filename
        fix = (f"{archive} is there: --download extracts it (no network needed when its MD5 "
               "matches)" if archive.is_file() else
               f"add --download to fetch {tv_cls.base_folder} into {root}")
        raise ValueError(f"dataset {name}: {problem}; {fix}") from None
    return train, test, {"num_classes": num_classes, "in_chans": 3, "image_size": size}


def _cifar_problem(tv_cls, root: Path) -> str | None:
    """The first missing or damaged file of a CIFAR folder, as a phrase naming it (None if every
    file passes torchvision's MD5 check)."""
    from torchvision.datasets.utils import check_integrity

    folder = root / tv_cls.base_folder
    if not folder.is_dir():
        return f"{folder} does not exist"
    meta = (tv_cls.meta["filename"], tv_cls.meta["md5"])
    for fname, md5 in [*tv_cls.train_list, *tv_cls.test_list, meta]:
        path = folder / fname
        if not path.is_file():
            return f"{path} is missing"
        if not check_integrity(str(path), md5):
            return f"{path} fails its MD5 check (truncated or corrupt)"
    return None


def _cifar10(data_dir, download, augment, image_size, opts):
    return _cifar("cifar10", "CIFAR10", 10, data_dir, download, augment, image_size)


def _cifar100(data_dir, download, augment, image_size, opts):
    return _cifar("cifar100", "CIFAR100", 100, data_dir, download, augment, image_size)


def _imagefolder(data_dir, download, augment, image_size, opts):
    if data_dir is None:
        raise ValueError("dataset imagefolder needs --data-dir ROOT holding ROOT/train/<class>/* "
                         "and ROOT/val/<class>/*")
    root = Path(data_dir).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            hint = ""
            if split == "val" and (root / "test").is_dir():
                hint = f"; {root / 'test'} is there: rename it (or link it) to {root / 'val'}"
            raise ValueError(f"dataset imagefolder: {root / split} is not a directory "
                             f"(expected ROOT/train/<class>/* and ROOT/val/<class>/*){hint}")
    from torchvision.transforms import v2

    from wtmodels.image_folder import IMG_EXTENSIONS, VisibleImageFolder, load_rgb

    size = image_size or 224
    norm = _normalise("imagefolder")
    if augment:
        train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True),
                               v2.RandomHorizontalFlip(), _to_float_image(), norm])
    else:
        train_tf = v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True),
                               v2.CenterCrop(size), _to_float_image(), norm])
    test_tf = v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size),
                          _to_float_image(), norm])
    found = {}
    for split, tf in (("train", train_tf), ("val", test_tf)):
        try:
            found[split] = VisibleImageFolder(str(root / split), tf, load_rgb)
        except (FileNotFoundError, RuntimeError) as err:  # e.g. a class folder without images
            msg = " ".join(str(err).split())
            if "Found no valid file" in msg:
                msg += f" Supported extensions are: {', '.join(IMG_EXTENSIONS)}"
            raise ValueError(f"dataset imagefolder: {root / split}: {msg}") from None
    train, test = found["train"], found["val"]
    if train.classes != test.classes:  # name the difference only: ImageNet has 1000 classes
        only = {split: sorted(set(a.classes) - set(b.classes))
                for split, a, b in (("train", train, test), ("val", test, train))}
        parts = [f"only {split} has class folder{'s' if len(names) > 1 else ''} "
                 f"{_some(names)}" for split, names in only.items() if names]
        raise ValueError(f"dataset imagefolder: the class folders of {root / 'train'} and "
                         f"{root / 'val'} differ (class indices follow them, so they must be the "
                         f"same): {'; '.join(parts)}")
    return train, test, {"num_classes": len(train.classes), "in_chans": 3, "image_size": size}


def _some(names: list[str], most: int = 10) -> str:
    """``names`` for a message, the first ``most`` of them and how many more."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _synthetic(data_dir, download, augment, image_size, opts):
    size = image_size or 32
    chans = opts.get("channels") or 3
    classes = opts.get("classes") or 10
    seed = opts["seed"]
    n_train = opts.get("train_size") or 1024
    n_test = opts.get("test_size") or 256
    shape = (chans, size, size)
    train = SyntheticImages(n_train, classes, shape, seed=seed, split=0)
    test = SyntheticImages(n_test, classes, shape, seed=seed, split=1)
    return train, test, {"num_classes": classes, "in_chans": chans, "image_size": size}


_DATASETS: dict[str, Callable] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_datasets`.

    Example:
        >>> "digits" in list_datasets()
        True
    """
    return sorted(_DATASETS)


def get_datasets(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 augment: bool = True, image_size: int | None = None,
                 channels: int | None = None, classes: int | None = None, **unknown):
    """Build the train and test sets of a named dataset.

    Args:
        name: one of :func:`list_datasets`.
        data_dir: where the files are (or go, with ``download``); unused by ``digits`` and
            ``synthetic``. (Fashion-)MNIST looks in ``data_dir/<MNIST|FashionMNIST>/raw`` (the
            torchvision layout) and in ``data_dir`` itself for idx files, plain or gzipped.
        download: let torchvision fetch the files into ``data_dir`` (the only way this function
            writes anything).
        train_size: keep a fixed seeded subset of this many training images (synthetic: generate
            this many, default 1024).
        test_size: likewise for the test set (synthetic default 256).
        seed: seed of the subsets and of the synthetic images.
        augment: apply the dataset's standard training augmentation (digits: pad-1 random crop;
            (Fashion-)MNIST: pad-2 random crop, plus flip for Fashion; CIFAR: random crop
            padded by ``image_size // 8`` (4 at 32 px) + flip; imagefolder: random resized
            crop + flip). Test sets are never augmented.
        image_size: resize to this square size (imagefolder default 224, synthetic 32, others
            their native size).
        channels: synthetic only: image channels (default 3).
        classes: synthetic only: number of classes (default 10).

    Returns:
        ``(train_ds, test_ds, info)`` with ``info = {"name", "num_classes", "in_chans",
        "image_size"}`` (MNIST / Fashion-MNIST also ``"source"``: the folder their idx files
        were read from); items are ``(float tensor (C, H, W), int label)``.

    Raises:
        ValueError: unknown name, missing or corrupt files, out-of-range sizes, an unknown
            keyword (the message names the valid ones).

    Example:
        >>> train_ds, test_ds, info = get_datasets("synthetic", train_size=64, test_size=32,
        ...                                        image_size=16, channels=1, classes=4)
        >>> len(train_ds), len(test_ds), info["num_classes"], tuple(train_ds[0][0].shape)
        (64, 32, 4, (1, 16, 16))
    """
    refuse_unknown("get_datasets", unknown, keyword_names(get_datasets))
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    sizes = {"train_size": train_size, "test_size": test_size, "image_size": image_size,
             "channels": channels, "classes": classes}
    for field, value in sizes.items():
        if value is None:
            continue
        # numpy integers are integers; a bool is not a size
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
        sizes[field] = int(value)
    train_size, test_size, image_size, channels, classes = sizes.values()
    seed = check_seed(seed)
    opts = {"seed": seed, "train_size": train_size, "test_size": test_size,
            "channels": channels, "classes": classes}
    if name != "synthetic" and (channels is not None or classes is not None):
        raise ValueError("channels and classes apply to the synthetic dataset only")
    train, test, info = _DATASETS[name](data_dir, download, augment, image_size, opts)
    for split, ds in (("train", train), ("test", test)):
        _check_labels(ds, info["num_classes"], f"dataset {name} ({split})")
    if name != "synthetic":
        train = _subset(train, train_size, seed, "train_size")
        test = _subset(test, test_size, seed + 1, "test_size")
    return train, test, {"name": name, **info}


_MASK64 = (1 << 64) - 1
_SYNTHETIC_P = 1_000_003  # SyntheticImages' seed multiplier


def check_seed(seed) -> int:
    """``seed`` as an int in torch's seed range ``[0, 2**64)``; ValueError naming it otherwise
    (torch said "Overflow when unpacking long long", numpy "expected non-negative integer", and
    a negative seed gave the synthetic images of ``seed + 2**64``).

    Example:
        >>> check_seed(2**64 - 1) == 2**64 - 1
        True
        >>> check_seed(-1)
        Traceback (most recent call last):
        ...
        ValueError: seed must be an integer in [0, 2**64), got -1
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _hash_seed(*keys: int) -> int:
    """A 63-bit seed hashed from integers (splitmix64 finaliser chained over ``keys``)."""
    h = 0
    for key in keys:
        h = (h + (key & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class SeededItems(Dataset):
    """A dataset whose random transforms are a pure function of ``(seed, epoch, index)``.

    Each item is read with torch's CPU generator seeded from ``(seed, epoch, index)``, and the
    generator's state is put back afterwards. An image therefore gets the same crop and flip
    whatever the number of loader workers or processes, and reading data leaves the caller's
    random stream (dropout, ...) untouched. torchvision's transforms draw from that generator;
    a transform drawing from numpy or ``random`` would not be covered.

    Args:
        dataset: the wrapped dataset (its transforms may be random).
        seed: the run's seed.

    Example:
        >>> import torch
        >>> from torchvision.transforms import v2
        >>> base = TensorImageDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long),
        ...                           v2.RandomCrop(8, padding=2))
        >>> ds = SeededItems(base, seed=0)
        >>> again = SeededItems(base, seed=0)
        >>> bool((ds[1][0] == ds[1][0]).all()), bool((ds[1][0] == again[1][0]).all())
        (True, True)
        >>> ds.set_epoch(1)  # another epoch draws other crops
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Use the random transforms of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(_hash_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)


class _EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` that also tells a :class:`SeededItems` set the epoch, and
    shuffles with a seed hashed from ``(seed, epoch)``: torch's own ``seed + epoch`` gives seed
    0's epoch 1 the order of seed 1's epoch 0, so runs with neighbouring seeds shared orders."""

    def __iter__(self):
        gen = torch.Generator().manual_seed(_hash_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        extra = self.total_size - len(order)  # pad (repeating) to a multiple of the ranks
        order += (order * math.ceil(extra / len(order)))[:extra] if extra else []
        return iter(order[self.rank:self.total_size:self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if isinstance(self.dataset, SeededItems):
            self.dataset.set_epoch(epoch)


def build_loaders(train_ds: Dataset, test_ds: Dataset, batch_size: int, *,
                  test_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False, **unknown):
    """Train and test loaders whose order is a pure function of ``(seed, epoch)`` (hashed: no two
    ``(seed, epoch)`` pairs share an order by construction).

    The train loader shuffles with a :class:`~torch.utils.data.DistributedSampler` even on one
    process (call ``train_loader.sampler.set_epoch(epoch)`` each epoch), so that ``N`` processes
    with ``batch_size / N`` images each see, step by step, the same global batches as one process
    with ``batch_size``. The train set is wrapped in :class:`SeededItems`, so its random
    transforms follow ``(seed, epoch, index)`` too: the batches, augmentation included, do not
    depend on ``num_workers`` or ``world_size``. The test loader reads this rank's shard
    ``rank::world_size`` in order, without padding, so sums over ranks count each test image
    once.

    Args:
        train_ds: training set.
        test_ds: test set.
        batch_size: GLOBAL batch size (divisible by ``world_size``).
        test_batch_size: global test batch size (default: ``2 * batch_size``).
        num_workers: loader worker processes per rank.
        seed: shuffling and augmentation seed.
        rank: this process's rank.
        world_size: number of processes.
        pin_memory: pin host memory (for GPU training).

    Returns:
        ``(train_loader, test_loader)``.

    Example:
        >>> from wtmodels.data import get_datasets
        >>> tr, te, _ = get_datasets("digits")
        >>> a, _ = build_loaders(tr, te, batch_size=8, seed=3)
        >>> b, _ = build_loaders(tr, te, batch_size=8, seed=3)
        >>> a.sampler.set_epoch(1); b.sampler.set_epoch(1)
        >>> bool((next(iter(a))[1] == next(iter(b))[1]).all())
        True
    """
    refuse_unknown("build_loaders", unknown, keyword_names(build_loaders))
    seed = check_seed(seed)
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size must be a positive multiple of the {world_size} "
                         f"process(es), got {batch_size}")
    test_batch_size = test_batch_size or 2 * batch_size
    per_rank_test = max(1, test_batch_size // world_size)
    sampler = _EpochSampler(SeededItems(train_ds, seed), num_replicas=world_size, rank=rank,
                            shuffle=True, seed=seed, drop_last=False)
    train_loader = DataLoader(sampler.dataset, batch_size=batch_size // world_size,
                              sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                              generator=torch.Generator().manual_seed(seed),
                              persistent_workers=False)
    shard = Subset(test_ds, list(range(rank, len(test_ds), world_size)))
    test_loader = DataLoader(shard, batch_size=per_rank_test, shuffle=False,
                             num_workers=num_workers, pin_memory=pin_memory)
    return train_loader, test_loader
