"""Sweep presets: Python configs that list the runs of an experiment, each with a smoke size.

A preset is a function ``build(smoke: bool) -> list[Variant]`` registered with :func:`preset`.
A :class:`Variant` is a plot label plus the arguments of one training run (``model``,
``dataset``, ``epochs`` and any ``TrainConfig`` / ``ModelConfig`` field of ``python -m
wtmodels.train``). :func:`build_runs` crosses the variants with the seeds and gives every run a
stable ``run_id`` (a readable prefix and a hash of its arguments), so a rerun of the same sweep
finds its finished runs again. ``smoke=True`` keeps every variant's label and varied fields but
shrinks the models, data and epochs so that the tests can run the whole preset in seconds.

A preset can hand its runs to another function than the training CLI: ``runner="module:function"``
names ``function(config: dict, out_dir: str) -> dict`` (called in a fresh process by
:mod:`benchmarks.custom_runner`), and ``source="module:function"`` names the
``function(smoke: bool) -> list[dict]`` that lists its runs (each dict a config, with an optional
``"label"`` key). The ``capaboost`` preset is defined this way by ``benchmarks/capaboost.py``.

Your own sweep, without editing the library: in a module of your own (on the current directory
or ``PYTHONPATH``), decorate its build function with :func:`preset` exactly as the presets below
are, then name it ``MODULE:NAME`` (``NAME`` is the name given to ``@preset``) on the command line.
For example, this file saved as ``my_sweeps.py``::

    from benchmarks.presets import Variant, preset

    DATA = {"dataset": "digits", "optimizer": "adamw", "lr": 1e-2, "batch_size": 64}


    @preset("ablation", "my ablation: WT with and without distinct masks at depths 2 and 4",
            seeds=(0, 1))
    def ablation(smoke: bool) -> list[Variant]:
        model, width = ("test_wt", 8) if smoke else ("wt_s", 32)
        size = {"train_size": 64, "test_size": 32, "epochs": 1} if smoke else {"epochs": 10}
        return [Variant(label, {"model": model, "depth": d, "width": width, **extra,
                                **DATA, **size})
                for d in (2, 4)
                for label, extra in (("WT", {}), ("WT + masks", {"mask_k": d}))]

runs with ``python -m benchmarks.run my_sweeps:ablation --out results/ablation`` (and
``--smoke``, ``--dry-run``, ``--seeds``, ``--set``, ``--only``, ``--jobs``, reruns into the same
directory, plots and summary, ``runner=...``, like a built-in preset). The harness imports the
module; the runs themselves (``python -m wtmodels.train`` processes) do not need it. A user
preset may not take a built-in preset's name, and is listed by neither :func:`list_presets` nor
``--help``. A module, name or build function that is not right is a ValueError (on the command
line: one line on stderr, exit status 2, nothing written).

Example:
    >>> runs = build_runs("quick", smoke=True, seeds=[0])
    >>> sorted({r.label for r in runs}) == sorted(LABELS_QUICK)
    True
    >>> runs[0].run_id == build_runs("quick", smoke=True, seeds=[0])[0].run_id
    True
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wtmodels.train_config import (
    TrainConfig,
    field_type,
    model_config_class,
    model_field_names,
    resolve_config,
    settings_without_effect,
    train_field_names,
    unwrap_optional,
)

# ---------------------------------------------------------------------------------------------
# the vocabulary the presets use (model names from wtmodels.models' registry)

#: model name per core at each size; ``test`` is the tiny family the smoke sizes use
MODELS = {
    "test": {"unrolled": "test_wt", "deq": "test_deq", "ode": "test_ode", "untied": "test_untied"},
    "s": {"unrolled": "wt_s", "deq": "deq_s", "ode": "ode_s", "untied": "untied_s"},
    "m": {"unrolled": "wt_m", "deq": "deq_m", "ode": "ode_m", "untied": "untied_m"},
}

#: plot labels shared by the presets (the plots colour by label)
WT, WT_MASKS, WT_SHARED, UNTIED, DEQ, ODE = (
    "WT", "WT + distinct masks", "WT + shared mask", "untied", "DEQ", "ODE")
LABELS_QUICK = (WT, WT_MASKS, UNTIED, DEQ)

#: smoke-size data: a few dozen images, so a smoke run takes about a second after start-up
SMOKE_DATA = {"train_size": 64, "test_size": 32, "epochs": 1, "batch_size": 32}

#: the optimisation of every preset, pinned so that results do not move with library defaults
OPTIM = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.05, "schedule": "cosine",
         "warmup_epochs": 0.5, "grad_clip": 1.0}


@dataclass(frozen=True)
class Variant:
    """One configuration of a sweep before seeds are applied.

    Args:
        label: the name the plots and tables group it under (e.g. ``"WT + distinct masks"``).
        config: arguments of one run (``model``, ``dataset``, ``epochs``, and config fields).

    Example:
        >>> Variant("WT", {"model": "wt_s", "depth": 4}).config["depth"]
        4
    """

    label: str
    config: dict


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a variant with its seed and a stable id.

    Args:
        run_id: stable identifier (also the run directory's name).
        label: plot / table group.
        config: full argument dict, ``seed`` included.
        runner: ``"module:function"`` of a custom runner, or None for ``python -m wtmodels.train``.

    Example:
        >>> spec = build_runs("quick", smoke=True, seeds=[1])[0]
        >>> spec.config["seed"], spec.runner is None
        (1, True)
    """

    run_id: str
    label: str
    config: dict
    runner: str | None = None

    def to_json(self) -> dict:
        """Plain-dict form (saved as ``spec.json`` in the run directory).

        Example:
            >>> RunSpec("a", "WT", {"seed": 0}).to_json()["run_id"]
            'a'
        """
        return {"run_id": self.run_id, "label": self.label, "config": self.config,
                "runner": self.runner}


