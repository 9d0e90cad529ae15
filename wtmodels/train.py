"""Train one model on one dataset into a run directory: ``python -m wtmodels.train``.

Command line (one flag per :class:`~wtmodels.train_config.TrainConfig` and ``ModelConfig``
field; ``--help`` lists them)::

    python -m wtmodels.train --model wt_s --dataset digits --epochs 8 --out runs/a [--seed 0]
    python -m wtmodels.train --out runs/a --resume          # continue after a kill
    torchrun --nproc_per_node 2 -m wtmodels.train --model wt_s --out runs/ddp  # DDP

The run directory holds ``config.json`` (``train`` settings, ``model_overrides``, the resolved
``model_config``, ``data_info`` and ``env`` provenance of the first process; ``resumes``: for each
``--resume`` that trained, ``{"from_epoch", "env"}``), ``model_info.json``
(``model_summary``), ``metrics.jsonl`` (one object per finished epoch), ``checkpoint.pt``
(written atomically after every epoch) and, once every epoch is done, ``done.json``; a run
stopped on non-finite losses writes ``stopped.json`` instead (reason, epoch, the
``skipped_steps`` of that unfinished epoch; removed when ``--resume`` trains again).

Metrics per epoch (``metrics.jsonl``): ``epoch`` (1-based), ``train_loss`` and ``train_acc``
(plain cross-entropy and accuracy of the training batches as trained: augmented, train mode,
without label smoothing or the Jacobian term, skipped steps excluded), ``test_loss``,
``test_acc``, ``epoch_time_s`` (the training pass; ``eval_time_s`` the test pass),
``images_per_s`` (training images / epoch_time_s, all processes), ``peak_mem_mb``,
``skipped_steps`` (non-finite losses skipped), ``lr`` (of the epoch's last step), ``steps``
(optimizer steps so far), and the model's ``core_stats()`` averaged over the test batches
(weighted by batch size; ``*_max`` keys: the maximum): ``cell_evals`` always, ``nstep``,
``rel_residual``, ``rel_residual_max``, ``converged``, ``diverged`` for DEQ cores, ``nfe`` for
ODE cores; the same averaged over the training batches with a ``train_`` prefix, and
``jac_loss`` when the Jacobian regulariser is on.

Exit status: 0 done, 2 bad input (one line on stderr, nothing overwritten), 3 training stopped
after ``max_bad_steps`` consecutive non-finite losses (the last good checkpoint is kept).

Example:
    >>> from wtmodels.train import run
    >>> final = run({"model": "test_wt", "dataset": "digits", "epochs": 1, "train_size": 128,
    ...              "test_size": 64, "progress": "none"})
    >>> sorted(k for k in final if k.startswith("test_"))
    ['test_acc', 'test_loss']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wtmodels import data as datasets
from wtmodels import models as model_registry
from wtmodels.atomic import atomic_write_json, atomic_write_jsonl
from wtmodels.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from wtmodels.cli import UsageError, exit_with, parse_settings
from wtmodels.distributed import BadEnvironment, DistContext, MainRankFailed
from wtmodels.metrics import EpochMeter, peak_memory_mb, reset_peak_memory
from wtmodels.optim import build_optimizer, build_scheduler
from wtmodels.provenance import cpu_isa, git_sha
from wtmodels.train_config import (
    RUNTIME_FIELDS,
    TrainConfig,
    resolve_config,
    settings_without_effect,
    train_field_names,
)

EXIT_BAD_INPUT = 2
#: set by main() for the command line: reports a bad input where the trainer meets it
_report_at_once: Callable[[Exception], None] | None = None
EXIT_DIVERGED = 3

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_INFO_FILE = "model_info.json"
DONE_FILE = "done.json"
STOPPED_FILE = "stopped.json"  # the run gave up on non-finite losses (removed on resume)


def _does_not_fit(model: str, config, err: BaseException) -> str:
    """One line for a model whose weights cannot be allocated (a width of 2**31 asked ~77 GB),
    naming its size settings and the request.

    Example:
        >>> from wtmodels.model_config import ModelConfig
        >>> message = _does_not_fit("wt_s", ModelConfig(width=10**6), RuntimeError(
        ...     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1440000000000"
        ...     " bytes. Error code 12 (Cannot allocate memory)"))
        >>> head, tail = message.split(" (tried to allocate ")
        >>> head
        'model wt_s (width 1000000, depth 6, stages 1) does not fit in memory'
        >>> tail
        '1.44 TB); use a smaller width, depth or number of stages'
    """
    if found := re.search(r"allocate (\d+) bytes", str(err)):  # torch's CPU allocator
        size = int(found.group(1))
        unit, scale = next((u, s) for u, s in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12),
                                                ("GB", 1e9), ("MB", 1e6), ("bytes", 1))
                           if size >= s)
        asked = f"tried to allocate {size / scale:.3g} {unit}"
    elif found := re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGTP]?i?B)", str(err)):
        # a GPU's "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..." (one long line)
        asked = f"tried to allocate {found.group(1)}"
    elif "overflow" in str(err).lower():  # a width past ~1e17: sizes past a 64-bit count
        asked = "its size overflows a 64-bit count"
    else:  # MemoryError
        asked = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"model {model} (width {config.width}, depth {config.depth}, stages "
            f"{config.stages}) does not fit in memory ({asked}); use a smaller width, depth "
            f"or number of stages")


def _out_of_memory(err: BaseException) -> bool:
    """True for an error of allocating a model's weights: torch's CPU allocator ("can't allocate
    memory"), a GPU's out-of-memory error, a size past a 64-bit count ("Storage size calculation
    overflowed", "Overflow when unpacking long long"), ``MemoryError``; not for any other error
    that mentions allocation ("its data is not allocated yet").

    Example:
        >>> _out_of_memory(RuntimeError("The tensor's data is not allocated yet"))
        False
        >>> _out_of_memory(TypeError("empty(): ... Overflow when unpacking long long"))
        True
    """
    # torch.OutOfMemoryError from torch 2.5; torch.cuda's (the same class since) in 2.4
    gpu = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, (MemoryError, gpu)) or bool(re.search(
        r"can't allocate memory|[Tt]ried to allocate|out of memory|size calculation overflowed"
        r"|Overflow when unpacking", str(err)))


class BadInput(ValueError):
    """A run cannot start: bad settings, missing data, a foreign checkpoint, a busy --out.

    Example:
        >>> run({"model": "test_wt", "dataset": "digits", "resume": True})
        Traceback (most recent call last):
        ...
        wtmodels.train.BadInput: --resume needs --out DIR (the run to continue)
    """


class TrainingDiverged(RuntimeError):
    """Training stopped after ``max_bad_steps`` consecutive non-finite losses.

    ``epoch`` (1-based) and ``skipped_steps`` (the steps of that unfinished epoch skipped for
    non-finite losses, which no ``metrics.jsonl`` row records) say where.

    Example:
        >>> err = TrainingDiverged("5 non-finite losses in a row", epoch=2, skipped_steps=5)
        >>> isinstance(err, RuntimeError), err.epoch, err.skipped_steps
        (True, 2, 5)
    """

    def __init__(self, message: str, epoch: int = 0, skipped_steps: int = 0):
        super().__init__(message)
        self.epoch, self.skipped_steps = epoch, skipped_steps


# ---------------------------------------------------------------------------------------------
# small helpers


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's ``random``.

    Example:
        >>> seed_everything(1); a = torch.rand(1)
        >>> seed_everything(1); bool(a == torch.rand(1))
        True
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global generator
    random.seed(seed)


def jac_reg_step(seed: int, step: int, freq: float) -> bool:
    """Whether training step ``step`` adds the Jacobian term: a share ``freq`` of the steps,
    chosen by a generator seeded from ``(seed, step)`` (no state, so resume-exact).

    Example:
        >>> sum(jac_reg_step(0, s, 0.25) for s in range(1000)) in range(200, 300)
        True
        >>> all(jac_reg_step(0, s, 1.0) for s in range(10))
        True
    """
    return freq >= 1.0 or random.Random(seed * 1_000_003 + step).random() < freq


def _grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` (0-dim; non-finite if any entry is),
    as ``clip_grad_norm_`` computes it but without touching the gradients.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> float(_grad_norm([p]))
        5.0
    """
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))


