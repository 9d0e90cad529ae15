"""The ``imagefolder`` dataset's reading: torchvision's ImageFolder without hidden entries, and a
loader that keeps 16-bit images. A module of its own so that importing :mod:`wtmodels.data`
(every training process) does not import torchvision, which takes seconds; only this dataset and
the PIL-based ones need it.

Example:
    >>> from wtmodels.image_folder import hidden
    >>> hidden(".ipynb_checkpoints"), hidden("cat.png")
    (True, False)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = ["IMG_EXTENSIONS", "VisibleImageFolder", "hidden", "load_rgb", "visible_image"]


def load_rgb(path: str):
    """ImageFolder's loader: any image as 8-bit RGB. 16-bit grayscale (PIL modes ``I;16*`` and
    ``I``, e.g. 16-bit PNGs) is scaled from 0..65535 to 0..255; torchvision's own loader clips it
    to 255, turning every such image white.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "wide.png")
        ...     Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)).save(path)
        ...     img = load_rgb(path)  # a 16-bit grayscale PNG (PIL mode I;16)
        >>> img.mode, [img.getpixel((i, 0)) for i in range(3)]  # 0, 257, 65535 -> 0, 1, 255
        ('RGB', [(0, 0, 0), (1, 1, 1), (255, 255, 255)])
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode == "I" or img.mode.startswith("I;16"):
                wide = np.asarray(img).astype(np.float64)  # (H, W) in 0..65535
                img = Image.fromarray(np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8),
                                      "L")
            return img.convert("RGB")
    except Image.DecompressionBombError as err:  # no OSError, and it names no file
        raise OSError(f"{path}: {err} (if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
                      "or shrink the image)") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated, not an image, bad header
        if str(path) in str(err):
            raise
        # PIL's "image file is truncated" names no file: in a tree of a million, say which
        raise OSError(f"{path}: {err}") from err


def hidden(name: str) -> bool:
    """A dot name (``.ipynb_checkpoints``, ``.DS_Store``, macOS ``._x.png`` resource forks).

    Example:
        >>> hidden("._cat.png"), hidden(".DS_Store"), hidden("cat.png")
        (True, True, False)
    """
    return name.startswith(".")


class VisibleImageFolder(ImageFolder):
    """ImageFolder without hidden entries, as the shell's ``ROOT/train/<class>/*`` reads it:
    torchvision made a class of ``.ipynb_checkpoints`` (refused as "no valid file", or trained
    on as an extra class) and read ``._x.png`` resource forks as images. Defined at module
    level: loader workers started by spawn / forkserver pickle the dataset.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for name in ("cat/1.png", "cat/._1.png", "dog/2.png", ".ipynb_checkpoints/3.png"):
        ...         os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        ...         Image.new("RGB", (2, 2)).save(os.path.join(root, name))
        ...     data = VisibleImageFolder(root, transform=None, loader=load_rgb)
        ...     found = data.classes, len(data), data[1][1]
        >>> found  # classes, images (no ._1.png), label of dog/2.png
        (['cat', 'dog'], 2, 1)
    """

    def __init__(self, root: str, transform, loader):
        super().__init__(root, transform=transform, loader=loader,
                         is_valid_file=functools.partial(visible_image, root))

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and not hidden(e.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def visible_image(split_root: str, path: str) -> bool:
    """An image file none of whose path parts below ``split_root`` is hidden (reads no file).

    Example:
        >>> visible_image("/data/train", "/data/train/cat/1.png")
        True
        >>> visible_image("/data/train", "/data/train/cat/._1.png")
        False
    """
    parts = Path(os.path.relpath(path, split_root)).parts
    return not any(hidden(part) for part in parts) and has_file_allowed_extension(
        path, IMG_EXTENSIONS)