@dataclass(frozen=True)
class Preset:
    """A registered sweep.

    Args:
        name: the name given on the command line.
        description: one line for ``--help`` and the dry-run listing.
        build: ``build(smoke) -> list[Variant]`` (None when ``source`` lists the runs).
        seeds: default seeds.
        extrapolate: test-time depth factors for the post-hoc depth extrapolation of unrolled
            and DEQ runs (empty: none).
        jobs: default number of runs at once.
        threads: default torch threads per run.
        runner: ``"module:function"`` custom runner, or None for the training CLI.
        source: ``"module:function"`` that lists the runs, for presets defined elsewhere.

    Example:
        >>> get_preset("quick").seeds
        (0, 1)
    """

    name: str
    description: str
    build: Callable[[bool], list[Variant]] | None
    seeds: tuple[int, ...] = (0,)
    extrapolate: tuple[float, ...] = ()
    jobs: int = 1
    threads: int = 1
    runner: str | None = None
    source: str | None = None
    smoke_seeds: tuple[int, ...] = field(default=(0,))


_PRESETS: dict[str, Preset] = {}  # the built-in presets (those this module defines)
_USER_PRESETS: dict[str, Preset] = {}  # "module:name" -> a preset defined in a user's module

#: the options ``@preset`` takes (the :class:`Preset` fields after ``build``)
PRESET_OPTIONS = ("seeds", "smoke_seeds", "extrapolate", "jobs", "threads", "runner")


def preset(name: str, description: str, **options):
    """Register ``build(smoke) -> list[Variant]`` as the preset ``name``.

    In this module it is a built-in preset; applied in any other module ``mod``, it defines
    the preset ``"mod:name"`` that :func:`get_preset` and ``python -m benchmarks.run mod:name``
    find after importing ``mod`` (see the module docstring).

    Args:
        name: the preset's name.
        description: one line for the dry-run listing.
        **options: :data:`PRESET_OPTIONS` (``seeds=(0, 1)``, ``jobs=2``, ``runner="m:f"`` ...).

    Raises:
        ValueError: an unknown option, or a user preset named like a built-in one.

    Example:
        >>> @preset("demo_once", "a one-run demo")
        ... def _demo(smoke):
        ...     return [Variant("WT", {"model": "test_wt", "dataset": "digits", "epochs": 1})]
        >>> len(build_runs("demo_once", smoke=True))
        1
    """
    module = sys._getframe(1).f_globals.get("__name__", "")  # the module applying @preset
    unknown = sorted(set(options) - set(PRESET_OPTIONS))
    if unknown:
        raise ValueError(f"preset {name!r}: unknown option {unknown[0]!r}; valid: "
                         f"{', '.join(PRESET_OPTIONS)}")
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"preset: name {name!r} must be a non-empty string without ':'")
    if module != __name__ and name in _PRESETS:
        raise ValueError(f"preset {name!r} in {module}: {name!r} is a built-in preset; give "
                         f"yours another name (built-in: {', '.join(list_presets())})")

    def register(build: Callable[[bool], list[Variant]]):
        if not callable(build):
            raise ValueError(f"preset {name!r}: @preset decorates a function build(smoke) -> "
                             f"list[Variant], not a {type(build).__name__}")
        spec = Preset(name, description, build, **options)
        table, key = (_PRESETS, name) if module == __name__ else (_USER_PRESETS,
                                                                 f"{module}:{name}")
        # a second @preset(name) in one module silently replaced the first; the same
        # function defined again (the module reloaded) is still one preset
        old = getattr(table[key].build, "__qualname__", None) if key in table else None
        if old is not None and old != getattr(build, "__qualname__", None):
            raise ValueError(f"preset {name!r} is defined twice in {module} (by {old} and "
                             f"{getattr(build, '__qualname__', build)}); give each its own "
                             "name")
        table[key] = spec
        return build

    return register


