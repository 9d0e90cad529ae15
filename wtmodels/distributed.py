"""Process-group set-up for ``torchrun`` and the few collectives the trainer needs.

On one process everything here is a no-op, so the trainer calls it unconditionally.

Example:
    >>> from wtmodels.distributed import DistContext
    >>> ctx = DistContext.from_env(device="cpu")   # no torchrun variables: a single process
    >>> ctx.world_size, ctx.rank, ctx.is_main
    (1, 0, True)
    >>> ctx.all_reduce_sum([2.0, 3.0])
    [2.0, 3.0]
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class BadEnvironment(ValueError):
    """WORLD_SIZE / RANK / LOCAL_RANK unreadable or inconsistent: this process's rank cannot
    be trusted, so every process reports it (not rank 0 alone).

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"RANK": "abc"}):  # doctest: +ELLIPSIS
        ...     DistContext.from_env("cpu")
        Traceback (most recent call last):
        ...
        wtmodels.distributed.BadEnvironment: environment variable RANK='abc' is not an integer ...
    """


def _env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:  # a bare "invalid literal for int() with base 10: 'abc'" before
        raise BadEnvironment(f"environment variable {name}={text!r} is not an integer (torchrun "
                         "sets WORLD_SIZE, RANK and LOCAL_RANK)") from None


class MainRankFailed(RuntimeError):
    """Raised on ranks > 0 by :meth:`DistContext.run_on_main` when rank 0's call failed; its
    message is rank 0's error (rank 0 reports it).

    Example:
        >>> raise MainRankFailed("rank 0 failed: OSError: disk full")
        Traceback (most recent call last):
        ...
        wtmodels.distributed.MainRankFailed: rank 0 failed: OSError: disk full
    """


@dataclass
class DistContext:
    """Rank, world size and device of this process.

    Args:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the torch device this process computes on.
        initialised: whether this context created the process group (and must destroy it).

    Example:
        >>> ctx = DistContext()  # one process, as from_env gives without torchrun
        >>> ctx.is_main, ctx.all_reduce_sum([1.0, 2.0]), ctx.run_on_main(lambda: "written")
        (True, [1.0, 2.0], 'written')
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> DistContext:
        """Join the process group that ``torchrun`` describes in the environment, if any.

        Backend: ``nccl`` when computing on CUDA, else ``gloo``.

        Args:
            device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.

        Returns:
            The context of this process.

        Example:
            >>> DistContext.from_env("cpu").device
            device(type='cpu')
        """
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        world_size, rank, local_rank = (_env_int(name, default) for name, default in
                                        (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            # else a rank outside the group waited for peers until the 30-minute timeout
            raise BadEnvironment(f"torchrun environment: RANK={rank} must be in 0..WORLD_SIZE-1 "
                             f"(WORLD_SIZE={world_size}) and LOCAL_RANK={local_rank} >= 0")
        if use_cuda:
            visible = torch.cuda.device_count()
            if not 0 <= local_rank < visible:  # else a bare "invalid device ordinal"
                raise ValueError(f"LOCAL_RANK={local_rank} but this node has {visible} visible "
                                 f"CUDA device(s): start at most {visible} process(es) per node "
                                 "(torchrun --nproc_per_node) or use device cpu")
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        initialised = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
            initialised = True
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                   initialised=initialised)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over all ranks (float64 on the wire).

        Example:
            >>> DistContext().all_reduce_sum([1.0])
            [1.0]
        """
        return self._all_reduce(values, "SUM")

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of a list of floats over all ranks.

        Example:
            >>> DistContext().all_reduce_max([1.0, -2.0])
            [1.0, -2.0]
        """
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if self.world_size == 1:
            return list(values)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)  # (n,)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` in rank order (on every rank).

        Example:
            >>> DistContext().gather_objects({"a": 1})
            [{'a': 1}]
        """
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank.

        Example:
            >>> DistContext().broadcast_object("x")
            'x'
        """
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def run_on_main(self, fn):
        """Call ``fn()`` on rank 0 alone (file writes); every rank then learns whether it raised.

        Rank 0 re-raises its own exception, the other ranks raise :class:`MainRankFailed`, so
        no rank goes on to a collective that rank 0 will never join (they died on a gloo
        'Connection closed by peer' traceback, or waited for the process-group timeout).

        Returns:
            ``fn()``'s result on rank 0, None on the other ranks.

        Example:
            >>> DistContext().run_on_main(lambda: 3)
            3
        """
        if self.world_size == 1:
            return fn()
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the broadcast
                failure = err
        message = self.broadcast_object(
            None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if message is not None:
            raise MainRankFailed(f"rank 0 failed: {message}")
        return result

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
            self.initialised = False
            # garbage cycles can still hold the group's pending work: freed at interpreter exit,
            # a gloo thread then wanted the GIL of a finalizing interpreter and the process
            # aborted ("terminate called without an active exception", ~1 in 10 bad-input
            # exits under load; 0 in 40 with this collection)
            gc.collect()
