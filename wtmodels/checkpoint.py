"""Training checkpoints: atomic save, validated load, and every random-number-generator state.

A checkpoint is a dict saved with :func:`torch.save` (atomically, see :mod:`wtmodels.atomic`)
whose ``"format"`` key marks it as ours; :func:`load_checkpoint` refuses anything else (a
truncated file, a plain ``state_dict``, a pickle) with a ``ValueError``. Only tensors and plain
Python containers are stored, so it loads with ``weights_only=True`` (no code runs on load).

Example:
    >>> import os, random, tempfile, torch
    >>> from wtmodels.checkpoint import capture_rng_state, restore_rng_state
    >>> state = capture_rng_state()
    >>> a = (torch.rand(1).item(), random.random())
    >>> restore_rng_state(state)
    >>> a == (torch.rand(1).item(), random.random())
    True
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from wtmodels.atomic import atomic_torch_save

CHECKPOINT_FORMAT = "wtmodels.train/checkpoint-v1"


def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """The state of torch (CPU and CUDA), numpy, python and a data-loader generator.

    Args:
        loader_generator: the train loader's ``generator``, if any.

    Returns:
        A dict of tensors and plain Python values (safe for ``weights_only`` loading).

    Example:
        >>> sorted(capture_rng_state())
        ['cuda', 'loader', 'numpy', 'python', 'torch']
    """
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is what we save
    py_state = random.getstate()  # (version, 625 ints, gauss_next)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    """Put back the generator states captured by :func:`capture_rng_state`.

    Args:
        state: the captured dict.
        loader_generator: the train loader's ``generator`` to restore, if any.

    Example:
        >>> s = capture_rng_state(); x = torch.randn(2)
        >>> restore_rng_state(s); torch.equal(x, torch.randn(2))
        True
    """
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # one state per GPU the saving process saw: a resume that sees fewer GPUs (another
        # machine, CUDA_VISIBLE_DEVICES) restores those it has (torch's set_rng_state_all
        # would fail with an IndexError on the first missing one)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],  # noqa: NPY002
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save ``state`` (a dict) marked with the checkpoint format.

    Args:
        path: destination, e.g. ``run_dir/checkpoint.pt``.
        state: model/optimizer/... state dicts, epoch, RNG states, history.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
        >>> save_checkpoint(p, {"epoch": 1})
        >>> load_checkpoint(p)["epoch"]
        1
    """
    atomic_torch_save(path, {**state, "format": CHECKPOINT_FORMAT})


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, on the CPU.

    Args:
        path: the checkpoint file.

    Returns:
        The state dict.

    Raises:
        ValueError: the file is missing, truncated, not a torch file, or not one of ours.

    Example:
        >>> import os, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "foreign.pt")
        >>> torch.save({"weight": torch.ones(1)}, p)
        >>> load_checkpoint(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: checkpoint ... is not a wtmodels training checkpoint (no 'format' marker)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is unreadable (truncated or not a torch file): "
                         f"{reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a wtmodels training checkpoint "
                         "(no 'format' marker)")
    return state