def list_presets() -> list[str]:
    """Names of the built-in presets (a user's ``module:name`` presets are not listed).

    Example:
        >>> {"quick", "fashion", "cifar10", "capaboost"} <= set(list_presets())
        True
    """
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``: a built-in one, or ``"module:name"``, a preset
    that ``module`` (imported now, from the current directory or ``PYTHONPATH``) defines with
    :func:`preset`.

    Raises:
        ValueError: unknown name (the message lists the valid ones); for ``module:name``, a
            module that is not there, or that defines no preset ``name``.

    Example:
        >>> get_preset("depth").name
        'depth'
    """
    if ":" in name:
        return _user_preset(name)
    if name not in _PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; choose one of: "
                         f"{', '.join(list_presets())}, or MODULE:NAME for a preset your own "
                         "module defines with @preset")
    return _PRESETS[name]


def _user_preset(target: str) -> Preset:
    """The preset ``"module:name"``: import ``module``, then look ``name`` up among the
    presets it registered with :func:`preset`."""
    module_name, _, name = target.partition(":")
    if not name or not all(part.isidentifier() for part in module_name.split(".")):
        raise ValueError(f"preset: expected a built-in name or MODULE:NAME (e.g. "
                         f"my_sweeps:ablation), got {target!r}")
    module = _import(module_name, target, "preset")
    if module.__name__ == __name__:  # benchmarks.presets:quick is quick
        return get_preset(name)
    key = f"{module.__name__}:{name}"
    if key in _USER_PRESETS:
        return _USER_PRESETS[key]
    prefix = module.__name__ + ":"
    defined = sorted(k[len(prefix):] for k in _USER_PRESETS if k.startswith(prefix))
    theirs = (f"its presets: {', '.join(defined)}" if defined
              else "it defines none with @preset")
    if hasattr(module, name):
        value = getattr(module, name)
        # its own preset under another name, or one another module defines (a package's
        # __init__ re-exporting it): name that module
        other = next((k for k, p in _USER_PRESETS.items() if p.build is value), None)
        if other is not None:
            raise ValueError(f"preset: {name!r} in {module_name} is the build function of "
                             f"preset {other.partition(':')[2]!r}: run {other}")
        raise ValueError(f"preset: {module_name}.{name} is a {type(value).__name__}, not a "
                         f"preset defined with @preset({name!r}, ...) from benchmarks.presets "
                         f"({theirs})")
    raise ValueError(f"preset: module {module_name!r} defines no preset {name!r} ({theirs}; "
                     "define one with @preset(NAME, DESCRIPTION) from benchmarks.presets)")


def _import(module_name: str, target: str, what: str):
    """Import ``module_name``; a module that is not there (not one that fails to import its
    own dependencies) is a clear ValueError."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name
                                     or module_name.startswith(err.name + ".")):
            hint = (f"; name the module, not its file: {module_name[:-3]}:..."
                    if module_name.endswith(".py") else "")
            raise ValueError(f"{what}: module {module_name!r} is not there ({target!r} is "
                             "needed; modules are looked up on the current directory and "
                             f"PYTHONPATH){hint}") from err
        raise


def _load(target: str, what: str):
    """Import ``"module:function"``; a missing module or name is a clear ValueError."""
    module_name, _, attr = target.partition(":")
    module = _import(module_name, target, what)
    if not hasattr(module, attr):
        raise ValueError(f"{what}: {module_name!r} has no function {attr!r} (needed: {target!r})")
    return getattr(module, attr)


def load_callable(target: str, what: str = "runner") -> Callable:
    """Resolve ``"package.module:function"`` to the function, with a clear error if absent.

    Example:
        >>> load_callable("json:dumps")([1])
        '[1]'
    """
    return _load(target, what)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_id_for(label: str, config: dict) -> str:
    """A stable, readable, unique id: ``<label>_d<depth>_w<width>_k<mask_k>_s<seed>_<hash>``.

    The hash covers the label and every argument, so two runs differing in anything get two ids
    and the same run always gets the same one.

    Example:
        >>> run_id_for("WT", {"model": "wt_s", "depth": 4, "seed": 0})
        'wt_d4_s0_788e8612'
    """
    digest = hashlib.sha256(json.dumps([label, config], sort_keys=True, default=str).encode())
    parts = [_slug(label)]
    for key, tag in (("depth", "d"), ("width", "w"), ("mask_k", "k"), ("seed", "s")):
        if config.get(key) is not None:
            parts.append(f"{tag}{config[key]}")
    return "_".join(parts) + "_" + digest.hexdigest()[:8]


