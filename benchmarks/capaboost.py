"""CapaBoost experiment: LoRA vs masked parallel copies at equal trainable parameters.

A weight-tied model is pretrained on one task (classes 0-4 of Fashion-MNIST, or of digits), then
fine-tuned on another (classes 5-9, relabelled 0-4, with a fresh head) by:

==================  ==========================================================================
label               what trains
==================  ==========================================================================
``head only``       the new head (the reference with the fewest parameters)
``LoRA``            the head + rank-r LoRA factors on every convolution (r = 1, 2, 4)
``CapaBoost d=2``   the same parameters, used as 2 copies under distinct masks (density 0.5)
``CapaBoost d=4``   the same parameters, 4 masked copies
``full``            every parameter (the reference with the most)
==================  ==========================================================================

Every fine-tune of a seed starts from the same pretrained model (pretrained once, with
``pretrain_seed``, and cached); the seed sets the head and LoRA initialisation, the masks and
the data order. Each run records test accuracy on the new task, the trainable parameters and the
numerical and effective rank of every layer's update.

Entry points:

- ``python -m benchmarks.capaboost --out DIR [--smoke] [--seeds 0,1,2] [--dataset NAME]``, or
  :func:`run_capaboost` in Python: every run in this process (finished runs are skipped on a
  rerun), then ``DIR/results.csv``, ``DIR/summary.md``, ``DIR/accuracy_vs_params.png`` and
  ``DIR/rank_vs_copies.png``.
- ``python -m benchmarks.run capaboost --out DIR``: the harness lists the runs with
  :func:`sweep` and runs each with :func:`run` in its own process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import wtmodels as wt
from wtmodels.atomic import atomic_torch_save, atomic_write_json, atomic_write_jsonl
from wtmodels.cli import exit_with
from wtmodels.data import check_seed
from wtmodels.metrics import peak_memory_mb
from wtmodels.peft import LoRALayer, add_lora, count_trainable, peft_layers
from wtmodels.peft.wrap import check_copy_args, check_int

METHODS = ("head", "lora", "capaboost", "full")
DATASETS = ("auto", "fashion_mnist", "digits")
TASK_A, TASK_B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)

#: settings shared by every run of the committed experiment (each run's config holds them all)
SETTINGS = {
    "dataset": "auto", "image_size": 14, "model": "wt_s", "width": 16, "depth": 4, "stages": 2,
    "norm_groups": 4, "weight_norm": True, "pretrain_size": 12000, "finetune_size": 2000,
    "test_size": 4000, "pretrain_epochs": 3, "finetune_epochs": 4, "batch_size": 64, "lr": 3e-3,
    "pretrain_seed": 0,
}
#: the smoke size: digits (all ~720 images per task), the tiny test model, a few epochs
SMOKE_SETTINGS = {
    **SETTINGS, "dataset": "digits", "image_size": None, "model": "test_wt", "width": 8,
    "depth": 2, "stages": 1, "pretrain_size": None, "finetune_size": None, "test_size": None,
    "pretrain_epochs": 4, "finetune_epochs": 3,
}
#: with --smoke on another dataset, the sizes left at "all images" become these (seconds, not the
#: minutes 60k Fashion-MNIST images would take)
SMOKE_CAPS = {"pretrain_size": 1000, "finetune_size": 500, "test_size": 1000}
RANKS, SMOKE_RANKS = (1, 2, 4), (1,)
COPIES, DENSITY = (2, 4), 0.5


def label_of(config: dict) -> str:
    """Plot label of a run config.

    Example:
        >>> label_of({"method": "capaboost", "copies": 4})
        'CapaBoost d=4'
    """
    method = config["method"]
    if method == "capaboost":
        return f"CapaBoost d={config['copies']}"
    return {"head": "head only", "lora": "LoRA", "full": "full"}[method]


def sweep(smoke: bool = False) -> list[dict]:
    """The configurations of the experiment (seeds are added by the caller), with a ``label``.

    Example:
        >>> [c["label"] for c in sweep(smoke=True)]
        ['head only', 'full', 'LoRA', 'CapaBoost d=2', 'CapaBoost d=4']
    """
    settings = SMOKE_SETTINGS if smoke else SETTINGS
    configs = [{"method": "head"}, {"method": "full"}]
    for rank in SMOKE_RANKS if smoke else RANKS:
        configs.append({"method": "lora", "rank": rank, "copies": 1, "density": 1.0})
        configs += [{"method": "capaboost", "rank": rank, "copies": d, "density": DENSITY}
                    for d in COPIES]
    return [{**settings, **c, "label": label_of(c)} for c in configs]


# --------------------------------------------------------------------------------------------
# data


def resolve_dataset(name: str) -> str:
    """``"auto"`` -> ``"fashion_mnist"`` when its files are installed, else ``"digits"``.

    Example:
        >>> resolve_dataset("digits")
        'digits'
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if name != "auto":
        return name
    return "fashion_mnist" if _fashion_mnist_dir() is not None else "digits"


