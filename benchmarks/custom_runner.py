"""Run one sweep run through a custom runner function, in its own process.

``python -m benchmarks.custom_runner RUN_DIR`` reads ``RUN_DIR/spec.json`` (written by
:mod:`benchmarks.run`), imports its ``runner`` (``"module:function"``), calls
``function(config, RUN_DIR)`` and, when the function returns, writes what it returned to
``RUN_DIR/done.json`` atomically (unless the function wrote ``done.json`` itself). The returned
dict holds the run's final metrics (``test_acc`` at least); they become the run's row in
``results.csv``. An exception leaves no ``done.json``, so a rerun of the sweep retries the run.

Example (what ``benchmarks.run`` does for a preset with ``runner="benchmarks.capaboost:run"``)::

    python -m benchmarks.custom_runner results/capaboost/runs/<run_id>
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks.presets import load_callable
from wtmodels.atomic import atomic_write_json
from wtmodels.cli import exit_with


def run_custom(run_dir: str) -> dict:
    """Call the spec's runner on its config and record ``done.json``; returns its metrics.

    Args:
        run_dir: a run directory holding ``spec.json`` with a ``runner``.

    Returns:
        The dict the runner returned (or ``{"config": ..., ...}`` for dict-like callables).

    Raises:
        ValueError: no runner in the spec, or the runner did not return a dict.

    Example (a runner must return a dict: ``collections.ChainMap(config, run_dir)`` is not one,
    so no ``done.json`` is written and a rerun retries):
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> atomic_write_json(os.path.join(run_dir, "spec.json"),
        ...                   {"run_id": "r0", "runner": "collections:ChainMap", "config": {}})
        >>> run_custom(run_dir)
        Traceback (most recent call last):
            ...
        ValueError: runner: collections:ChainMap returned ChainMap, expected a dict of final metrics
        >>> os.path.exists(os.path.join(run_dir, "done.json"))
        False
    """
    with open(os.path.join(run_dir, "spec.json")) as f:
        spec = json.load(f)
    if not spec.get("runner"):
        raise ValueError(f"runner: {run_dir}/spec.json names no runner")
    fn = load_callable(spec["runner"], f"runner of {spec.get('run_id')}")
    result = fn(dict(spec["config"]), run_dir)
    if not isinstance(result, dict):
        raise ValueError(f"runner: {spec['runner']} returned {type(result).__name__}, "
                         "expected a dict of final metrics")
    done = os.path.join(run_dir, "done.json")
    if not os.path.exists(done):
        atomic_write_json(done, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m benchmarks.custom_runner RUN_DIR``.

    Example (no RUN_DIR: the usage line on stderr, exit status 2):
        >>> main([])
        2
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.custom_runner RUN_DIR", file=sys.stderr)
        return 2
    try:
        run_custom(argv[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_with(main)
