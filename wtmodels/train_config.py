"""``TrainConfig``: every training setting, its range, and how config dicts and files map onto it.

A training run is described by a :class:`TrainConfig` plus ``model_overrides``, a dict of
``wtmodels.models.ModelConfig`` fields (``depth``, ``width``, ``mask_density`` ...) that the
trainer passes to ``create_model``. :func:`resolve_config` splits a flat dict (as a config file or
the command line gives it) into the two, checking every key and value.

Example:
    >>> from wtmodels.train_config import TrainConfig
    >>> cfg = TrainConfig(model="wt_s", epochs=3, lr=0.01)
    >>> cfg.optimizer, cfg.batch_size
    ('adamw', 32)
    >>> TrainConfig(optimizer="rmsprop")
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of sgd, adam, adamw; got 'rmsprop'
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(default, help: str, **meta):
    """A dataclass field with help text and validation metadata (choices, ge, gt, le, lt;
    path: a ``str`` field that also takes an ``os.PathLike``)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


# Fields that may differ when a run is resumed: they change how, not what, is computed.
# (num_workers included: each image's augmentation follows (seed, epoch, index), see
# wtmodels.data.SeededItems, whichever process draws it.)
RUNTIME_FIELDS = ("out", "resume", "data_dir", "download", "progress", "threads", "device",
                  "num_workers")


@dataclass
class TrainConfig:
    """All settings of one training run (model shape settings live in ``model_overrides``).

    Every field is also a command-line flag of ``python -m wtmodels.train`` (``lr`` ->
    ``--lr``, ``label_smoothing`` -> ``--label-smoothing``, booleans as ``--amp`` /
    ``--no-amp``). Values are checked on construction: a bad one raises ``ValueError`` naming
    the field and the valid choices or range.

    Example:
        >>> cfg = TrainConfig(model="deq_s", pretrain_steps=100, jac_reg_weight=0.5)
        >>> cfg.schedule, cfg.warmup_epochs
        ('cosine', 0.5)
    """

    # what to train, where
    model: str = _opt("wt_s", "registered model name (wtmodels.list_models())")
    dataset: str = _opt("digits", "dataset name (wtmodels.data.list_datasets())")
    epochs: int = _opt(8, "number of training epochs", ge=1)
    out: str | None = _opt(None, "run directory (config.json, metrics.jsonl, checkpoint.pt ...)",
                           path=True)
    resume: bool = _opt(False, "continue the run in --out from its checkpoint")
    # < 2**64: torch.manual_seed's range (a larger seed failed as "Overflow when unpacking
    # long long", naming no setting)
    seed: int = _opt(0, "seed of initialisation, data order and augmentation", ge=0, lt=2**64)
    # data
    data_dir: str | None = _opt(None, "where dataset files are (or go, with --download)",
                                path=True)
    download: bool = _opt(False, "let torchvision download the dataset into --data-dir")
    train_size: int | None = _opt(None, "fixed seeded subset of the training set", ge=1)
    test_size: int | None = _opt(None, "fixed seeded subset of the test set", ge=1)
    data_seed: int = _opt(0, "seed of the --train-size/--test-size subsets and synthetic data",
                          ge=0, lt=2**64)
    augment: bool = _opt(True, "standard training augmentation of the dataset")
    image_size: int | None = _opt(None, "resize images to this size (default: native / 224)",
                                  ge=1)
    synthetic_channels: int | None = _opt(None, "synthetic dataset: image channels (3)", ge=1)
    synthetic_classes: int | None = _opt(None, "synthetic dataset: classes (10)", ge=2)
    batch_size: int = _opt(32, "global training batch size (split over processes)", ge=1)
    test_batch_size: int | None = _opt(None, "global test batch size (default 2x batch size)",
                                       ge=1)
    num_workers: int = _opt(0, "data-loader worker processes per process", ge=0)
    # optimisation
    optimizer: str = _opt("adamw", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = _opt(1e-2, "peak learning rate", gt=0)
    momentum: float = _opt(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(0.05, "weight decay (matrices and kernels only, not biases or "
                               "norm scales)", ge=0)
    schedule: str = _opt("cosine", "learning-rate schedule", choices=("cosine", "constant"))
    warmup_epochs: float = _opt(0.5, "linear warm-up length in epochs", ge=0)
    min_lr: float = _opt(0.0, "final learning rate of the cosine schedule", ge=0)
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss", ge=0, lt=1)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    max_bad_steps: int = _opt(20, "stop after this many consecutive non-finite losses", ge=1)
    # speed
    amp: bool = _opt(False, "autocast mixed precision (bfloat16 by default)")
    amp_dtype: str = _opt("bfloat16", "autocast dtype", choices=("bfloat16", "float16"))
    channels_last: bool = _opt(False, "channels-last memory format for model and images")
    compile: bool = _opt(False, "torch.compile the model")
    device: str = _opt("auto", "compute device", choices=("auto", "cpu", "cuda"))
    tf32: bool = _opt(False, "CUDA: let convolutions and matmuls use TF32 (faster on Ampere and "
                             "newer; its ~1e-3 precision stalls DEQ solves near f_tol 1e-4)")
    # <= 1024: far more crashed the process (libgomp could not create them; 10**6 was a
    # segmentation fault), as benchmarks.provenance.MAX_THREADS refuses them for the benchmarks
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", ge=1,
                               le=1024)
    # DEQ practice
    pretrain_steps: int = _opt(0, "DEQ cores: first N steps iterate unrolled (model.set_pretrain)",
                               ge=0)
    jac_reg_weight: float = _opt(0.0, "DEQ cores: weight of the Jacobian regulariser", ge=0)
    jac_reg_freq: float = _opt(1.0, "DEQ cores: share of steps that add the Jacobian term",
                               gt=0, le=1)
    # reporting
    progress: str = _opt("auto", "progress display: tqdm bar on a terminal (auto), bar, lines, "
                         "none", choices=("auto", "bar", "lines", "none"))
    # model shape (ModelConfig fields), not a flag of its own
    model_overrides: dict = _opt({}, "ModelConfig overrides passed to create_model", flag=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name), field_type(
                TrainConfig, f.name), f.metadata))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr ({self.lr}); got {self.min_lr}")
        if self.warmup_epochs > self.epochs:  # the learning rate would never reach lr
            raise ValueError(f"warmup_epochs must be <= epochs ({self.epochs}); got "
                             f"{self.warmup_epochs}")

    def to_dict(self) -> dict:
        """A JSON-ready copy of every field.

        Example:
            >>> TrainConfig(epochs=2).to_dict()["epochs"]
            2
        """
        return dataclasses.asdict(self)