def _fashion_mnist_dir() -> str | None:
    """The system folder the data loader reads Fashion-MNIST from (train and test idx files,
    plain or gzipped), or None."""
    from pathlib import Path

    from wtmodels import data

    return next((d for d in data.FASHION_MNIST_SYSTEM_DIRS
                 if data._idx_files(Path(d), True) and data._idx_files(Path(d), False)), None)


def check_installed(dataset: str) -> None:
    """``ValueError`` when ``dataset`` resolves to Fashion-MNIST and its files are missing: the
    experiment reads them from the system folder only (it has no ``--data-dir``).

    Example:
        >>> check_installed("digits")  # bundled with scikit-learn: nothing to install
        >>> check_installed("mnist")
        Traceback (most recent call last):
            ...
        ValueError: unknown dataset 'mnist'; valid datasets: auto, fashion_mnist, digits
    """
    if resolve_dataset(dataset) == "fashion_mnist" and _fashion_mnist_dir() is None:
        from wtmodels import data

        raise ValueError(
            "dataset fashion_mnist: no train and t10k idx files in "
            f"{', '.join(data.FASHION_MNIST_SYSTEM_DIRS)} (the Debian package "
            "dataset-fashion-mnist), the only place this experiment reads them from; valid "
            f"datasets: {', '.join(DATASETS)} (auto falls back to digits)")


