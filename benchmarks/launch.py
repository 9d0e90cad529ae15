"""Launchers: run a function over many tasks, locally or through submitit (Slurm or local).

Every task of a sweep starts its own training process, so the local launcher only has to keep
``jobs`` of them going at once: a pool of ``jobs`` threads, each waiting on its child process,
is a process pool without pickling. ``launcher="submitit"`` hands the tasks to submitit's
``AutoExecutor`` instead: Slurm array jobs where a cluster exists, submitit's local executor
(one subprocess per job, ``jobs`` at a time) where none does.

Example:
    >>> run_tasks(abs, [-1, -2, 3], jobs=2)
    [1, 2, 3]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

LAUNCHERS = ("local", "submitit")
_POLL_S = 0.2  # how often the local submitit launcher checks its jobs


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, jobs: int = 1,
              launcher: str = "local", folder: str | os.PathLike | None = None,
              cluster: str | None = None, timeout_min: int = 240,
              slurm_partition: str | None = None, gpus_per_node: int = 0,
              cpus_per_task: int = 1) -> list[Any]:
    """Call ``fn(task)`` for every task, at most ``jobs`` at a time; results in task order.

    Args:
        fn: a module-level function (submitit pickles it by reference).
        tasks: the arguments, one call each.
        jobs: how many calls run at once.
        launcher: ``"local"`` (threads in this process) or ``"submitit"``.
        folder: submitit's log folder (required with ``launcher="submitit"``).
        cluster: submitit cluster: None picks Slurm when present, else ``"local"``; ``"debug"``
            runs in this process.
        timeout_min: per-job time limit given to submitit.
        slurm_partition: Slurm partition (ignored by the local executor).
        gpus_per_node: GPUs per Slurm job.
        cpus_per_task: CPUs per Slurm job.

    Returns:
        ``[fn(t) for t in tasks]`` (exceptions inside ``fn`` propagate).

    Raises:
        ValueError: unknown launcher, ``jobs < 1``, or submitit without a folder or not
            installed.

    Example:
        >>> run_tasks(str, [1, 2], launcher="local")
        ['1', '2']
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher: unknown {launcher!r}; choose one of: {', '.join(LAUNCHERS)}")
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    tasks = list(tasks)
    if not tasks:
        return []
    if launcher == "local":
        if jobs == 1:
            return [fn(t) for t in tasks]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(fn, tasks))
    if folder is None:
        raise ValueError("folder: submitit needs a folder for its job files and logs")
    try:  # a dev dependency only (pyproject [dev]): a bare ModuleNotFoundError traceback before
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError("launcher submitit needs the submitit package (pip install submitit); "
                         "or use --launcher local") from None
    return _run_submitit(fn, tasks, jobs=jobs, folder=folder, cluster=cluster,
                         timeout_min=timeout_min, slurm_partition=slurm_partition,
                         gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task)


def _run_submitit(fn, tasks, *, jobs, folder, cluster, timeout_min, slurm_partition,
                  gpus_per_node, cpus_per_task) -> list[Any]:
    import submitit

    executor = submitit.AutoExecutor(folder=os.fspath(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": timeout_min, "name": "wtmodels-sweep"}
    if executor.cluster == "slurm":
        params.update(slurm_array_parallelism=jobs, cpus_per_task=cpus_per_task,
                      gpus_per_node=gpus_per_node)
        if slurm_partition:
            params["slurm_partition"] = slurm_partition
        executor.update_parameters(**params)
        return [job.result() for job in executor.map_array(fn, tasks)]
    executor.update_parameters(**params)
    # submitit's local executor starts every submitted job at once: keep `jobs` in flight
    pending = list(enumerate(tasks))
    running: dict[int, Any] = {}
    results: dict[int, Any] = {}
    while pending or running:
        while pending and len(running) < jobs:
            index, task = pending.pop(0)
            running[index] = executor.submit(fn, task)
        finished = [i for i, job in running.items() if job.done()]
        for index in finished:
            results[index] = running.pop(index).result()
        if not finished:
            time.sleep(_POLL_S)
    return [results[i] for i in range(len(tasks))]