def _json_safe(value):
    """Floats that JSON cannot hold (NaN, inf) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _identity(cfg: TrainConfig) -> dict:
    """The settings that define what a run computes (runtime fields excluded)."""
    train = {k: v for k, v in cfg.to_dict().items()
             if k not in RUNTIME_FIELDS and k != "model_overrides"}
    return {"train": train, "model_overrides": dict(sorted(cfg.model_overrides.items()))}


def _saved_identity(state: dict, ran_on_cuda: bool = False) -> dict | None:
    """A checkpoint's identity, without fields that have since become runtime fields, and with
    the defaults of settings added since (an older version had no such setting: its run
    computed what the default computes, as ``config.json`` without the key resolves to it;
    before, e.g. ``tf32``, added later, refused every older run as "a different run").

    Except ``tf32`` of a run that ran on CUDA (``ran_on_cuda``): before the setting existed its
    convolutions took torch's default, TF32 on (``cudnn.allow_tf32``), which ``tf32=False``
    turns off (and ``tf32=True`` adds TF32 matmuls): no value computes what it computed, so
    the key stays missing and the run is refused, naming it."""
    identity = state.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("train"), dict):
        return identity
    train = {k: v for k, v in identity["train"].items() if k not in RUNTIME_FIELDS}
    added = {k: v for k, v in _identity(TrainConfig())["train"].items()
             if k not in train and not (k == "tf32" and ran_on_cuda)}
    return {**identity, "train": {**_jsonable(added), **train}}


def _ran_on_cuda(state: dict, saved_config: dict) -> bool:
    """Whether a run ran on CUDA: its first process (``config.json``'s ``env``), a resume
    recorded there, or the process that saved checkpoint ``state`` (its CUDA generators)."""
    envs = [saved_config.get("env")] + [r.get("env") for r in saved_config.get("resumes") or []
                                        if isinstance(r, dict)]
    if any(isinstance(e, dict) and str(e.get("device", "")).startswith("cuda") for e in envs):
        return True
    rngs = state.get("rng")
    return isinstance(rngs, list) and any(isinstance(r, dict) and len(r.get("cuda") or ()) > 0
                                          for r in rngs)


def _jsonable(d: dict) -> dict:
    """Round-trip through JSON so tuples compare equal to lists."""
    return json.loads(json.dumps(d))


# ---------------------------------------------------------------------------------------------
# run directory: fresh / resume decision (before anything is written)


def _read_saved_config(out: Path) -> dict:
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
        if not isinstance(saved, dict) or "train" not in saved:
            raise ValueError("no 'train' section")
        return saved
    except (OSError, ValueError) as err:
        raise BadInput(f"--resume: {out / CONFIG_FILE} is unreadable ({err})") from None


def _saved_device(out: Path, default: str) -> str:
    """The ``device`` setting saved in ``out``'s config.json (``default`` if unreadable: the
    run-directory checks report that). Read before the process context exists, which needs it.
    """
    try:
        device = _read_saved_config(out)["train"].get("device")
    except (BadInput, AttributeError):
        return default
    return device if isinstance(device, str) else default


def _check_same_model_definition(saved_cfg, saved_model_config: dict | None, out: Path) -> None:
    """``BadInput`` if the registry now resolves the run's model to other settings than it
    started with (the code changed): a resume would continue a different model."""
    if not saved_model_config:
        return
    now = dataclasses.asdict(model_registry.get_config(saved_cfg.model,
                                                      **saved_cfg.model_overrides))
    now, then = _jsonable(now), _jsonable(saved_model_config)
    changed = sorted(k for k in set(now) | set(then)
                     if k not in ("num_classes", "in_chans") and now.get(k) != then.get(k))
    if changed:
        raise BadInput(f"--resume: the registered model {saved_cfg.model!r} now differs from "
                       f"the one the run in {out} started with (in: {', '.join(changed)}); "
                       "resume with the code it started with")


def _check_creatable(out: Path) -> None:
    """``BadInput`` if directory ``out`` cannot be made: its nearest existing ancestor is a
    file or not writable (checked before anything is built; nothing is created here)."""
    parent = out.absolute()
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"--out {out} cannot be created: {parent} is not a directory")
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out} cannot be created: {parent} is not writable")


def _resolve_run_dir(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Check ``--out``/``--resume`` against the directory; on resume, the saved settings
    (explicitly given identity settings must match them)."""
    if cfg.out is None:
        if cfg.resume:
            raise BadInput("--resume needs --out DIR (the run to continue)")
        return cfg
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a directory")
    holds_run = any((out / name).exists() for name in (CONFIG_FILE, CHECKPOINT_FILE,
                                                        METRICS_FILE))
    if not cfg.resume:
        if holds_run:
            raise BadInput(f"--out {out} already holds a run; add --resume to continue it or "
                           "choose another --out")
        _check_creatable(out)
        return cfg
    if not (out / CONFIG_FILE).is_file():
        raise BadInput(f"--resume: {out} holds no run to resume (no {CONFIG_FILE})")
    saved = _read_saved_config(out)
    try:
        saved_cfg = resolve_config({**saved["train"],
                                    "model_overrides": saved.get("model_overrides", {})})
    except ValueError as err:
        raise BadInput(f"--resume: {out / CONFIG_FILE} holds bad settings: {err}") from None
    differing = []  # every setting that differs, not just the first: one retry fixes all
    for key in sorted(explicit):
        if key in RUNTIME_FIELDS or key == "model_overrides":
            continue
        if key in train_field_names():
            new, old = getattr(cfg, key), getattr(saved_cfg, key)
        else:
            new = cfg.model_overrides.get(key)
            old = saved_cfg.model_overrides.get(key, saved.get("model_config", {}).get(key))
        if _jsonable({"v": new}) != _jsonable({"v": old}):
            differing.append((key, new, old))
    if len(differing) == 1:
        ((key, new, old),) = differing
        raise BadInput(f"--resume: {key}={new!r} differs from the run in {out} ({old!r}); "
                       "use another --out to change it")
    if differing:
        given = ", ".join(f"{key}={new!r}" for key, new, _ in differing)
        saved_values = ", ".join(f"{key}={old!r}" for key, _, old in differing)
        raise BadInput(f"--resume: {given} differ from the run in {out} ({saved_values}); "
                       "use another --out to change them")
    _check_same_model_definition(saved_cfg, saved.get("model_config"), out)
    # runtime settings: the ones given now, else the saved ones (threads change the numerics)
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS if k in explicit}
    return dataclasses.replace(saved_cfg, **{**runtime, "out": cfg.out, "resume": True})