def config_id_for(label: str, config: dict) -> str:
    """Id of a configuration across seeds: the hash of the label and the arguments but the seed.

    Runs with the same ``config_id`` differ only in their seed; plots and tables average them.

    Example:
        >>> a = config_id_for("WT", {"depth": 2, "seed": 0})
        >>> a == config_id_for("WT", {"depth": 2, "seed": 1}), a == config_id_for("DEQ", {})
        (True, False)
    """
    rest = {k: v for k, v in config.items() if k != "seed"}
    return hashlib.sha256(json.dumps([label, rest], sort_keys=True, default=str).encode()
                          ).hexdigest()[:10]


def _variants(name: str, smoke: bool) -> tuple[Preset, list[Variant]]:
    spec = get_preset(name)
    if spec.source is not None:
        listed = load_callable(spec.source, f"preset {name!r}")(smoke)
        variants = []
        for item in listed:
            config = dict(item)
            variants.append(Variant(str(config.pop("label", name)), config))
        return spec, variants
    return spec, _checked_variants(name, spec.build(smoke), smoke)


def _checked_variants(name: str, variants, smoke: bool) -> list[Variant]:
    """What a build function returned, if it is a non-empty list of :class:`Variant`."""
    what = f"preset {name!r}: its build function (smoke={smoke})"
    if not isinstance(variants, (list, tuple)):
        raise ValueError(f"{what} returned a {type(variants).__name__}, expected a list of "
                         "Variant(label, config)")
    if not variants:
        raise ValueError(f"{what} returned no variants")
    for i, variant in enumerate(variants):
        if not isinstance(variant, Variant):
            raise ValueError(f"{what} returned a {type(variant).__name__} at index {i}, "
                             "expected Variant(label, config)")
        if not isinstance(variant.label, str) or not variant.label.strip():
            raise ValueError(f"{what}: variant {i} has the label {variant.label!r}, expected "
                             "a non-empty string")
        if not isinstance(variant.config, dict):
            raise ValueError(f"{what}: variant {i} ({variant.label!r}) has a "
                             f"{type(variant.config).__name__} config, expected a dict")
        if "seed" in variant.config:
            raise ValueError(f"{what}: variant {i} ({variant.label!r}) sets seed; give seeds "
                             "with @preset(..., seeds=(0, 1)) or --seeds")
    return list(variants)


def build_runs(name: str, smoke: bool = False, seeds: Sequence[int] | None = None,
               overrides: dict | None = None) -> list[RunSpec]:
    """Every run of preset ``name``: its variants crossed with the seeds.

    Args:
        name: a preset of :func:`list_presets`.
        smoke: the tiny size the tests run.
        seeds: override the preset's seeds.
        overrides: arguments set in every run (e.g. ``{"data_dir": "/data"}``); they are part
            of the run ids.

    Returns:
        The runs in a fixed order (seed-major, so a partial sweep covers every variant early).

    Raises:
        ValueError: unknown preset, empty seeds, or two runs with the same id.

    Example:
        >>> [r.config["seed"] for r in build_runs("quick", smoke=True, seeds=[3, 4])][:2]
        [3, 3]
    """
    spec, variants = _variants(name, smoke)
    if seeds is None:
        seeds = spec.smoke_seeds if smoke else spec.seeds
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed, e.g. --seeds 0,1,2")
    if spec.runner is None and overrides:  # a typo: name what --set takes, not the harness's own
        known = set(train_field_names()) | set(model_field_names())
        unknown = sorted(set(overrides) - known)
        if unknown:
            valid = sorted(known - set(HARNESS_OWNED) - {"seed", "model_overrides"})
            raise ValueError(f"overrides: unknown setting {unknown[0]!r}; valid: "
                             f"{', '.join(valid)}")
    runs = []
    # --set lr=1 and --set lr=1.0 are one run: one id (a custom runner: as its presets type it)
    overrides = (_as_field_types(overrides or {}) if spec.runner is None
                 else _as_variant_types(overrides or {}, variants))
    read = {v.label: _read_overrides(v.config, overrides or {}, spec.runner) for v in variants}
    unread = sorted(set(overrides or {}) - set().union(*read.values()))
    if unread:
        raise ValueError(f"overrides: no run of preset {name!r} reads {', '.join(unread)} (its "
                         "models would silently ignore it)")
    for seed in seeds:
        for variant in variants:
            config = {**variant.config, **read[variant.label], "seed": int(seed)}
            runs.append(RunSpec(run_id_for(variant.label, config), variant.label, config,
                                spec.runner))
    if overrides and "seed" in overrides:
        raise ValueError("overrides: set seeds with --seeds, not seed=")
    # a key the variants set to different values is what the preset sweeps: one --set value
    # would make them one configuration under several labels (and pool it in the plots)
    swept = sorted(k for k in set(overrides or {})
                   if len({repr(v.config[k]) for v in variants if k in v.config}) > 1)
    if swept:
        raise ValueError(f"overrides: preset {name!r} sweeps {', '.join(swept)} (its variants "
                         "set different values); --set would run them all alike under their "
                         "own labels: pick variants with --only instead")
    if overrides and spec.runner is None:
        _check_labels_stay_apart(name, runs, overrides)
    owned = sorted(set(overrides or {}) & set(HARNESS_OWNED))
    if owned:
        raise ValueError(f"overrides: {', '.join(owned)} {'is' if len(owned) == 1 else 'are'} "
                         "set by the harness for each run (use its --threads / --device / --out)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {seeds} repeats a seed")
    seen: dict[str, RunSpec] = {}
    for run in runs:
        other = seen.setdefault(run.run_id, run)
        if other is not run:
            raise ValueError(f"preset {name!r}: variants {other.label!r} and {run.label!r} "
                             f"become the same run with these overrides ({overrides or {}})")
    return runs


