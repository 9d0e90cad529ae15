"""Command-line flags generated from dataclass fields, and one-line usage errors.

``python -m wtmodels.train`` gets one flag per :class:`~wtmodels.train_config.TrainConfig` field
and per ``ModelConfig`` field (underscores become dashes; booleans get ``--x`` / ``--no-x``;
optional values accept ``none``), plus ``--config FILE``. Only the flags actually given end up in
the parsed settings, so a config file supplies the rest and the run's defaults fill the gaps.

Example:
    >>> from wtmodels.cli import parse_settings
    >>> parse_settings(["--model", "test_wt", "--epochs", "2", "--no-augment", "--depth", "3"])
    {'model': 'test_wt', 'epochs': 2, 'augment': False, 'depth': 3}
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable

from wtmodels.train_config import (
    TrainConfig,
    field_type,
    load_config_file,
    model_config_class,
    train_field_names,
    unwrap_optional,
)


def exit_with(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` for a command-line entry point, quiet when its reader goes away.

    A pipe closed early (``python -m benchmarks.recommend DIR | head -3``) raised
    ``BrokenPipeError`` with a traceback; the command now ends with status 1 and no message
    (stdout is pointed at ``os.devnull`` so the interpreter's final flush cannot fail again).

    Example:
        >>> exit_with(lambda: 0)
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    sys.exit(code)


class UsageError(ValueError):
    """Bad command-line input (unknown flag, unparsable or out-of-range value).

    Example:
        >>> parse_settings(["--epochs", "two"])
        Traceback (most recent call last):
        ...
        wtmodels.cli.UsageError: argument --epochs: invalid int value: 'two'
    """


class DashValueParser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``--flag=--`` as the value ``'--'``, as Python 3.13 does,
    and ``--flag -1e-5`` / ``--flag -inf`` as values, not as unknown flags.

    Before 3.13 argparse took that ``--`` for the separator and handed the flag an empty list,
    which every command then compared or formatted as a number or path (a ``TypeError``
    traceback instead of one line and exit 2). Every command-line parser here derives from it.

    Example:
        >>> parser = DashValueParser(prog="demo")
        >>> _ = parser.add_argument("--name")
        >>> parser.parse_args(["--name=--"]).name
        '--'
        >>> parser.parse_args(["--name", "-1e-5"]).name
        '-1e-5'
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # also -1e-5, -inf, -nan as values (argparse took them for flags: "expected one
        # argument", naming neither the value nor what is wrong with it)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def _get_values(self, action, arg_strings):
        # nargs "?" / "+" / "*" too: before 3.13 "--flag=--" gave its const / [] / []
        if (action.nargs in (None, "?", "+", "*") and action.option_strings
                and arg_strings == ["--"]):
            value = self._get_value(action, "--")  # int / float: "invalid ... value: '--'"
            self._check_value(action, value)
            return value if action.nargs in (None, "?") else [value]
        return super()._get_values(action, arg_strings)


class OneLineParser(DashValueParser):
    """An ArgumentParser that raises :class:`UsageError` instead of printing usage and exiting.

    Example:
        >>> parser = OneLineParser(prog="demo")
        >>> _ = parser.add_argument("--depth", type=int)
        >>> parser.parse_args(["--depth", "3"]).depth
        3
        >>> parser.parse_args(["--width", "3"])
        Traceback (most recent call last):
        ...
        wtmodels.cli.UsageError: unrecognized arguments: --width 3
    """

    def error(self, message: str):
        raise UsageError(message)


def _converter(tp, flag: str):
    """A string -> value converter for annotation ``tp`` (``none``/``null`` -> None if optional)."""
    inner, optional = unwrap_optional(tp)
    base = {int: int, float: float, str: str}.get(inner)
    if base is None:
        origin = typing.get_origin(inner)
        if origin in (tuple, list):
            (item,) = {a for a in typing.get_args(inner) if a is not Ellipsis} or {str}
            item_conv = {int: int, float: float}.get(item, str)

            def base(text: str):
                return tuple(item_conv(v) for v in text.split(",") if v.strip())
        else:
            raise TypeError(f"{flag}: cannot build a flag for type {tp!r}")

    def convert(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = getattr(inner, "__name__", "value")  # argparse: "invalid int value"
    return convert


def _add_field_flags(group, cls, names, helps: dict[str, str]):
    for name in names:
        tp = field_type(cls, name)
        flag = "--" + name.replace("_", "-")
        inner, _ = unwrap_optional(tp)
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
        help_text = helps.get(name) or meta.get("help") or f"{cls.__name__}.{name}"
        if inner is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        group.add_argument(flag, dest=name, type=_converter(tp, flag), default=argparse.SUPPRESS,
                           choices=meta.get("choices"), metavar=name.upper(), help=help_text)


def _model_field_helps(cls) -> dict[str, str]:
    """Per-field help from the ``Attributes:`` section of the ModelConfig docstring."""
    helps, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and head.isidentifier() and head in {f.name for f in dataclasses.fields(cls)}:
            current = head
            helps[current] = rest.strip()
        elif current and stripped and line.startswith(" " * 12):
            helps[current] += " " + stripped
        else:
            current = None
    return {k: v.replace("``", "").replace("%", "%%") for k, v in helps.items()}


def build_parser(prog: str = "python -m wtmodels.train") -> OneLineParser:
    """The training parser: ``--config`` plus one flag per TrainConfig and ModelConfig field.

    Example:
        >>> "--mask-density" in build_parser().format_help()
        True
    """
    parser = OneLineParser(
        prog=prog, allow_abbrev=False,
        description="Train one model on one dataset into a run directory (config.json, "
                    "metrics.jsonl, checkpoint.pt, model_info.json, done.json).")
    parser.add_argument("--config", dest="config", default=argparse.SUPPRESS, metavar="FILE",
                        help="JSON or YAML file of settings (flags given here override it)")
    train_group = parser.add_argument_group("training (TrainConfig)")
    _add_field_flags(train_group, TrainConfig, train_field_names(), {})
    model_cls = model_config_class()
    model_group = parser.add_argument_group("model (ModelConfig; default: the variant's value)")
    model_names = [f.name for f in dataclasses.fields(model_cls)]
    clash = set(model_names) & set(train_field_names())
    if clash:
        raise RuntimeError(f"ModelConfig and TrainConfig share field names: {sorted(clash)}")
    _add_field_flags(model_group, model_cls, model_names, _model_field_helps(model_cls))
    return parser


def parse_settings(argv: list[str]) -> dict:
    """The settings given on a command line: ``--config FILE`` entries overridden by flags.

    Args:
        argv: arguments without the program name.

    Returns:
        A flat dict (train and model settings, underscores) of the settings given.

    Raises:
        UsageError: an unknown flag, an unparsable value, an unreadable config file or one
            that gives a setting twice (``train-size`` and ``train_size``).

    Example:
        >>> parse_settings(["--lr", "0.1", "--eval-f-max-iter", "none"])
        {'lr': 0.1, 'eval_f_max_iter': None}
    """
    args = vars(build_parser().parse_args(argv))
    settings = {}
    if "config" in args:
        path = args.pop("config")
        try:
            from_file = load_config_file(path)
        except ValueError as err:
            raise UsageError(str(err)) from None
        for raw_key, value in from_file.items():
            key = str(raw_key).replace("-", "_")
            if key in settings:  # "train-size" and "train_size": one would silently win
                raise UsageError(f"config file {path}: setting {key} given twice (as "
                                 f"{key.replace('_', '-')!r} and {key!r})")
            settings[key] = value
        nested = settings.get("model_overrides")
        if isinstance(nested, dict):  # config.json's form: a flag overrides it too (it was
            # refused as "given twice")
            settings["model_overrides"] = {k: v for k, v in nested.items() if k not in args}
    settings.update(args)
    return settings