# ---------------------------------------------------------------------------------------------
# the trainer


def _read(loader):
    """The batches of ``loader``; a failure to read or transform the data (a corrupt image, a
    label out of range, ...) becomes :class:`BadInput` naming it, in one line."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - any failure inside the data pipeline
            lines = [line for line in str(err).strip().splitlines() if line.strip()] or [""]
            first = lines[0]
            if first.startswith("Caught ") and "worker process" in first and len(lines) > 1:
                # a loader worker's error: its first line names only the worker; the last line
                # of the traceback it carries is the error itself ("OSError: <file>: ...")
                last = lines[-1].strip()
                name, _, rest = last.partition(": ")
                first = rest if rest and name.split(".")[-1] == type(err).__name__ else last
            first = first[:300]
            bad = BadInput(f"reading the data failed: {type(err).__name__}: {first}")
            bad.rank_local = True  # this rank's shard alone: the other ranks cannot report it
            raise bad from err
        yield batch


def _donated_buffer_setting():
    """torch's ``_functorch.config.donated_buffer`` (None where this torch has no such flag)."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    return getattr(config, "donated_buffer", None)


def _keep_compiled_backward_buffers(value=False) -> None:
    """Set ``donated_buffer`` (default: off). A compiled backward with donated buffers may run
    once only, but a DEQ's IFT backward solve calls it once per iteration (``retain_graph``):
    with it on, ``--compile`` crashed a DEQ run at its first recompilation."""
    if value is not None and _donated_buffer_setting() is not None:
        torch._functorch.config.donated_buffer = value