def _check_labels_stay_apart(name: str, runs: list[RunSpec], overrides: dict) -> None:
    """Refuse overrides under which runs of two labels train the same model the same way, or
    that set the core that tells the preset's labels apart. A variant may leave a setting to
    its model's default: ``deq_vs_wt``'s WT has no ``mask_k`` (0) and its "WT + distinct
    masks" ``mask_k = depth``, so ``--set mask_k=4`` made both one configuration under two
    labels, which the check of values the variants give explicitly did not see. A run whose
    config the trainer rejects is left to :func:`benchmarks.run.validate_runs` to name."""
    import dataclasses as dc

    from wtmodels.models import get_config

    if "core" in overrides and len({r.label for r in runs}) > 1:
        raise ValueError(f"overrides: preset {name!r} picks each label's core through its "
                         "model; --set core would run all its labels as one core: pick "
                         "variants with --only instead")
    resolved: dict[str, tuple[str, str]] = {}  # resolved setting -> (label, run_id)
    first_seed = runs[0].config.get("seed")  # the other seeds' runs differ in the seed only
    for run in (r for r in runs if r.config.get("seed") == first_seed):
        try:
            cfg = resolve_config(dict(run.config))
            model = get_config(cfg.model, **cfg.model_overrides)
        except ValueError:
            return
        train = {k: v for k, v in dc.asdict(cfg).items() if k not in ("model", "model_overrides")}
        key = json.dumps([train, dc.asdict(model)], sort_keys=True, default=str)
        other = resolved.setdefault(key, (run.label, run.run_id))
        if other[0] != run.label:
            raise ValueError(
                f"overrides: with {_describe_overrides(overrides)} the labels of preset {name!r} "
                f"{other[0]!r} and {run.label!r} train the same model ({other[1]} and "
                f"{run.run_id}); pick variants with --only instead")


def _describe_overrides(overrides: dict) -> str:
    return " ".join(f"--set {k}={json.dumps(v)}" for k, v in sorted(overrides.items()))


def _as_field_types(overrides: dict) -> dict:
    """``overrides`` with a whole number given for a float setting made a float, as the trainer
    reads it (``--set lr=1`` and ``--set lr=1.0`` gave the same run two ids, so a rerun with the
    other spelling trained every run again and the tables held the configuration twice).

    Example:
        >>> _as_field_types({"lr": 1, "epochs": 2, "augment": False, "nope": 3})
        {'lr': 1.0, 'epochs': 2, 'augment': False, 'nope': 3}
        >>> _as_field_types({"lr": ".01", "weight_decay": "x"})
        {'lr': 0.01, 'weight_decay': 'x'}
    """
    out = dict(overrides)
    for key, value in overrides.items():
        if key in train_field_names():
            tp = field_type(TrainConfig, key)
        elif key in model_field_names():
            tp = field_type(model_config_class(), key)
        else:
            continue
        if (unwrap_optional(tp)[0] is float and isinstance(value, int)
                and not isinstance(value, bool)):
            out[key] = float(value)
        elif unwrap_optional(tp)[0] is float and isinstance(value, str):
            try:  # a number JSON does not spell (.01, 1e-3 is JSON already): as the trainer's
                out[key] = float(value.strip())  # --lr .01 reads it (range checks come later)
            except ValueError:
                pass
    return out