def field_type(cls, name: str):
    """The resolved annotation of dataclass field ``name`` of ``cls``.

    Example:
        >>> field_type(TrainConfig, "epochs")
        <class 'int'>
    """
    return typing.get_type_hints(cls)[name]


def unwrap_optional(tp) -> tuple[Any, bool]:
    """``(inner type, allows None)`` of a type such as ``int | None``.

    Example:
        >>> unwrap_optional(int | None)
        (<class 'int'>, True)
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def check_value(name: str, value, tp, meta: typing.Mapping | None = None):
    """Check (and lightly coerce: int -> float, list -> tuple) one config value.

    Args:
        name: field name, used in the error message.
        value: the value.
        tp: the field's annotation.
        meta: field metadata with optional ``choices``, ``ge``, ``gt``, ``le``, ``lt`` and
            ``path`` (a ``pathlib.Path`` becomes its string).

    Returns:
        The value, coerced to the field type.

    Raises:
        ValueError: wrong type, not one of the choices, or out of range.

    Example:
        >>> check_value("lr", 1, float, {"gt": 0})
        1.0
        >>> check_value("lr", -1.0, float, {"gt": 0})
        Traceback (most recent call last):
        ...
        ValueError: lr must be > 0; got -1.0
    """
    meta = meta or {}
    inner, optional = unwrap_optional(tp)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a sweep over np.arange: as ModelConfig.validate (np.int64 was
        # refused as "not an integer" by run() while create_model took it)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} may not be None")
    origin = typing.get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; got {value!r}")
    elif inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    elif inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number; got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # no setting means anything at inf or nan
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    elif inner is str:
        if meta.get("path") and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string; got {value!r}")
        if meta.get("path") and not value.strip():  # Path("") is the current directory
            raise ValueError(f"{name} must be a path, got an empty one ({value!r}); leave it "
                             "out (or give none) for no path")
        if meta.get("path") and optional and value.strip().lower() in ("none", "null"):
            # the command line reads `--out none` as no path; `out: none` in a config file (or
            # a `--set data_dir=none` of benchmarks.run) made a directory named 'none'
            raise ValueError(f"{name} must be a path or null (no path), got the string "
                             f"{value!r}; write null (JSON / YAML) or None (Python), or "
                             f"'./{value.strip()}' for a directory of that name")
    elif origin in (tuple, list) or inner in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{name} must be a list; got {value!r}")
        value = tuple(value) if (origin or inner) is tuple else list(value)
    elif inner is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping; got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            raise ValueError(f"{name} must be {word} {meta[key]}; got {value!r}")
    return value


def train_field_names() -> list[str]:
    """Names of the TrainConfig fields that are settings (flags), in declaration order.

    Example:
        >>> "lr" in train_field_names(), "model_overrides" in train_field_names()
        (True, False)
    """
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]


def model_config_class():
    """``wtmodels.models.ModelConfig`` (imported on first use).

    Example:
        >>> import dataclasses
        >>> "depth" in {f.name for f in dataclasses.fields(model_config_class())}
        True
    """
    from wtmodels.models import ModelConfig

    return ModelConfig


def model_field_names() -> list[str]:
    """Names of the ModelConfig fields, i.e. the keys ``model_overrides`` may hold.

    Example:
        >>> "mask_density" in model_field_names()
        True
    """
    return [f.name for f in dataclasses.fields(model_config_class())]


def check_model_overrides(overrides: dict) -> dict:
    """Type-check a dict of ModelConfig overrides (ranges are checked by ``get_config``).

    Example:
        >>> check_model_overrides({"depth": 4})
        {'depth': 4}
    """
    cls = model_config_class()
    names = model_field_names()
    out = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown model setting {key!r}; valid: {', '.join(names)}")
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[key]
        out[key] = check_value(key, value, field_type(cls, key), meta)
    return out


#: training settings read only when the model has a DEQ core
DEQ_TRAIN_FIELDS = ("pretrain_steps", "jac_reg_weight", "jac_reg_freq")
#: training settings read only by the synthetic dataset
SYNTHETIC_FIELDS = ("synthetic_channels", "synthetic_classes")
FILELESS_DATASETS = ("digits", "synthetic")  # bundled or generated: no data_dir, no download


def settings_without_effect(cfg: TrainConfig) -> dict[str, str]:
    """The settings of ``cfg`` that the run would never read, each with the reason.

    A model override counts when it differs from the registered variant's own value and the
    resolved model does not read it (see ``wtmodels.model_config.fields_without_effect``); a
    training setting counts when it differs from its default and what reads it is off: DEQ
    practice without a DEQ core, ``jac_reg_freq`` without ``jac_reg_weight``, ``momentum`` /
    ``nesterov`` without SGD (``nesterov`` without momentum), ``min_lr`` without the cosine
    schedule, ``amp_dtype`` without ``amp``, the synthetic dataset's shape on another
    dataset, ``data_seed`` without a subset (``train_size`` / ``test_size``) of a dataset
    other than ``synthetic``, ``data_dir`` / ``download`` for a dataset that reads no files
    (``digits`` ships with scikit-learn, ``synthetic`` is generated), ``download`` for
    ``imagefolder``, ``augment`` for ``synthetic`` (it has none), a DEQ core's ``depth`` and
    ``mask_schedule`` without ``pretrain_steps`` (only its warm-up unrolls: the solver's budget
    is ``f_max_iter`` and a solver step applies the K masks in order). The
    trainer refuses such a run: a setting that silently does nothing is a wrong experiment,
    not a harmless one.

    Example:
        >>> settings_without_effect(TrainConfig(model="wt_s", jac_reg_weight=0.1))
        {'jac_reg_weight': "read by core 'deq' only"}
        >>> settings_without_effect(TrainConfig(model="deq_s", model_overrides={"f_tol": 1e-3}))
        {}
    """
    from wtmodels.model_config import fields_without_effect
    from wtmodels.models import get_config

    variant = get_config(cfg.model)
    resolved = get_config(cfg.model, **cfg.model_overrides)
    unused = fields_without_effect(resolved)
    found = {name: unused[name] for name, value in cfg.model_overrides.items()
             if name in unused and value != getattr(variant, name)}
    defaults = TrainConfig()
    if resolved.core != "deq":
        found.update((name, "read by core 'deq' only") for name in DEQ_TRAIN_FIELDS
                     if getattr(cfg, name) != getattr(defaults, name))
    elif cfg.jac_reg_weight == 0 and cfg.jac_reg_freq != defaults.jac_reg_freq:
        found["jac_reg_freq"] = "read only with jac_reg_weight > 0"
    if resolved.core == "deq" and cfg.pretrain_steps == 0:  # the solver's budget is f_max_iter,
        # and a solver step applies the K masks in order: only the warm-up unrolls by these
        found.update((name, "read by a DEQ core only while pretrain_steps unroll it")
                     for name, value in cfg.model_overrides.items()
                     if name in ("depth", "mask_schedule") and name not in unused
                     and value != getattr(variant, name))
    off = {  # setting -> (why unread, if unread)
        "momentum": ("read only with optimizer 'sgd'", cfg.optimizer != "sgd"),
        "nesterov": ("read only with optimizer 'sgd' and momentum > 0",
                     cfg.optimizer != "sgd" or cfg.momentum == 0),
        "min_lr": ("read only with schedule 'cosine'", cfg.schedule != "cosine"),
        "amp_dtype": ("read only with amp", not cfg.amp),
    }
    found.update((name, why) for name, (why, unread) in off.items()
                 if unread and getattr(cfg, name) != getattr(defaults, name))
    if cfg.dataset != "synthetic":
        found.update((name, "read by dataset 'synthetic' only") for name in SYNTHETIC_FIELDS
                     if getattr(cfg, name) is not None)
    elif cfg.augment != defaults.augment:
        found["augment"] = "dataset 'synthetic' has no augmentation"
    if (cfg.dataset != "synthetic" and cfg.train_size is None and cfg.test_size is None
            and cfg.data_seed != defaults.data_seed):
        found["data_seed"] = "read only with train_size / test_size or dataset 'synthetic'"
    if cfg.dataset in FILELESS_DATASETS:
        found.update((name, f"dataset {cfg.dataset!r} reads no files")
                     for name in ("data_dir", "download")
                     if getattr(cfg, name) != getattr(defaults, name))
    elif cfg.dataset == "imagefolder" and cfg.download:
        found["download"] = "dataset 'imagefolder' has nothing to download"
    return found


def resolve_config(config: dict | TrainConfig) -> TrainConfig:
    """A validated TrainConfig from a TrainConfig or a flat dict of train and model settings.

    Keys of the flat dict may use dashes or underscores (not both for one setting); keys that
    are ModelConfig fields go to ``model_overrides`` (as does a nested ``model_overrides`` dict).

    Args:
        config: a TrainConfig, or a dict such as ``{"model": "wt_s", "lr": 0.01, "depth": 4}``.

    Returns:
        The TrainConfig.

    Raises:
        ValueError: an unknown key, a setting given twice, or a bad value, naming the key and
            the valid choices.

    Example:
        >>> cfg = resolve_config({"model": "wt_s", "epochs": 2, "mask-density": 0.25})
        >>> cfg.epochs, cfg.model_overrides
        (2, {'mask_density': 0.25})
    """
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config, model_overrides=check_model_overrides(
            dict(config.model_overrides)))
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict or TrainConfig; got {type(config).__name__}")
    train_names = set(train_field_names())
    model_names = set(model_field_names())
    if "model_overrides" in config and "model-overrides" in config:  # one was dropped
        raise ValueError("setting model_overrides given twice (as 'model_overrides' and "
                         "'model-overrides')")
    nested = config.get("model_overrides", config.get("model-overrides")) or {}
    if not isinstance(nested, dict):
        raise ValueError(f"model_overrides must be a mapping of model settings; got {nested!r}")
    train, model = {}, dict(nested)
    spelled = {key: f"model_overrides[{key!r}]" for key in nested}  # key -> as given
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        if key == "model_overrides":
            continue
        if key in spelled:  # "train-size" and "train_size": one would silently win
            raise ValueError(f"setting {key} given twice (as {spelled[key]} and {raw_key!r})")
        spelled[key] = repr(raw_key)
        if key in train_names:
            train[key] = value
        elif key in model_names:
            model[key] = value
        else:
            valid = sorted(train_names | model_names)
            hint = ""
            if isinstance(config.get("train"), dict) and "model_config" in config:
                hint = ("; this is a run directory's config.json: pass its 'train' and "
                        "'model_overrides' entries flattened into one mapping")
            raise ValueError(f"unknown setting {raw_key!r}{hint}; valid: {', '.join(valid)}")
    return TrainConfig(**train, model_overrides=check_model_overrides(model))


#: YAML 1.2 numbers, read as the command line reads them: a decimal integer (a leading zero is
#: no octal marker: ``010`` is 10, not YAML 1.1's 8; ``1_000`` as Python's int() reads it) and a
#: float with a dot or an exponent (``1e-3`` and ``1.0e3`` too, which YAML 1.1 made strings).
#: YAML 1.1's ``0x10``, ``0o10``, ``0b10`` and base-60 ``1:30`` (90) stay strings, refused where
#: a number is due, as ``--epochs 1:30`` is.
_YAML_INT = re.compile(r"^[-+]?[0-9](?:_?[0-9])*$")
_YAML_FLOAT = re.compile(
    r"^[-+]?(?:[0-9](?:_?[0-9])*\.(?:[0-9](?:_?[0-9])*)?|\.[0-9](?:_?[0-9])*)"
    r"(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9](?:_?[0-9])*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


def _yaml_loader():
    """A ``yaml.SafeLoader`` reading numbers as YAML 1.2 does (and the command line): ``1e-3``
    and ``1.0e3`` are floats (YAML 1.1 made them strings, so ``lr: 1e-3`` was refused as not a
    number), ``010`` is 10 (YAML 1.1: octal 8, while ``--seed 010`` is 10), ``1:30`` a string
    (YAML 1.1: 90); a key repeated in one mapping is refused.

    Example:
        >>> import yaml
        >>> yaml.load("lr: 1e-3\\nepochs: 2\\nname: e5\\nseed: 010\\nt: 1:30",
        ...           Loader=_yaml_loader())
        {'lr': 0.001, 'epochs': 2, 'name': 'e5', 'seed': 10, 't': '1:30'}
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # YAML forbids a key twice in one mapping; PyYAML kept the last one silently
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"setting {key!r} given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            return int(self.construct_scalar(node))  # decimal, as the resolver matched it

    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {  # SafeLoader's, less its YAML 1.1 number forms
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in numbers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(numbers[0], _YAML_INT, list("-+0123456789"))
    Loader.add_implicit_resolver(numbers[1], _YAML_FLOAT, list("-+0123456789."))
    Loader.add_constructor(numbers[0], Loader.construct_yaml_int)
    return Loader


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object as a dict, refusing a key given twice (``json`` kept the last silently).

    Example:
        >>> json.loads('{"lr": 0.1, "lr": 0.2}', object_pairs_hook=_no_duplicate_keys)
        Traceback (most recent call last):
        ...
        ValueError: setting 'lr' given twice
    """
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"setting {key!r} given twice")
        out[key] = value
    return out


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a flat settings dict from a JSON or YAML file (``.yaml``/``.yml`` -> YAML).

    Args:
        path: the file.

    Returns:
        The dict (keys not yet checked; pass it to :func:`resolve_config`).

    Raises:
        ValueError: the file is missing, unparsable, or not a mapping.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "c.yaml")
        >>> _ = open(p, "w").write("lr: 0.1\\ndepth: 4\\n")
        >>> load_config_file(p)
        {'lr': 0.1, 'depth': 4}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is fine
    except OSError as err:
        raise ValueError(f"config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
        else:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except Exception as err:  # noqa: BLE001 - any parse error is bad input
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"config file {path} is not valid "
                         f"{'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return data