class _Trainer:
    """One run: set-up (all checks before any write), the epoch loop, checkpoints, metrics."""

    def __init__(self, cfg: TrainConfig, explicit: set[str]):
        device = cfg.device
        if cfg.resume and cfg.out is not None and "device" not in explicit:
            device = _saved_device(Path(cfg.out), cfg.device)  # the run's own, as threads
        try:
            self.ctx = DistContext.from_env(device)
        except ValueError as err:  # e.g. --device cuda without a GPU
            hint = ""
            if device != cfg.device:  # the resumed run's own setting: say it may be given anew
                hint = (f" (--device {device} is the setting the run in {cfg.out} saved; "
                        "--resume --device cpu continues it on the CPU)")
            bad = BadInput(str(err) + hint)
            bad.rank_local = isinstance(err, BadEnvironment)  # its RANK may not be 0: say it
            raise bad from None
        self._threads = torch.get_num_threads()
        self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        self._donated = _donated_buffer_setting()
        try:
            self._setup(cfg, explicit)
        except BaseException as err:
            if _report_at_once is not None and isinstance(err, BadInput):
                _report_at_once(err)  # before the process group goes (see main)
            self.close()
            raise

    def close(self) -> None:
        """Leave the process as found: torch threads, TF32 and compile flags back, process
        group destroyed."""
        torch.set_num_threads(self._threads)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self._tf32
        _keep_compiled_backward_buffers(self._donated)
        self.ctx.close()

    # -- set-up ------------------------------------------------------------------------------

    def _setup(self, cfg: TrainConfig, explicit: set[str]) -> None:
        ctx = self.ctx
        try:
            verdict = None
            if ctx.is_main:
                try:
                    verdict = ("ok", _resolve_run_dir(cfg, explicit))
                except BadInput as err:
                    verdict = ("error", str(err))
            verdict = ctx.broadcast_object(verdict)
            if verdict[0] == "error":
                raise BadInput(verdict[1])
            cfg = verdict[1]
            if cfg.data_dir is not None:  # config.json must find the data from anywhere: a
                # relative path broke --resume and benchmarks.extrapolate run from another folder
                cfg = dataclasses.replace(
                    cfg, data_dir=os.path.abspath(os.path.expanduser(cfg.data_dir)))
            self.cfg = cfg
            ignored = settings_without_effect(cfg)
            if ignored:
                raise BadInput(f"this run ({cfg.model}) would silently ignore "
                               + ", ".join(f"{name} ({why})" for name, why in ignored.items())
                               + ": remove these settings or choose what reads them")
            self.out = Path(cfg.out) if cfg.out is not None else None
            if cfg.threads:
                torch.set_num_threads(cfg.threads)  # restored by close()
            if ctx.device.type == "cuda":  # restored by close()
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            seed_everything(cfg.seed)
            self._build_data()
            self._build_model()
            self._build_optimisation()
            self.start_epoch, self.global_step, self.consecutive_bad = 0, 0, 0
            self.history: list[dict] = []
            if self.out is not None and cfg.resume and (self.out / CHECKPOINT_FILE).exists():
                self._load(self.out / CHECKPOINT_FILE)
            if self.out is not None and cfg.resume and ctx.is_main:  # it trains again
                (self.out / STOPPED_FILE).unlink(missing_ok=True)
        except BadInput:
            raise
        except ValueError as err:
            raise BadInput(str(err)) from None
        if ctx.rank and self.start_epoch == 0:  # a fresh start (else the checkpoint's RNG)
            # distinct dropout per rank (modulo torch's 2**64 seed range)
            seed_everything((cfg.seed + 7919 * ctx.rank) % 2**64)
        try:  # rank 0 writes; the others must not go on to DDP's collectives if it failed
            ctx.run_on_main(self._write_start_files)
        except MainRankFailed as err:  # rank 0 reports its error (e.g. --out cannot be created)
            raise BadInput(str(err)) from None
        self._wrap_model()

    def _build_data(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        kwargs = dict(data_dir=cfg.data_dir, download=cfg.download, train_size=cfg.train_size,
                      test_size=cfg.test_size, seed=cfg.data_seed, augment=cfg.augment,
                      image_size=cfg.image_size, channels=cfg.synthetic_channels,
                      classes=cfg.synthetic_classes)
        if cfg.download and ctx.world_size > 1 and not ctx.is_main:
            ctx.barrier()  # rank 0 downloads first
        train_ds, test_ds, info = datasets.get_datasets(cfg.dataset, **kwargs)
        if cfg.download and ctx.world_size > 1 and ctx.is_main:
            ctx.barrier()
        self.info = info
        self.train_loader, self.test_loader = datasets.build_loaders(
            train_ds, test_ds, cfg.batch_size, test_batch_size=cfg.test_batch_size,
            num_workers=cfg.num_workers, seed=cfg.seed, rank=ctx.rank,
            world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
        if len(self.train_loader) == 0:
            raise BadInput("the training set is empty")

    def _build_model(self) -> None:
        cfg = self.cfg
        overrides = dict(cfg.model_overrides)
        for key, value in (("num_classes", self.info["num_classes"]),
                           ("in_chans", self.info["in_chans"])):
            if key in overrides and overrides[key] != value:
                raise BadInput(f"{key}={overrides[key]} does not match dataset {cfg.dataset} "
                               f"({value})")
            overrides[key] = value
        self.model_config = model_registry.get_config(cfg.model, **overrides)
        try:
            self.model = model_registry.create_model(cfg.model, **overrides).to(self.ctx.device)
        except (MemoryError, RuntimeError, TypeError) as err:  # OutOfMemoryError: RuntimeError
            if not _out_of_memory(err):
                raise
            raise BadInput(_does_not_fit(cfg.model, self.model_config, err)) from None
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        steps_per_epoch = len(self.train_loader)
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.jac_reg_weight > 0 and cfg.pretrain_steps >= total_steps:  # a DEQ core here
            raise ValueError(  # the Jacobian term is off while the warm-up unrolls
                f"jac_reg_weight={cfg.jac_reg_weight} would never be read: pretrain_steps="
                f"{cfg.pretrain_steps} covers all {total_steps} training steps ({cfg.epochs} "
                f"epochs x {steps_per_epoch}); lower pretrain_steps or drop jac_reg_weight")
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                         cfg.momentum, cfg.nesterov)
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=total_steps,
            warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)), min_lr=cfg.min_lr,
            cosine=cfg.schedule == "cosine")
        fp16 = cfg.amp and cfg.amp_dtype == "float16" and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            saved_config = json.loads((path.parent / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            saved_config = {}
        # tf32 only acts on CUDA: an older CUDA run continued on the CPU takes the default
        theirs = _saved_identity(state, self.ctx.device.type == "cuda" and _ran_on_cuda(
            state, saved_config if isinstance(saved_config, dict) else {}))
        ours = _jsonable(_identity(self.cfg))
        if theirs != ours:
            theirs = theirs or {}
            diff = sorted(k for part in ("train", "model_overrides")
                          for k in set(ours.get(part, {})) | set(theirs.get(part, {}))
                          if ours.get(part, {}).get(k) != theirs.get(part, {}).get(k))
            why = ""
            if "tf32" in diff and isinstance(theirs.get("train"), dict) \
                    and "tf32" not in theirs["train"]:
                why = ("; it was saved before the tf32 setting existed, on CUDA, where its "
                       "convolutions used TF32 (torch's default) and its matmuls did not: "
                       "neither --tf32 nor --no-tf32 computes that; resume it with the code "
                       "it started with")
            raise BadInput(f"checkpoint {path} belongs to a different run (differs in: "
                           f"{', '.join(diff) or 'format'}){why}")
        shapes = {"epoch": int, "global_step": int, "model": dict, "optimizer": dict,
                  "scheduler": dict, "rng": list, "history": list}
        damaged = sorted(k for k, kind in shapes.items()
                         if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool))
        if not damaged and not (state["rng"] and all(isinstance(r, dict) for r in state["rng"])):
            damaged = ["rng"]
        if not damaged and len(state["history"]) < state["epoch"]:  # a metrics row per epoch
            damaged = ["history"]
        if damaged:  # a KeyError / TypeError traceback further down
            raise BadInput(f"checkpoint {path} is damaged: missing or malformed "
                           f"{', '.join(damaged)}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise BadInput(f"checkpoint {path} does not fit this model: {first[:200]}") from None
        if not 0 <= state["epoch"] <= self.cfg.epochs:
            raise BadInput(f"checkpoint {path} is at epoch {state['epoch']}, beyond the run's "
                           f"{self.cfg.epochs} epochs")
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.history = list(state["history"])[: self.start_epoch]
        rngs = state["rng"]  # one set per rank of the run that saved it
        try:
            if self.ctx.rank < len(rngs):
                restore_rng_state(rngs[self.ctx.rank], self.train_loader.generator)
            else:  # resumed on more processes: a new rank must not replay rank 0's dropout (and
                # Hutchinson) draws in lockstep with it, as it did with rank 0's generators
                restore_rng_state(rngs[0], self.train_loader.generator)
                seed_everything((self.cfg.seed + 7919 * self.ctx.rank
                                 + 1_000_003 * self.start_epoch) % 2**64)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise BadInput(f"checkpoint {path} is damaged: its random-number-generator states "
                           f"do not load ({type(err).__name__}: {str(err)[:200]})") from None

    def _write_start_files(self) -> None:
        if self.out is None or not self.ctx.is_main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a path under /proc, a read-only file system
            raise BadInput(f"--out {self.out} cannot be created: {err.strerror or err}") from None
        try:
            self._write_run_files()
        except OSError as err:  # an existing directory that takes no files (read-only, /proc):
            # a PermissionError / FileNotFoundError traceback with exit 1 before
            where = f" ({err.filename})" if err.filename else ""
            raise BadInput(f"--out {self.out} cannot take the run's files: "
                           f"{err.strerror or err}{where}") from None

    def _write_run_files(self) -> None:
        # a kill during an atomic write leaves its temporary file (a checkpoint's size): drop them
        for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, MODEL_INFO_FILE, DONE_FILE,
                     STOPPED_FILE):
            for leftover in self.out.glob(f"{name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        cfg = self.cfg
        if not (self.out / CONFIG_FILE).exists():
            atomic_write_json(self.out / CONFIG_FILE, {
                "train": {k: v for k, v in cfg.to_dict().items() if k != "model_overrides"},
                "model_overrides": dict(sorted(cfg.model_overrides.items())),
                "model_config": dataclasses.asdict(self.model_config),
                "data_info": self.info, "env": self._env()})
        elif cfg.resume and self.start_epoch < cfg.epochs:
            # a resume that trains: `env` describes the first process; this one may run other
            # code, threads or device (which change the numbers): record it too
            try:
                saved = json.loads((self.out / CONFIG_FILE).read_text())
            except (OSError, ValueError):
                saved = None  # checked at start-up: readable
            if isinstance(saved, dict):
                resumes = saved.get("resumes") if isinstance(saved.get("resumes"), list) else []
                saved["resumes"] = [*resumes, {"from_epoch": self.start_epoch,
                                               "env": self._env()}]
                atomic_write_json(self.out / CONFIG_FILE, saved)
        if not (self.out / MODEL_INFO_FILE).exists():
            with torch.random.fork_rng(devices=[]):  # the summary's forward pass draws nothing
                summary = model_registry.model_summary(
                    self.model, input_shape=(self.info["in_chans"], self.info["image_size"],
                                             self.info["image_size"]))
            atomic_write_json(self.out / MODEL_INFO_FILE, summary)
        # metrics.jsonl must agree with the checkpoint: rewrite it from the checkpoint's history
        atomic_write_jsonl(self.out / METRICS_FILE, self.history)

    def _env(self) -> dict:
        return {"git_sha": git_sha(), "torch_version": torch.__version__,
                "python": platform.python_version(), "device": str(self.ctx.device),
                "device_name": (torch.cuda.get_device_name(self.ctx.device)
                                if self.ctx.device.type == "cuda" else platform.processor()
                                or platform.machine()),
                "threads": torch.get_num_threads(), "world_size": self.ctx.world_size,
                # the vector ISA torch's CPU kernels dispatch to (AVX2, AVX512, ...): the
                # same seeded run gives other numbers on another one, training amplifying
                # their rounding differences
                "cpu_isa": cpu_isa()}

    def _wrap_model(self) -> None:
        self.train_model = self.model
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        if self.cfg.compile:
            _keep_compiled_backward_buffers()
            self.train_model = torch.compile(self.train_model)

    # -- the loop ----------------------------------------------------------------------------

    def _autocast(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _batch(self, x, y):
        x = x.to(self.ctx.device, non_blocking=True)  # (B, C, H, W)
        y = y.to(self.ctx.device, non_blocking=True)  # (B,)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite everywhere (a bool tensor: is true), on every rank."""
        finite = bool((value if value.dtype == torch.bool else torch.isfinite(value)).all())
        if self.ctx.world_size > 1:  # every rank must take the same branch
            finite = self.ctx.all_reduce_sum([0.0 if finite else 1.0])[0] == 0.0
        return finite

    def _progress(self, batches, total: int, epoch: int):
        mode = self.cfg.progress
        bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if not (bar and self.ctx.is_main):
            return batches, None
        from tqdm import tqdm

        bar = tqdm(batches, total=total, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        return bar, bar

    def _train_epoch(self, epoch: int) -> tuple[dict, dict]:
        cfg, model = self.cfg, self.model
        self.train_model.train()
        self.train_loader.sampler.set_epoch(epoch)
        meter, jac_meter = EpochMeter(), EpochMeter()
        skipped, seen = 0, 0
        params = [p for p in model.parameters() if p.requires_grad]
        pretrain_on = None
        iterator, bar = self._progress(_read(self.train_loader), len(self.train_loader),
                                       epoch + 1)
        # train size not divisible by the ranks: the sampler repeats a few images to give every
        # rank the same number of steps; they must not count twice (in the gradient as in the
        # metrics), so that N processes train on exactly one process's batches
        world, n_images = self.ctx.world_size, len(self.train_loader.sampler.dataset)
        per_rank = self.train_loader.batch_size
        reset_peak_memory(self.ctx.device)
        start = time.perf_counter()
        for index, (x, y) in enumerate(iterator):
            x, y = self._batch(x, y)
            real = None  # (B,) bool: not a repeat; None when the global batch holds no repeat
            n_global = min(per_rank * world, n_images - index * per_rank * world)
            if n_global != len(y) * world:  # the last global batch, padded
                position = self.ctx.rank + world * (index * per_rank + torch.arange(len(y)))
                real = (position < n_images).to(y.device)
            step = self.global_step
            if cfg.pretrain_steps and pretrain_on != (step < cfg.pretrain_steps):
                pretrain_on = step < cfg.pretrain_steps
                model.set_pretrain(pretrain_on)
            # not during the unrolled warm-up: no DEQ solve there, and its zeros would dilute
            # the logged jac_loss
            use_jac = (cfg.jac_reg_weight > 0 and not pretrain_on
                       and jac_reg_step(cfg.seed, step, cfg.jac_reg_freq))
            if cfg.jac_reg_weight > 0:
                model.set_jac_reg(use_jac)
            with self._autocast():
                logits = self.train_model(x)  # (B, num_classes)
            logits = logits.float()
            if real is None:
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            else:  # DDP averages the ranks' losses: sum / n_global over the real images
                loss = F.cross_entropy(logits, y, reduction="none",
                                       label_smoothing=cfg.label_smoothing)[real].sum() \
                    * (world / n_global)
            jac = model.jac_loss() if use_jac else None
            if jac is not None:
                loss = loss + cfg.jac_reg_weight * jac.float()
            count = len(y) if real is None else int(real.sum())
            seen += count
            # one read of a device flag per step (a synchronisation on GPUs): the loss and the
            # gradient norm are checked together after the backward pass
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # float16: a step whose scaled gradients overflow is
                # skipped (and the scale lowered): counted as skipped like any non-finite step
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                finite = torch.isfinite(loss.detach())
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:
                    norm = _grad_norm(params)
                ok = self._all_finite(finite & torch.isfinite(norm))
                if ok:
                    self.scaler.step(self.optimizer)
                self.scaler.update()  # lowers the scale after an overflow
            else:
                loss.backward()
                finite = torch.isfinite(loss.detach())
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:  # unclipped, a NaN gradient behind a finite loss must still skip
                    norm = _grad_norm(params)
                finite = finite & torch.isfinite(norm)
                ok = self._all_finite(finite)
                if ok:
                    self.optimizer.step()
            self.lr = self.optimizer.param_groups[0]["lr"]
            if ok:
                self.scheduler.step()
            else:  # the schedule advances on skipped steps too (torch warns if none stepped yet)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
            self.global_step += 1
            if not ok:
                skipped += 1
                self.consecutive_bad += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.consecutive_bad >= cfg.max_bad_steps:
                    self._stop_diverged(epoch, skipped)  # raises
                continue
            self.consecutive_bad = 0
            with torch.no_grad():
                if real is not None:
                    plain = F.cross_entropy(logits, y, reduction="none")[real].sum()
                    correct = ((logits.argmax(1) == y) & real).sum()
                else:
                    plain = (F.cross_entropy(logits, y, reduction="sum") if cfg.label_smoothing
                             else loss.detach() * len(y) if jac is None
                             else F.cross_entropy(logits, y, reduction="sum"))
                    correct = (logits.argmax(1) == y).sum()
            meter.update(plain, correct, count, model.core_stats())  # summed on the device
            if jac is not None:
                jac_meter.update(jac.detach() * len(y), 0, len(y))
            if bar is not None and self.global_step % 10 == 0:
                bar.set_postfix(loss=f"{float(plain) / max(count, 1):.4f}")
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.close()
        stats = meter.reduce(self.ctx)
        extra = {"skipped_steps": int(self.ctx.all_reduce_max([float(skipped)])[0]),
                 "seen": self.ctx.all_reduce_sum([float(seen)])[0],
                 "time": self.ctx.all_reduce_max([elapsed])[0]}
        if cfg.jac_reg_weight > 0:
            extra["jac_loss"] = jac_meter.reduce(self.ctx)["loss"]
        return stats, extra

    def _stop_diverged(self, epoch: int, skipped: int) -> None:
        """Raise :class:`TrainingDiverged`; with ``out`` set, first write ``stopped.json``
        (the reason, the epoch, its ``skipped_steps``) for the harness's stability columns."""
        where = (f"the last good checkpoint is {self.out / CHECKPOINT_FILE} (epoch {epoch})"
                 if self.out is not None and epoch > 0 else "no checkpoint had been written yet")
        err = TrainingDiverged(
            f"training stopped: {self.consecutive_bad} consecutive non-finite losses in epoch "
            f"{epoch + 1} (step {self.global_step}); {where}", epoch + 1, skipped)
        if self.out is not None and self.ctx.is_main:
            atomic_write_json(self.out / STOPPED_FILE, {
                "status": "diverged", "reason": str(err), "epoch": epoch + 1,
                "step": self.global_step, "skipped_steps": skipped})
        raise err

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, accuracy and core statistics on this rank's test shard, reduced over ranks."""
        model = self.model
        model.eval()
        if self.cfg.pretrain_steps:
            model.set_pretrain(False)
        if self.cfg.jac_reg_weight > 0:
            model.set_jac_reg(False)
        meter = EpochMeter()
        for x, y in _read(self.test_loader):
            x, y = self._batch(x, y)
            with self._autocast():
                logits = model(x).float()  # (B, num_classes)
            meter.update(F.cross_entropy(logits, y, reduction="sum"),
                         (logits.argmax(1) == y).sum(), len(y), model.core_stats())
        model.train()
        return meter.reduce(self.ctx)

    def _epoch_row(self, epoch: int, train: dict, extra: dict, test: dict,
                   eval_time: float) -> dict:
        row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
               "test_loss": test["loss"], "test_acc": test["acc"],
               "epoch_time_s": extra["time"], "eval_time_s": eval_time,
               "images_per_s": extra["seen"] / extra["time"] if extra["time"] > 0 else None,
               "peak_mem_mb": self.ctx.all_reduce_max([peak_memory_mb(self.ctx.device)])[0],
               "skipped_steps": extra["skipped_steps"], "lr": self.lr, "steps": self.global_step}
        for key, value in test.items():
            if key not in ("loss", "acc", "count"):
                row[key] = value
        for key, value in train.items():
            if key not in ("loss", "acc", "count"):
                row["train_" + key] = value
        for key in test:  # an epoch whose training pass ran no solve (all --pretrain-steps,
            # or every step skipped) has no solver statistics: null, as jac_loss, so that every
            # row of a run has the same keys (a csv.DictWriter on the first row's keys failed)
            if key not in ("loss", "acc", "count"):
                row.setdefault("train_" + key, None)
        if "jac_loss" in extra:
            row["jac_loss"] = extra["jac_loss"]
        return {k: _json_safe(v) for k, v in row.items()}

    def _save(self, epoch_done: int) -> None:
        rngs = self.ctx.gather_objects(capture_rng_state(self.train_loader.generator))
        if self.out is None:
            return
        # rank 0 writes; a failure there (a full disk) stops the other ranks too, quietly
        self.ctx.run_on_main(lambda: self._write_checkpoint(epoch_done, rngs))

    def _write_checkpoint(self, epoch_done: int, rngs: list) -> None:
        save_checkpoint(self.out / CHECKPOINT_FILE, {
            "epoch": epoch_done, "global_step": self.global_step,
            "consecutive_bad": self.consecutive_bad, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs, "history": self.history, "identity": _jsonable(_identity(self.cfg)),
            "world_size": self.ctx.world_size})
        atomic_write_jsonl(self.out / METRICS_FILE, self.history)

    def _print_row(self, row: dict) -> None:
        if self.cfg.progress == "none" or not self.ctx.is_main:
            return
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}"]
        for key, fmt in (("train_loss", ".4f"), ("train_acc", ".4f"), ("test_loss", ".4f"),
                         ("test_acc", ".4f"), ("nstep", ".1f"), ("rel_residual", ".2e"),
                         ("nfe", ".1f"), ("skipped_steps", "d")):
            if row.get(key) is not None and (key != "skipped_steps" or row[key]):
                parts.append(f"{key} {row[key]:{fmt}}")
        parts.append(f"{row['epoch_time_s']:.1f}s")
        if row.get("images_per_s"):
            parts.append(f"{row['images_per_s']:.0f} img/s")
        print("  ".join(parts), flush=True)

    def _finish(self) -> dict:
        best = max(self.history, key=lambda r: r["test_acc"] if r["test_acc"] is not None
                   else -1.0)
        final = {**self.history[-1], "best_test_acc": best["test_acc"],
                 "best_epoch": best["epoch"]}
        if self.out is not None and self.ctx.is_main:
            atomic_write_json(self.out / DONE_FILE, {"epochs": self.cfg.epochs, "final": final})
        return final

    def fit(self) -> dict:
        """Train the remaining epochs (none if the checkpoint holds them all); write done.json;
        return the final epoch's metrics plus the best test accuracy."""
        try:
            if (self.start_epoch >= self.cfg.epochs and self.cfg.progress != "none"
                    and self.ctx.is_main):
                print(f"nothing to train: the checkpoint in {self.out} holds all "
                      f"{self.cfg.epochs} epochs (last epoch's metrics below)", flush=True)
                self._print_row(self.history[-1])
            for epoch in range(self.start_epoch, self.cfg.epochs):
                train, extra = self._train_epoch(epoch)
                start = time.perf_counter()
                test = self.evaluate()
                row = self._epoch_row(epoch, train, extra, test, time.perf_counter() - start)
                self.history.append(row)
                self._save(epoch + 1)
                self._print_row(row)
            return self._finish()
        finally:
            self.close()


def run(config: dict | TrainConfig, *, explicit: set[str] | None = None) -> dict:
    """Train as configured and return the final epoch's metrics (plus ``best_test_acc``).

    Writes the run directory only when ``out`` is set. With ``resume=True`` the run in ``out``
    continues from its checkpoint with its saved settings; settings given here must agree with
    them (``out``, ``resume``, ``data_dir``, ``download``, ``progress``, ``threads``,
    ``device`` and ``num_workers`` may differ; those not given are the saved ones).

    Args:
        config: a flat dict of TrainConfig and ModelConfig settings, or a TrainConfig.
        explicit: the settings the caller chose (default: the dict's keys; every field of a
            TrainConfig); only these are compared with a resumed run's.

    Returns:
        The last ``metrics.jsonl`` row with ``best_test_acc`` and ``best_epoch`` added.

    Raises:
        BadInput: (a ``ValueError``) bad settings, missing data, an ``out`` holding another
            run, nothing to resume, an unreadable or foreign checkpoint. Nothing is written.
        TrainingDiverged: ``max_bad_steps`` consecutive non-finite losses.

    Example:
        >>> m = run({"model": "test_wt", "epochs": 1, "train_size": 64, "test_size": 32,
        ...          "progress": "none"})
        >>> 0.0 <= m["test_acc"] <= 1.0
        True
    """
    try:
        cfg = resolve_config(config)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if cfg.out is not None and str(cfg.out).startswith("~"):  # as data_dir: `out: ~/runs/a`
        # in a config file (no shell to expand it) made a directory named "~" in the cwd
        cfg = dataclasses.replace(cfg, out=os.path.expanduser(cfg.out))
    if explicit is None:
        if isinstance(config, TrainConfig):
            explicit = set(train_field_names()) | set(cfg.model_overrides)
        else:
            explicit = {str(k).replace("-", "_") for k in config if k != "model_overrides"}
            # either spelling (resolve_config takes both): a resume compared the underscored
            # one only, and continued with the run's depth over a given "model-overrides" one
            explicit |= set(config.get("model_overrides", config.get("model-overrides")) or {})
    return _Trainer(cfg, explicit).fit()


def _after_interrupt(out) -> str:
    """What an interrupted run leaves: a checkpoint to ``--resume`` from, start files that
    ``--resume`` starts over from, or nothing yet (the same command again starts the run).

    Example:
        >>> _after_interrupt(None)  # stopped while reading the command line
        'no run files were written yet: the same command again starts the run'
    """
    run_dir = None if out is None else Path(os.path.expanduser(str(out)))
    if run_dir is not None and (run_dir / CHECKPOINT_FILE).is_file():
        return "--resume continues from the last checkpoint"
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        # stopped before the start files (during data loading, model building): --resume
        # refuses a directory without config.json, the same command again starts the run
        return "no run files were written yet: the same command again starts the run"
    return "no checkpoint was written yet: --resume starts the run over"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Example:
        >>> main(["--epochs", "0"])
        2
    """
    global _report_at_once
    argv = sys.argv[1:] if argv is None else argv
    # not int(): a RANK=abc crashed here with a traceback (DistContext reports it in one line)
    is_main = os.environ.get("RANK", "0").strip() in ("", "0")
    settings: dict = {}

    def report(err: Exception) -> None:
        # settings errors arise on every rank alike: rank 0 reports them; a data error arises on
        # the rank whose shard holds the bad file, which must say so (it was lost under torchrun)
        if (is_main or getattr(err, "rank_local", False)) and not getattr(err, "reported", False):
            where = "" if is_main else f"rank {os.environ.get('RANK')}: "
            print(f"wtmodels.train: error: {where}{err}".replace("\n", " "), file=sys.stderr)
            err.reported = True

    # reported where the trainer meets it, before the process group is destroyed: torch 2.4's
    # destroy_process_group on rank 0 waited for the other ranks to exit, and torchrun then
    # stopped rank 0 before its line was printed
    _report_at_once = report
    try:
        settings = parse_settings(argv)
        if "out" not in settings or settings["out"] is None:
            raise UsageError("--out DIR is required")
        run(settings)
    except (UsageError, BadInput) as err:
        report(err)
        return EXIT_BAD_INPUT
    except MainRankFailed:  # a rank > 0 after rank 0's write failed: rank 0 reports it
        return 1
    except TrainingDiverged as err:
        if is_main:
            print(f"wtmodels.train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        if is_main:
            print(f"wtmodels.train: interrupted; {_after_interrupt(settings.get('out'))}",
                  file=sys.stderr)
        return 130
    finally:
        _report_at_once = None
    return 0


if __name__ == "__main__":
    exit_with(main)