def _as_variant_types(overrides: dict, variants: Sequence) -> dict:
    """``overrides`` with a whole number made a float where the preset's variants give that
    setting as a float (a custom runner's settings have no declared types).

    Example:
        >>> v = [Variant("a", {"lr": 3e-3, "epochs": 4})]
        >>> _as_variant_types({"lr": 1, "epochs": 2}, v)
        {'lr': 1.0, 'epochs': 2}
    """
    out = dict(overrides)
    for key, value in overrides.items():
        given = [v.config[key] for v in variants if key in v.config]
        if (given and all(isinstance(g, float) for g in given) and isinstance(value, int)
                and not isinstance(value, bool)):
            out[key] = float(value)
    return out


def _read_overrides(config: dict, overrides: dict, runner: str | None) -> dict:
    """The ``overrides`` that a run of ``config`` reads: a DEQ setting is not passed to a
    weight-tied run, a mask setting not to a run without masks (the trainer refuses settings
    its model would ignore). A custom runner's runs get them all (its ``check_config``
    judges them); a config the trainer would reject anyway keeps them all, to fail there
    with its own message."""
    if runner is not None or not overrides:
        return dict(overrides)
    try:
        ignored = settings_without_effect(resolve_config({**config, **overrides}))
    except ValueError:
        return dict(overrides)
    return {k: v for k, v in overrides.items() if k not in ignored}


# arguments of wtmodels.train that the harness sets per run (not settable with --set)
HARNESS_OWNED = ("out", "resume", "progress", "threads", "device")


# ---------------------------------------------------------------------------------------------
# building blocks


def _data(dataset: str, smoke: bool, **full) -> dict:
    """Dataset and optimisation arguments: the full ones, or the smoke size (same dataset
    family, tiny)."""
    if smoke:
        return {"dataset": dataset, **OPTIM, **full, **SMOKE_DATA}
    return {"dataset": dataset, **OPTIM, **full}


def _smoke_dataset(shape: tuple[int, int, int], classes: int = 10) -> dict:
    """Smoke data for presets whose real data may be absent: synthetic images of that shape
    and number of classes."""
    channels, size, _ = shape
    return {"dataset": "synthetic", "synthetic_channels": channels, "image_size": size,
            "synthetic_classes": classes, **OPTIM, **SMOKE_DATA}


def _model(core: str, size: str, smoke: bool) -> str:
    return MODELS["test" if smoke else size][core]


def _tied(depth: int, width: int, size: str, smoke: bool, **extra) -> dict:
    return {"model": _model("unrolled", size, smoke), "depth": depth, "width": width, **extra}


def _masked(depth: int, width: int, size: str, smoke: bool, density: float = 0.5, k=None,
            **extra) -> dict:
    return _tied(depth, width, size, smoke, mask_k=depth if k is None else k,
                 mask_density=density, **extra)


def _untied(depth: int, width: int, size: str, smoke: bool, **extra) -> dict:
    return {"model": _model("untied", size, smoke), "depth": depth, "width": width, **extra}


def _deq(width: int, size: str, smoke: bool, solver: str = "anderson", grad: str = "ift",
         **extra) -> dict:
    return {"model": _model("deq", size, smoke), "width": width, "f_solver": solver,
            "b_solver": solver, "grad": grad, **extra}


def _ode(width: int, size: str, smoke: bool, **extra) -> dict:
    return {"model": _model("ode", size, smoke), "width": width, **extra}


def _depth_grid(variants_by_depth: Callable[[int], list[Variant]], depths: Sequence[int]):
    return [v for d in depths for v in variants_by_depth(d)]


# ---------------------------------------------------------------------------------------------
# the presets


@preset("quick", "digits: weight-tied vs DEQ vs untied vs WT + distinct masks at a few depths "
        "(4-11 min on 2 CPU cores)", seeds=(0, 1), extrapolate=(0.5, 1.0, 1.5, 2.0), jobs=2)
def quick(smoke: bool) -> list[Variant]:
    """The README's main job: four model families on scikit-learn's digits.

    Example:
        >>> sorted({v.label for v in quick(smoke=False)})
        ['DEQ', 'WT', 'WT + distinct masks', 'untied']
        >>> len(quick(smoke=False)), len(build_runs("quick")), len(build_runs("quick", smoke=True))
        (10, 20, 7)
    """
    data = _data("digits", smoke, epochs=15, batch_size=64)
    width = 8 if smoke else 32
    depths = (2, 3) if smoke else (2, 4, 8)

    def at(d: int) -> list[Variant]:
        return [Variant(WT, {**_tied(d, width, "s", smoke), **data}),
                Variant(WT_MASKS, {**_masked(d, width, "s", smoke), **data}),
                Variant(UNTIED, {**_untied(d, width, "s", smoke), **data})]

    return _depth_grid(at, depths) + [Variant(DEQ, {**_deq(width, "s", smoke), **data})]


