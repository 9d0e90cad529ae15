"""Crash-safe file writes: write a temporary file beside the target, flush, fsync, ``os.replace``.

A reader (or a process restarted after a kill) sees either the old file or the new one, never a
partial one. Used for checkpoints, ``metrics.jsonl``, ``config.json`` and ``done.json``.

Example:
    >>> import json, os, tempfile
    >>> from wtmodels.atomic import atomic_write_json
    >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
    >>> atomic_write_json(path, {"epoch": 1})
    >>> json.load(open(path))
    {'epoch': 1}
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary binary file, then atomically move it to ``path``.

    If ``write`` raises, ``path`` is left untouched and the temporary file is removed.

    Args:
        path: destination file; its directory must exist.
        write: callable that writes the whole content to the open file ``f``.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> atomic_write(p, lambda f: f.write(b"abc"))
        >>> open(p, "rb").read()
        b'abc'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode open() would give (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it (once: it is briefly 0 here)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "b")
        >>> atomic_write_bytes(p, b"1"); open(p, "rb").read()
        b'1'
    """
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "t.txt")
        >>> atomic_write_text(p, "hi\\n"); open(p).read()
        'hi\\n'
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (with a trailing newline).

    Example:
        >>> import json, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "c.json")
        >>> atomic_write_json(p, [1, 2]); json.load(open(p))
        [1, 2]
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically write one compact JSON object per line.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "m.jsonl")
        >>> atomic_write_jsonl(p, [{"a": 1}, {"a": 2}]); open(p).read()
        '{"a": 1}\\n{"a": 2}\\n'
    """
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``.

    Example:
        >>> import os, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> atomic_torch_save(p, {"w": torch.ones(2)})
        >>> torch.load(p)["w"].tolist()
        [1.0, 1.0]
    """
    import torch  # here, not at module level: results writers need no torch import

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