@functools.lru_cache(maxsize=4)
def load_tasks(dataset: str, image_size: int | None, pretrain_size: int | None,
               test_size: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images in memory, split into the two tasks (labels of task B shifted to 0-4).

    ``pretrain_size`` / ``test_size`` draw a fixed subset (seed 0) of the whole train / test
    set before the split, so each task gets about half of it.

    Returns:
        ``{"a_train", "a_test", "b_train", "b_test"}`` -> ``(x (N, C, H, W), y (N,))``.

    Example:
        >>> tasks = load_tasks("digits", None, None, None)
        >>> x, y = tasks["b_test"]
        >>> tuple(x.shape[1:]), sorted(y.unique().tolist())
        ((1, 8, 8), [0, 1, 2, 3, 4])
    """
    from wtmodels.data import get_datasets

    train, test, _ = get_datasets(dataset, train_size=pretrain_size, test_size=test_size,
                                  augment=False, image_size=image_size, seed=0)
    out = {}
    for split, ds in (("train", train), ("test", test)):
        xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=1000))
        x, y = torch.cat(xs), torch.cat(ys)  # (N, C, H, W), (N,)
        for task, classes in (("a", TASK_A), ("b", TASK_B)):
            keep = torch.isin(y, torch.tensor(classes))
            out[f"{task}_{split}"] = (x[keep], y[keep] - classes[0])
    return out


# --------------------------------------------------------------------------------------------
# training


def _epoch(model: nn.Module, data, batch_size: int, opt, gen: torch.Generator) -> dict:
    x, y = data
    model.train()
    order = torch.randperm(len(y), generator=gen)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        logits = model(x[idx])  # (B, classes)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
    return {"train_loss": loss_sum / len(y), "train_acc": correct / len(y)}


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 1000) -> dict:
    """Test loss and accuracy of ``model`` on ``(x, y)``.

    Example (a model that always says class 0, right on half the images):
        >>> model = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_(), model.bias.copy_(torch.tensor([1.0, 0.0]))
        >>> m = evaluate(model, (torch.randn(4, 2), torch.tensor([0, 0, 1, 1])))
        >>> m["test_acc"], round(m["test_loss"], 4)  # (log(1 + e^-1) + log(1 + e)) / 2
        (0.5, 0.8133)
    """
    x, y = data
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        loss_sum += F.cross_entropy(logits, y[start:start + batch_size], reduction="sum").item()
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return {"test_loss": loss_sum / len(y), "test_acc": correct / len(y)}


def _fit(model, train, test, epochs, batch_size, lr, seed, log=None) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        row = {"epoch": epoch, **_epoch(model, train, batch_size, opt, gen)}
        row["epoch_time_s"] = time.perf_counter() - start
        row["images_per_s"] = len(train[1]) / row["epoch_time_s"]
        row.update(evaluate(model, test))
        history.append(row)
        if log is not None:
            log(history)
    return history


def _model_overrides(config: dict) -> dict:
    return {k: config[k] for k in ("width", "depth", "stages", "norm_groups", "weight_norm")}


def _pretrain_key(config: dict, dataset: str) -> str:
    fields = ["model", "width", "depth", "stages", "norm_groups", "weight_norm", "image_size",
              "pretrain_size", "test_size", "pretrain_epochs", "batch_size", "lr", "pretrain_seed"]
    blob = json.dumps([dataset] + [config[f] for f in fields])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrained(config: dict, dataset: str, cache_dir: str) -> tuple[dict, dict]:
    """The state dict of the model pretrained on task A (trained once per settings, cached).

    A file lock keeps parallel runs from pretraining twice; the checkpoint is written
    atomically. Returns ``(state_dict, info)`` with the pretrain test accuracy in ``info``.

    Example (a cached checkpoint is loaded, not trained again):
        >>> import tempfile
        >>> cache, config = tempfile.mkdtemp(), sweep(smoke=True)[0]
        >>> path = os.path.join(cache, f"pretrained_{_pretrain_key(config, 'digits')}.pt")
        >>> atomic_torch_save(path, {"state_dict": {"w": torch.ones(2)},
        ...                          "info": {"pretrain_test_acc": 0.9}})
        >>> state, info = pretrained(config, "digits", cache)
        >>> state["w"].tolist(), info["pretrain_test_acc"]
        ([1.0, 1.0], 0.9)
    """
    from benchmarks.results_io import file_lock

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"pretrained_{_pretrain_key(config, dataset)}.pt")
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            tasks = load_tasks(dataset, config["image_size"], config["pretrain_size"],
                               config["test_size"])
            torch.manual_seed(config["pretrain_seed"])
            model = wt.create_model(config["model"], num_classes=len(TASK_A),
                                    in_chans=tasks["a_train"][0].shape[1],
                                    **_model_overrides(config))
            start = time.perf_counter()
            history = _fit(model, tasks["a_train"], tasks["a_test"], config["pretrain_epochs"],
                           config["batch_size"], config["lr"], config["pretrain_seed"])
            info = {"pretrain_test_acc": history[-1]["test_acc"],
                    "pretrain_time_s": time.perf_counter() - start, "dataset": dataset}
            atomic_torch_save(path, {"state_dict": model.state_dict(), "info": info})
        saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["state_dict"], saved["info"]


# --------------------------------------------------------------------------------------------
# one run


def update_ranks(model: nn.Module) -> list[dict]:
    """Numerical rank, effective rank and rank bound of every LoRA layer's update.

    The update ``delta_weight()`` is formed in float64 (a float32 product would show rounding
    noise as extra rank) and flattened to ``(out, in * kh * kw)``;
    the effective rank is ``exp`` of the entropy of its normalised singular values (Roy &
    Vetterli, 2007); the bound is ``min(copies * rank, out, in * kh * kw)`` (``copies`` counted
    as 1 at density 1, where the copies are identical).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> layer = add_lora(net, rank=2, copies=2, density=0.5, targets=nn.Linear)[0]
        >>> _ = nn.init.normal_(layer.lora_B)
        >>> update_ranks(net)[0]["rank"], update_ranks(net)[0]["bound"]
        (4, 4)
    """
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        exact = copy.deepcopy(layer).double()
        delta = exact.delta_weight().detach().flatten(1)  # (out, fan_in)
        s = torch.linalg.svdvals(delta)
        p = s / s.sum() if s.sum() > 0 else s
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        out.append({
            "layer": name, "rank": int(torch.linalg.matrix_rank(delta)),
            "erank": math.exp(entropy) if s.sum() > 0 else 0.0,
            # at density 1 the copies are identical (no masks): d B A has rank <= r
            "bound": min((layer.copies if layer.mask_A is not None else 1) * layer.rank,
                         *delta.shape),
        })
    return out


def check_config(config: dict) -> None:
    """``ValueError`` naming the field for an unknown setting, a bad method, dataset, seed,
    epochs, batch size, rank, copies or density (the harness runs it before any run starts).

    Example:
        >>> config = {**sweep(smoke=True)[0], "seed": 0}
        >>> check_config(config)  # valid: returns None
        >>> check_config({**config, "method": "prune"})
        Traceback (most recent call last):
            ...
        ValueError: method must be one of head, lora, capaboost, full; got 'prune'
    """
    unknown = sorted(set(config) - set(SETTINGS) - _RUN_KEYS)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; valid settings: "
                         f"{', '.join(sorted(set(SETTINGS) | _RUN_KEYS))}")
    if config.get("method") not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got "
                         f"{config.get('method')!r}")
    resolve_dataset(config.get("dataset", "auto"))
    check_seed(config.get("seed", 0))
    for field in ("finetune_epochs", "pretrain_epochs", "batch_size"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
    if config.get("method") in ("lora", "capaboost"):  # the wrappers' own checks
        check_int("rank", config.get("rank"))
        check_copy_args(config.get("copies"), config.get("density"), "random")


def fit_sizes(config: dict, dataset: str) -> dict:
    """``config`` with the sizes digits cannot hold set to None (all images).

    The experiment's sizes are meant for Fashion-MNIST (60000 / 10000 images); digits has 1437
    training and 360 test images in all, so with ``--dataset digits`` (or ``auto`` falling back
    to it) a ``pretrain_size`` / ``test_size`` at or above those means the whole split, as in
    the smoke size. Other datasets and smaller sizes are left as they are.

    Example:
        >>> fit_sizes({"pretrain_size": 12000, "test_size": 200}, "digits")
        {'pretrain_size': None, 'test_size': 200}
    """
    if dataset != "digits":
        return config
    from wtmodels.data import get_datasets

    train, test, _ = get_datasets("digits", augment=False)
    limits = {"pretrain_size": len(train), "test_size": len(test)}
    return {**config, **{k: None for k, n in limits.items()
                         if config.get(k) is not None and config[k] >= n}}


#: keys of a run's config besides SETTINGS (the method's own and the harness's)
_RUN_KEYS = {"method", "rank", "copies", "density", "seed", "cache_dir", "label"}


def run(config: dict, out_dir: str) -> dict:
    """One fine-tune of the experiment (the harness's custom runner); returns its metrics.

    Writes ``out_dir/metrics.jsonl`` (one row per epoch), ``config.json``, ``update_ranks.json``
    (LoRA runs) and returns the final metrics (the harness stores them as ``done.json``).

    Args:
        config: one entry of :func:`sweep` plus ``seed`` (and optionally ``cache_dir``, where
            the pretrained model is kept; default ``<out_dir>/../_pretrained``).
        out_dir: the run directory.

    Returns:
        Final metrics: ``test_acc``, ``best_test_acc``, ``train_acc``, losses, ``params``
        (trainable), ``total_params``, ``update_rank`` / ``update_erank`` / ``rank_bound``
        (means over layers), ``pretrain_test_acc``, timings, provenance.

    Example (a training run takes seconds; a bad config is refused before any work):
        >>> import tempfile
        >>> run({**sweep(smoke=True)[0], "seed": 0, "batch_size": 0}, tempfile.mkdtemp())
        Traceback (most recent call last):
            ...
        ValueError: batch_size must be an integer >= 1, got 0
    """
    check_config(config)
    check_installed(config["dataset"])
    dataset = resolve_dataset(config["dataset"])
    config = fit_sizes(config, dataset)
    cache_dir = config.get("cache_dir") or os.path.join(
        os.path.dirname(os.path.abspath(out_dir)), "_pretrained")
    os.makedirs(out_dir, exist_ok=True)
    state, info = pretrained(config, dataset, cache_dir)
    tasks = load_tasks(dataset, config["image_size"], config["pretrain_size"],
                       config["test_size"])
    train = tasks["b_train"]
    if config["finetune_size"] is not None and config["finetune_size"] < len(train[1]):
        pick = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(1))
        pick = pick[:config["finetune_size"]]
        train = (train[0][pick], train[1][pick])

    seed = int(config.get("seed", 0))
    model = wt.create_model(config["model"], num_classes=len(TASK_A),
                            in_chans=train[0].shape[1], **_model_overrides(config))
    model.load_state_dict(state)
    torch.manual_seed(seed)
    model.head.reset_parameters()  # a fresh head for the new task
    method = config["method"]
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    elif method in ("lora", "capaboost"):
        add_lora(model, rank=config["rank"], copies=config["copies"],
                 density=config["density"], seed=seed, train_head=True)
    atomic_write_json(os.path.join(out_dir, "config.json"), {**config, "dataset": dataset})

    start = time.perf_counter()
    history = _fit(model, train, tasks["b_test"], config["finetune_epochs"],
                   config["batch_size"], config["lr"], seed,
                   log=lambda h: atomic_write_jsonl(os.path.join(out_dir, "metrics.jsonl"), h))
    train_time = time.perf_counter() - start
    ranks = update_ranks(model)
    if ranks:
        atomic_write_json(os.path.join(out_dir, "update_ranks.json"), ranks)
    last = history[-1]
    from benchmarks.provenance import describe_machine

    machine = describe_machine()
    return {
        **last,
        "best_test_acc": max(h["test_acc"] for h in history),
        "epoch_time_s": statistics.median(h["epoch_time_s"] for h in history),
        "images_per_s": statistics.median(h["images_per_s"] for h in history),
        "train_time_s": train_time,
        "params": count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "lora_layers": len(peft_layers(model)),
        "update_rank": statistics.mean(r["rank"] for r in ranks) if ranks else None,
        "update_erank": statistics.mean(r["erank"] for r in ranks) if ranks else None,
        "rank_bound": statistics.mean(r["bound"] for r in ranks) if ranks else None,
        "pretrain_test_acc": info["pretrain_test_acc"],
        "dataset": dataset, "finetune_images": len(train[1]),
        "test_images": len(tasks["b_test"][1]),
        "peak_mem_mb": peak_memory_mb(torch.device("cpu")),
        "threads": torch.get_num_threads(), "device": "cpu", "git_sha": machine["git_sha"],
        "torch_version": machine["torch_version"], "date": machine["date"],
    }


# --------------------------------------------------------------------------------------------
# the whole experiment in one process

#: results.csv columns, in this order (DESIGN.md's list first where it applies)
COLUMNS = (
    "run_id", "label", "config_id", "method", "rank", "copies", "density", "seed", "model",
    "dataset", "depth", "width", "mask_k", "mask_density", "test_acc", "best_test_acc",
    "train_acc", "train_loss", "test_loss", "params", "total_params", "update_rank",
    "update_erank", "rank_bound", "pretrain_test_acc", "epoch_time_s", "train_time_s",
    "images_per_s", "peak_mem_mb", "finetune_images", "test_images", "git_sha",
    "torch_version", "device", "threads", "date",
)


def experiment_configs(smoke: bool = False, seeds=(0, 1, 2), **overrides
                       ) -> list[tuple[str, dict]]:
    """``(label, config)`` of every run of the experiment, validated (``ValueError`` on a bad
    seed list or setting).

    With ``smoke`` on a dataset other than digits, sizes left at "all images" are capped
    (:data:`SMOKE_CAPS`), so a smoke run stays a matter of seconds.

    Example:
        >>> runs = experiment_configs(smoke=True, seeds=(0,), dataset="fashion_mnist")
        >>> runs[0][1]["pretrain_size"], len(runs)
        (1000, 5)
    """
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; valid settings: {', '.join(SETTINGS)}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one")
    seeds = [check_seed(s) for s in seeds]  # torch.manual_seed's range
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (a repeated seed would count one run twice in "
                         f"the means and wins), got {seeds!r}")
    configs = []
    for seed in seeds:
        for entry in sweep(smoke):
            label = entry.pop("label")
            config = {**entry, **overrides, "seed": seed}
            if smoke and resolve_dataset(config["dataset"]) != "digits":
                config.update({k: v for k, v in SMOKE_CAPS.items() if config[k] is None})
            check_config(config)
            configs.append((label, config))
    return configs


def run_capaboost(out_dir: str, smoke: bool = False, seeds=(0, 1, 2), threads: int | None = 1,
                  **overrides) -> list[dict]:
    """Run every configuration of :func:`sweep` for every seed, then tabulate and plot.

    Runs go to ``out_dir/runs/<run_id>`` (a run with ``done.json`` is not run again), the
    pretrained model to ``out_dir/runs/_pretrained``; ``results.csv`` is rewritten atomically after
    every run, the plots and ``summary.md`` at the end.

    Args:
        out_dir: the experiment directory.
        smoke: the tiny size (digits, ``test_wt``, a few epochs: seconds).
        seeds: fine-tuning seeds.
        threads: torch intra-op threads (None: leave torch's setting).
        **overrides: replace settings of every run (e.g. ``dataset="digits"``).

    Returns:
        The rows of ``results.csv``.

    Example (``run_capaboost(out, smoke=True, seeds=(0,))`` takes seconds; a bad seed list is
    refused before any run):
        >>> import tempfile
        >>> run_capaboost(tempfile.mkdtemp(), smoke=True, seeds=())
        Traceback (most recent call last):
            ...
        ValueError: seeds: give at least one
    """
    from benchmarks.presets import config_id_for, run_id_for
    from benchmarks.results_io import write_rows

    configs = experiment_configs(smoke, seeds, **overrides)
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for label, config in configs:
        run_id = run_id_for(label, config)
        run_dir = os.path.join(out_dir, "runs", run_id)
        done = os.path.join(run_dir, "done.json")
        if os.path.exists(done):
            with open(done) as f:
                metrics = json.load(f)
        else:
            metrics = run(config, run_dir)  # pretrained model cached in out_dir/runs/_pretrained
            atomic_write_json(done, metrics)
        rows.append({**config, **metrics, "run_id": run_id, "label": label,
                     "config_id": config_id_for(label, config), "mask_k": 0,
                     "mask_density": None, "copies": config.get("copies"),
                     "density": config.get("density"), "rank": config.get("rank")})
        write_rows(os.path.join(out_dir, "results.csv"), rows, list(COLUMNS))
    plot_results(rows, out_dir)
    write_summary(rows, out_dir)
    return rows


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r.get("rank")), []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LABEL_ORDER = ("head only", "LoRA", "CapaBoost d=2", "CapaBoost d=4", "full")
#: colour-blind-safe colours (Okabe & Ito) and markers, the same in both figures
COLOURS = {"head only": "#999999", "LoRA": "#0072B2", "CapaBoost d=2": "#E69F00",
           "CapaBoost d=4": "#CC79A7", "full": "black"}
MARKERS = {"head only": "v", "LoRA": "o", "CapaBoost d=2": "s", "CapaBoost d=4": "^",
           "full": "D"}


def paired_differences(rows: list[dict]) -> dict[tuple[str, int], list[float]]:
    """Accuracy (points) of each CapaBoost run minus LoRA's at the same rank and seed.

    Example:
        >>> rows = [{"label": "LoRA", "rank": 2, "seed": 0, "test_acc": 0.80},
        ...         {"label": "CapaBoost d=4", "rank": 2, "seed": 0, "test_acc": 0.81}]
        >>> {k: [round(x, 6) for x in v] for k, v in paired_differences(rows).items()}
        {('CapaBoost d=4', 2): [1.0]}
    """
    lora = {(r["rank"], r["seed"]): r["test_acc"] for r in rows if r["label"] == "LoRA"}
    out: dict[tuple[str, int], list[float]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if r["label"].startswith("CapaBoost") and (r["rank"], r["seed"]) in lora:
            diff = 100 * (r["test_acc"] - lora[(r["rank"], r["seed"])])
            out.setdefault((r["label"], r["rank"]), []).append(diff)
    return out


def _reference(groups, label: str) -> tuple[float, int] | None:
    runs = next((v for k, v in groups.items() if k[0] == label), None)
    if not runs:
        return None
    return statistics.mean(100 * r["test_acc"] for r in runs), runs[0]["params"]


def plot_results(rows: list[dict], out_dir: str) -> list[str]:
    """``accuracy_vs_params.png`` and ``rank_vs_copies.png`` from the result rows, each with a
    vector PDF beside it (:func:`benchmarks.plot.save_figure`); returns the PNG paths.

    The first has two panels: accuracy vs trainable parameters (mean ± one sample standard
    deviation over seeds; full fine-tuning as a reference line, head only named in the title)
    and the paired difference to LoRA per rank.
    """
    import matplotlib

    from benchmarks.plot import STYLE

    with matplotlib.rc_context(STYLE):  # the harness's figures' fonts, sizes and PDF fonts
        return _plot_results(rows, out_dir)


def _plot_results(rows: list[dict], out_dir: str) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from benchmarks.plot import DATASET_NAMES, _compact_log_x, save_figure

    groups = _groups(rows)
    paths = []
    fig = Figure(figsize=(7.2, 3.3), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=(1.35, 1))
    nudge = {"LoRA": 0.94, "CapaBoost d=2": 1.0, "CapaBoost d=4": 1.06}
    for label in ("LoRA", "CapaBoost d=2", "CapaBoost d=4"):
        keys = sorted(k for k in groups if k[0] == label)
        if not keys:
            continue
        stats = [_mean_std([100 * r["test_acc"] for r in groups[k]]) for k in keys]
        xs = [groups[k][0]["params"] * nudge[label] for k in keys]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[e for _, e in stats],
                    marker=MARKERS[label], elinewidth=0.9, color=COLOURS[label], label=label)
        if label == "LoRA":
            for x, (m, _), key in zip(xs, stats, keys):
                ax.annotate(f"r={key[1]}", (x, m), textcoords="offset points", xytext=(-6, 6),
                            fontsize=7, color=COLOURS[label], ha="right")
    notes = []
    for label, style in (("full", "--"), ("head only", ":")):
        ref = _reference(groups, label)
        if ref is not None:
            notes.append(f"{label}: {ref[0]:.1f}% ({ref[1]} params)")
            if label == "full":
                ax.axhline(ref[0], ls=style, color=COLOURS[label], lw=1,
                           label=f"full fine-tune ({ref[1]} params)")
    ax.margins(x=0.1)
    _compact_log_x(ax)  # 2k 3k 5k, not overlapping 2 × 10^3 labels
    ax.set_xlabel("trainable parameters (log scale;\nLoRA and CapaBoost equal at each r)")
    ax.set_ylabel("test accuracy on the new task (%)")
    seeds = len({r["seed"] for r in rows})
    spread = (f"mean ± 1 sample std (n − 1) over {seeds} seeds" if seeds > 1
              else "1 seed (no std)")
    dataset = DATASET_NAMES.get(rows[0]["dataset"], rows[0]["dataset"])
    fig.suptitle(f"{dataset}: pretrained on classes 0–4, fine-tuned on 5–9; {spread}")
    ax.set_title("\n".join(notes))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")

    diffs = paired_differences(rows)
    ranks = sorted({k[1] for k in diffs})
    offsets = {"CapaBoost d=2": -0.12, "CapaBoost d=4": 0.12}
    for label in ("CapaBoost d=2", "CapaBoost d=4"):
        for i, rank in enumerate(ranks):
            values = diffs.get((label, rank), [])
            if not values:
                continue
            x = i + offsets[label]
            bx.plot([x] * len(values), values, MARKERS[label], color=COLOURS[label], alpha=0.55,
                    ms=3.5, mew=0)
            bx.plot([x - 0.08, x + 0.08], [statistics.mean(values)] * 2, "-",
                    color=COLOURS[label], lw=2.5, label=label if i == 0 else None)
    bx.axhline(0.0, color=COLOURS["LoRA"], lw=1, label="LoRA (zero difference)")
    bx.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks])
    bx.set_xlabel("LoRA rank r")
    bx.set_ylabel("accuracy minus LoRA's at the same\nrank and seed (percentage points)")
    bx.set_title("Paired difference to LoRA\n(dots: seeds, bars: mean)")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(loc="best")
    paths.append(save_figure(fig, os.path.join(out_dir, "accuracy_vs_params.png")))

    fig = Figure(figsize=(4.2, 3.2), layout="constrained")
    ax = fig.subplots()
    ranked = [r for r in rows if r.get("update_rank") is not None]
    copies = sorted({r["copies"] for r in ranked})
    cmap = colormaps["viridis"]
    lora_ranks = sorted({r["rank"] for r in ranked})
    for i, rank in enumerate(lora_ranks):
        colour = cmap(i / max(1, len(lora_ranks) - 1) * 0.85)
        by_d = {d: [r for r in ranked if r["rank"] == rank and r["copies"] == d] for d in copies}
        ds = [d for d in copies if by_d[d]]

        def mean(key, by_d=by_d, ds=ds):
            return [statistics.mean(r[key] for r in by_d[d]) for d in ds]

        ax.plot(ds, mean("rank_bound"), "x:", color="0.45", ms=7, mew=1.2,
                label="bound min(d r, out, in k k)" if i == 0 else None)
        ax.plot(ds, mean("update_rank"), "o-", color=colour, label=f"r={rank}: rank")
        ax.plot(ds, mean("update_erank"), "^--", color=colour, label=f"r={rank}: effective rank")
    ax.set_xscale("log", base=2)
    ax.set_xticks(copies, [str(d) for d in copies])
    ax.set_xlabel("copies d (density 0.5 for d > 1; d = 1 is plain LoRA)")
    ax.set_ylabel("per-layer rank of the trained update\n(mean over layers and seeds)")
    ax.set_title("Rank of the update vs copies\nat equal trainable parameters")
    ax.grid(alpha=0.3)
    ax.minorticks_off()
    fig.legend(loc="outside lower center", ncol=2)
    paths.append(save_figure(fig, os.path.join(out_dir, "rank_vs_copies.png")))
    return paths


def write_summary(rows: list[dict], out_dir: str) -> str:
    """``summary.md``: accuracy, parameters, update rank and time per configuration.

    Example (one seed of LoRA and of CapaBoost d=2 at rank 1):
        >>> import tempfile
        >>> common = {"dataset": "digits", "model": "test_wt", "width": 8, "depth": 2,
        ...           "stages": 1, "pretrain_test_acc": 0.95, "finetune_images": 716,
        ...           "finetune_epochs": 3, "lr": 3e-3, "test_images": 180, "git_sha": "abc",
        ...           "torch_version": "2.4", "threads": 1, "date": "2024-01-01", "seed": 0,
        ...           "rank": 1, "params": 500, "train_time_s": 1.0}
        >>> rows = [{**common, "label": "LoRA", "test_acc": 0.80, "update_rank": 1,
        ...          "update_erank": 1.0},
        ...         {**common, "label": "CapaBoost d=2", "test_acc": 0.85, "update_rank": 2,
        ...          "update_erank": 1.5}]
        >>> print(write_summary(rows, tempfile.mkdtemp()).splitlines()[-1])
        | CapaBoost d=2 | 1 | 500 | 85.00 | +5.00 (1/1) | 2.0 | 1.50 | 1.0 |
    """
    from wtmodels.atomic import atomic_write_text

    groups = _groups(rows)
    first = rows[0]
    lines = [
        "# CapaBoost: LoRA vs masked parallel copies (`python -m benchmarks.capaboost`)", "",
        f"{first['dataset']}: pretrain {first['model']} (width {first['width']}, depth "
        f"{first['depth']}, {first['stages']} stages) on classes 0-4 (test acc "
        f"{100 * first['pretrain_test_acc']:.1f}%), fine-tune on classes 5-9 "
        f"({first['finetune_images']} images, {first['finetune_epochs']} epochs, Adam lr "
        f"{first['lr']}); {first['test_images']} test images; seeds "
        f"{sorted({r['seed'] for r in rows})}. git {first['git_sha']}, torch "
        f"{first['torch_version']}, cpu, {first['threads']} thread(s), {first['date']}.", "",
        "| label | r | trainable params | test acc % (mean +- std) | vs LoRA, paired by seed "
        "(points: mean, wins) | update rank | effective rank | fine-tune s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {label: i for i, label in enumerate(LABEL_ORDER)}
    diffs = paired_differences(rows)
    for key in sorted(groups, key=lambda k: (k[1] or 0, order.get(k[0], 99))):
        runs = groups[key]
        acc, err = _mean_std([100 * r["test_acc"] for r in runs])
        rank = "" if runs[0].get("update_rank") is None else \
            f"{statistics.mean(r['update_rank'] for r in runs):.1f}"
        erank = "" if runs[0].get("update_erank") is None else \
            f"{statistics.mean(r['update_erank'] for r in runs):.2f}"
        diff = diffs.get(key)
        paired = "" if not diff else \
            f"{statistics.mean(diff):+.2f} ({sum(d > 0 for d in diff)}/{len(diff)})"
        lines.append(
            f"| {key[0]} | {key[1] or ''} | {runs[0]['params']} | {acc:.2f}"
            # one seed has no sample std (n - 1): no "+- 0.00", as the harness's summaries
            f"{f' +- {err:.2f}' if len(runs) > 1 else ''} | "
            f"{paired} | {rank} | {erank} | "
            f"{statistics.median(r['train_time_s'] for r in runs):.1f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "summary.md"), text)
    return text


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as err:
        raise ValueError(f"seeds: expected integers >= 0 like 0,1,2, got {text!r}") from err
    return seeds


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.capaboost --out DIR [--smoke]``; returns the exit status.

    Example (bad arguments: exit status 2, one line on stderr, nothing created):
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "capaboost")
        >>> main(["--out", out, "--smoke", "--threads", "0"]), os.path.exists(out)
        (2, False)
    """
    from benchmarks.provenance import make_out_dir, threads_error
    from wtmodels.cli import OneLineParser, UsageError

    parser = OneLineParser(prog="python -m benchmarks.capaboost", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="experiment directory")
    parser.add_argument("--smoke", action="store_true", help="tiny size (seconds)")
    parser.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds "
                        "(default 0,1,2; smoke: 0)")
    parser.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    try:
        args = parser.parse_args(argv)
        seeds = (_seeds(args.seeds) if args.seeds is not None
                 else (0,) if args.smoke else (0, 1, 2))
        if message := threads_error(args.threads):  # --threads 1000000 was a segfault
            raise ValueError(message)
        overrides = {} if args.dataset is None else {"dataset": args.dataset}
        configs = experiment_configs(args.smoke, seeds, **overrides)  # before any folder
        for dataset in {config["dataset"] for _, config in configs}:
            check_installed(dataset)
        try:  # '~' expanded, writable, before any run
            args.out = str(make_out_dir(args.out))
        except OSError as err:
            raise ValueError(str(err)) from None
        rows = run_capaboost(args.out, smoke=args.smoke, seeds=seeds, threads=args.threads,
                             **overrides)
    except (UsageError, ValueError) as err:
        print(f"python -m benchmarks.capaboost: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a 70-line traceback and death by SIGINT before
        print(INTERRUPTED, file=sys.stderr)
        return 130
    try:
        print(write_summary(rows, args.out), end="")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0


INTERRUPTED = ("python -m benchmarks.capaboost: interrupted; rerun the same command to finish "
               "(finished runs are kept)")


if __name__ == "__main__":
    exit_with(main)