@preset("deq_vs_wt", "digits: WT vs DEQ (Anderson / Broyden x IFT / phantom) vs ODE: accuracy, "
        "stability, time, memory", seeds=(0, 1, 2), extrapolate=(0.5, 1.0, 2.0))
def deq_vs_wt(smoke: bool) -> list[Variant]:
    """Weight-tied unrolled models against their implicit and continuous counterparts.

    Example:
        >>> [v.label for v in deq_vs_wt(smoke=True)][3:]  # doctest: +NORMALIZE_WHITESPACE
        ['DEQ anderson / ift', 'DEQ anderson / phantom', 'DEQ broyden / ift',
         'DEQ broyden / phantom', 'ODE']
        >>> len(build_runs("deq_vs_wt")), len(build_runs("deq_vs_wt", smoke=True))
        (24, 8)
    """
    data = _data("digits", smoke, epochs=20, batch_size=64)
    width, depth = (8, 2) if smoke else (32, 8)
    variants = [Variant(WT, {**_tied(depth, width, "s", smoke), **data}),
                Variant(WT_MASKS, {**_masked(depth, width, "s", smoke), **data}),
                Variant(UNTIED, {**_untied(depth, width, "s", smoke), **data})]
    for solver in ("anderson", "broyden"):
        for grad in ("ift", "phantom"):
            variants.append(Variant(f"DEQ {solver} / {grad}",
                                    {**_deq(width, "s", smoke, solver, grad), **data}))
    variants.append(Variant(ODE, {**_ode(width, "s", smoke), **data}))
    return variants


@preset("depth", "digits: accuracy vs depth for WT, WT + masks and untied at two widths, "
        "with test-time depth extrapolation", seeds=(0, 1, 2),
        extrapolate=(0.5, 1.0, 1.5, 2.0, 3.0))
def depth(smoke: bool) -> list[Variant]:
    """Depth sweep; a line per width in the accuracy-vs-depth plot.

    Example:
        >>> variants = depth(smoke=False)
        >>> sorted({v.config["depth"] for v in variants})
        [1, 2, 4, 8, 16]
        >>> sorted({v.config["width"] for v in variants})
        [16, 32]
        >>> len(variants), len(build_runs("depth", smoke=True))
        (30, 6)
    """
    data = _data("digits", smoke, epochs=20, batch_size=64)
    widths = (8,) if smoke else (16, 32)
    depths = (1, 2) if smoke else (1, 2, 4, 8, 16)
    return [Variant(label, {**make(d, w, "s", smoke), **data})
            for w in widths for d in depths
            for label, make in ((WT, _tied), (WT_MASKS, _masked), (UNTIED, _untied))]


@preset("width", "digits: accuracy vs width for WT, WT + masks and untied at depth 4",
        seeds=(0, 1, 2))
def width(smoke: bool) -> list[Variant]:
    """Width sweep at a fixed depth.

    Example:
        >>> variants = width(smoke=False)
        >>> sorted({v.config["width"] for v in variants}), {v.config["depth"] for v in variants}
        ([8, 16, 32, 64], {4})
        >>> len(build_runs("width", smoke=True))
        6
    """
    data = _data("digits", smoke, epochs=20, batch_size=64)
    widths = (4, 8) if smoke else (8, 16, 32, 64)
    d = 2 if smoke else 4
    return [Variant(label, {**make(d, w, "s", smoke), **data})
            for w in widths
            for label, make in ((WT, _tied), (WT_MASKS, _masked), (UNTIED, _untied))]


@preset("sparsity", "digits: mask density x number of distinct masks vs one shared mask "
        "(mask_k=1) and no mask, WT depth 8", seeds=(0, 1, 2))
def sparsity(smoke: bool) -> list[Variant]:
    """Does varying the shared weights with distinct masks add capacity, and at which density?

    Example:
        >>> masked = [v.config for v in sparsity(smoke=False) if v.config.get("mask_k")]
        >>> sorted({c["mask_density"] for c in masked}), sorted({c["mask_k"] for c in masked})
        ([0.25, 0.5, 0.75], [1, 2, 4, 8])
        >>> len(masked), len(build_runs("sparsity", smoke=True))
        (12, 4)
    """
    data = _data("digits", smoke, epochs=20, batch_size=64)
    width, d = (8, 2) if smoke else (32, 8)
    densities = (0.5,) if smoke else (0.25, 0.5, 0.75)
    ks = (1, 2) if smoke else (1, 2, 4, 8)
    variants = [Variant(WT, {**_tied(d, width, "s", smoke), **data}),
                Variant(UNTIED, {**_untied(d, width, "s", smoke), **data})]
    for density in densities:
        for k in ks:
            label = WT_SHARED if k == 1 else WT_MASKS
            variants.append(Variant(label, {**_masked(d, width, "s", smoke, density, k), **data}))
    return variants


