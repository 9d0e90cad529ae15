"""Per-epoch metric accumulation, reduced across processes.

:class:`EpochMeter` sums a pass's loss, correct predictions and image count, and averages the
model's ``core_stats()`` (solver steps, residuals, NFE ...) over the batches, weighted by batch
size (keys ending in ``_max`` take the maximum instead). :meth:`EpochMeter.reduce` combines the
sums of all ranks, so a DDP run reports the same numbers one process would.

Example:
    >>> import torch
    >>> from wtmodels.metrics import EpochMeter
    >>> m = EpochMeter()
    >>> m.update(loss_sum=2.0, correct=3, count=4, stats={"nstep": 10.0, "rel_residual_max": 0.1})
    >>> m.update(loss_sum=1.0, correct=1, count=4, stats={"nstep": 20.0, "rel_residual_max": 0.3})
    >>> m.reduce()
    {'loss': 0.375, 'acc': 0.5, 'count': 8, 'nstep': 15.0, 'rel_residual_max': 0.3}
"""

from __future__ import annotations

import math
import resource
import sys

import torch

from wtmodels.distributed import DistContext


class EpochMeter:
    """Running sums of one pass (train or test) over an epoch.

    Example:
        >>> m = EpochMeter()
        >>> m.update(loss_sum=6.0, correct=2, count=3, stats={"nstep": 4.0, "abs_max": 1.0})
        >>> m.update(loss_sum=2.0, correct=1, count=1, stats={"nstep": 8.0, "abs_max": math.nan})
        >>> m.reduce()  # nstep by batch size: (3 * 4 + 1 * 8) / 4; a NaN maximum reads inf
        {'loss': 2.0, 'acc': 0.75, 'count': 4, 'nstep': 5.0, 'abs_max': inf}
        >>> EpochMeter().reduce()  # an empty pass
        {'loss': nan, 'acc': nan, 'count': 0}
    """

    def __init__(self):
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0
        self.stat_sums: dict[str, float] = {}
        self.stat_counts: dict[str, int] = {}
        self.stat_max: dict[str, float] = {}
        self._pending: torch.Tensor | None = None  # (2,) loss and correct sums on a device

    def update(self, loss_sum: float | torch.Tensor, correct: int | torch.Tensor, count: int,
               stats: dict | None = None) -> None:
        """Add one batch.

        Args:
            loss_sum: the batch's summed per-image loss.
            correct: correctly classified images.
            count: images in the batch.
            stats: the model's ``core_stats()`` after this batch's forward pass.

        ``loss_sum`` and ``correct`` may be 0-dim tensors on an accelerator: they are summed
        there and read once, in :meth:`reduce` (no synchronisation per batch).

        Example:
            >>> m = EpochMeter()
            >>> m.update(torch.tensor(2.0), torch.tensor(3), 4); m.update(2.0, 1, 4)
            >>> m.reduce()
            {'loss': 0.5, 'acc': 0.5, 'count': 8}
        """
        if isinstance(loss_sum, torch.Tensor) or isinstance(correct, torch.Tensor):
            device = (loss_sum if isinstance(loss_sum, torch.Tensor) else correct).device
            pending = torch.stack([torch.as_tensor(v, device=device).detach().double().reshape(())
                                   for v in (loss_sum, correct)])  # (2,)
            self._pending = pending if self._pending is None else self._pending + pending
        else:
            self.loss_sum += float(loss_sum)
            self.correct += int(correct)
        self.count += int(count)
        for key, value in (stats or {}).items():
            if key.endswith("_max"):  # NaN is the worst value, as +inf: max() dropped it
                # (max(-inf, nan) is -inf), a finite maximum beside a NaN mean
                value = float("inf") if math.isnan(float(value)) else float(value)
                self.stat_max[key] = max(self.stat_max.get(key, float("-inf")), value)
            else:
                self.stat_sums[key] = self.stat_sums.get(key, 0.0) + float(value) * count
                self.stat_counts[key] = self.stat_counts.get(key, 0) + count

    def reduce(self, ctx: DistContext | None = None) -> dict[str, float]:
        """Mean loss, accuracy, image count and mean/max core statistics over all ranks.

        Every rank must call this (it is a collective under DDP) with the same stat keys.

        Args:
            ctx: the process context (``None``: a single process).

        Returns:
            ``{"loss", "acc", "count", <stat keys>...}``; loss and acc are NaN for an empty pass.
        """
        ctx = ctx or DistContext()
        if self._pending is not None:  # the one read of the device sums
            loss, correct = self._pending.tolist()
            self.loss_sum, self.correct, self._pending = self.loss_sum + loss, \
                self.correct + round(correct), None
        sum_keys = sorted(self.stat_sums)
        max_keys = sorted(self.stat_max)
        if ctx.world_size > 1:  # a rank that saw no batch (an empty test shard) has no keys:
            # the collectives below need the same list on every rank
            seen = ctx.gather_objects((sum_keys, max_keys))
            sum_keys = sorted({k for keys, _ in seen for k in keys})
            max_keys = sorted({k for _, keys in seen for k in keys})
        sums = ctx.all_reduce_sum([self.loss_sum, float(self.correct), float(self.count)]
                                  + [self.stat_sums.get(k, 0.0) for k in sum_keys]
                                  + [float(self.stat_counts.get(k, 0)) for k in sum_keys])
        maxes = ctx.all_reduce_max([self.stat_max.get(k, float("-inf")) for k in max_keys])
        count = sums[2]
        out = {"loss": sums[0] / count if count else float("nan"),
               "acc": sums[1] / count if count else float("nan"),
               "count": int(count)}
        n = len(sum_keys)
        for i, key in enumerate(sum_keys):
            out[key] = sums[3 + i] / sums[3 + n + i] if sums[3 + n + i] else float("nan")
        for key, value in zip(max_keys, maxes):
            out[key] = value
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's
    peak resident set size (``ru_maxrss``, a lifetime peak).

    Example:
        >>> peak_memory_mb(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB else


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (GPU only; the CPU RSS peak cannot be reset).

    Example:
        >>> reset_peak_memory(torch.device("cpu"))
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