@preset("fashion", "Fashion-MNIST sized for a CPU (10k train / 5k test images at 14x14): WT vs "
        "WT + distinct / shared mask vs untied vs DEQ at three depths", seeds=(0, 1),
        extrapolate=(0.5, 1.0, 1.5, 2.0), jobs=2)
def fashion(smoke: bool) -> list[Variant]:
    """A real task on a CPU budget: seeded subsets of Fashion-MNIST (10k train, 5k test)
    resized to 14x14, six epochs.

    Example (the smoke size trains on synthetic 14x14 images: no download):
        >>> c = fashion(smoke=False)[0].config
        >>> c["dataset"], c["train_size"], c["test_size"], c["image_size"], c["epochs"]
        ('fashion_mnist', 10000, 5000, 14, 6)
        >>> fashion(smoke=True)[0].config["dataset"], len(build_runs("fashion", smoke=True))
        ('synthetic', 9)
    """
    if smoke:
        data = _smoke_dataset((1, 14, 14))
    else:
        data = _data("fashion_mnist", smoke, train_size=10000, test_size=5000, image_size=14,
                     epochs=6, batch_size=128)
    width = 8 if smoke else 24
    depths = (2, 3) if smoke else (2, 4, 8)

    def at(d: int) -> list[Variant]:
        return [Variant(WT, {**_tied(d, width, "s", smoke), **data}),
                Variant(WT_MASKS, {**_masked(d, width, "s", smoke), **data}),
                Variant(WT_SHARED, {**_masked(d, width, "s", smoke, k=1), **data}),
                Variant(UNTIED, {**_untied(d, width, "s", smoke), **data})]

    return _depth_grid(at, depths) + [Variant(DEQ, {**_deq(width, "s", smoke), **data})]


def _cifar(num_classes: int, smoke: bool) -> list[Variant]:
    if smoke:
        data = _smoke_dataset((3, 32, 32), num_classes)  # CIFAR-100's smoke: a 100-class head
    else:
        data = _data(f"cifar{num_classes}", smoke, epochs=100, batch_size=128, lr=3e-3)
    widths = (8,) if smoke else (64, 128)
    depths = (1, 2) if smoke else (4, 8, 16)
    variants = []
    for w in widths:
        for d in depths:
            variants += [Variant(WT, {**_tied(d, w, "m", smoke), **data}),
                         Variant(WT_MASKS, {**_masked(d, w, "m", smoke), **data}),
                         Variant(UNTIED, {**_untied(d, w, "m", smoke), **data})]
        variants += [Variant(DEQ, {**_deq(w, "m", smoke), **data}),
                     Variant(ODE, {**_ode(w, "m", smoke), **data})]
    return variants


@preset("cifar10", "CIFAR-10, full size, for a GPU: WT / WT + masks / untied at depths 4-16 and "
        "widths 64, 128, plus DEQ and ODE", seeds=(0, 1, 2), extrapolate=(0.5, 1.0, 2.0))
def cifar10(smoke: bool) -> list[Variant]:
    """Full-size CIFAR-10 sweep (``data_dir`` must hold the dataset or pass ``download``).

    Example:
        >>> variants = cifar10(smoke=False)
        >>> {v.config["dataset"] for v in variants}, sorted({v.config["model"] for v in variants})
        ({'cifar10'}, ['deq_m', 'ode_m', 'untied_m', 'wt_m'])
        >>> len(variants), len(build_runs("cifar10", smoke=True))
        (22, 8)
    """
    return _cifar(10, smoke)


@preset("cifar100", "CIFAR-100, full size, for a GPU: as cifar10", seeds=(0, 1, 2),
        extrapolate=(0.5, 1.0, 2.0))
def cifar100(smoke: bool) -> list[Variant]:
    """Full-size CIFAR-100 sweep.

    Example:
        >>> {v.config["dataset"] for v in cifar100(smoke=False)}
        {'cifar100'}
        >>> cifar100(smoke=True)[0].config["synthetic_classes"]  # the smoke size's 100-class head
        100
    """
    return _cifar(100, smoke)


_PRESETS["capaboost"] = Preset(
    "capaboost", "CapaBoost: LoRA vs masked parallel copies at equal trainable parameters "
    "(runs listed and run by benchmarks/capaboost.py)", build=None, seeds=(0, 1, 2),
    runner="benchmarks.capaboost:run", source="benchmarks.capaboost:sweep")
