"""Run a sweep preset: ``python -m benchmarks.run PRESET --out DIR``.

Each run is one process (``python -m wtmodels.train``, or :mod:`benchmarks.custom_runner` for a
preset with its own runner) writing ``DIR/runs/<run_id>/``. When a run has finished (its
``done.json`` exists) its row is appended to ``DIR/results.csv`` under a lock, by an atomic
rewrite, unless the ``run_id`` is already there. A rerun of the same command therefore skips the
finished runs, records a run that finished just before a kill, resumes a run that has a
checkpoint, and restarts one that has none: whenever the sweep is killed, the rerun ends with
every run present in ``results.csv`` exactly once.

After the runs: the post-hoc test-time depth extrapolation (presets that ask for it, written to
``DIR/extrapolation.csv``), the plots and the summary table (:mod:`benchmarks.plot`), and a
Markdown summary printed on stdout with the harness's own overhead.

Command line::

    python -m benchmarks.run quick --out results/quick            # the README's main job
    python -m benchmarks.run depth --out results/depth --seeds 0,1 --jobs 2
    python -m benchmarks.run cifar10 --out results/c10 --launcher submitit --gpus-per-node 1
    python -m benchmarks.run sparsity --out results/sp --dry-run  # list the runs, run nothing
    python -m benchmarks.run quick --out /tmp/q --smoke           # the tiny size the tests use
    python -m benchmarks.run my_sweeps:ablation --out results/abl # @preset in your own module

Example:
    >>> import tempfile
    >>> report = sweep("quick", tempfile.mkdtemp(), smoke=True, dry_run=True, echo=lambda s: None)
    >>> report.planned == len(build_runs("quick", smoke=True)) and report.ran == 0
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from benchmarks.aggregate import check_statuses
from benchmarks.launch import LAUNCHERS, run_tasks
from benchmarks.presets import RunSpec, build_runs, config_id_for, get_preset, list_presets
from benchmarks.provenance import (
    describe_machine,
    load_average,
    now_utc,
    provenance,
    threads_error,
)
from benchmarks.results_io import (
    SETTING,
    append_row,
    finished_ids,
    lock_path,
    order_rows,
    read_rows,
)
from benchmarks.rows import assemble_row
from wtmodels.atomic import atomic_write_json
from wtmodels.cli import DashValueParser, exit_with

RESULTS = "results.csv"
RUNS = "runs"
LOG = "train.log"
DONE = "done.json"  # written by the trainer when every epoch is done
STOPPED = "stopped.json"  # the trainer gave up on non-finite losses (it or we write it)
EXIT_DIVERGED = 3  # python -m wtmodels.train's status for "stopped: non-finite losses"
#: submitit's options where the command line gives none
SUBMITIT_DEFAULTS = {"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 240}


@dataclass(frozen=True)
class RunTask:
    """Everything one worker needs to run and record one run (picklable for submitit).

    Args:
        spec: the run (:class:`benchmarks.presets.RunSpec` as a dict).
        sweep_dir: the sweep directory.
        threads: torch CPU threads for the run's process.
        provenance: sweep-wide columns added to the row.
        device: ``--device`` for the training CLI (None: its default).
        verbose: print one line when the run ends.

    Example (picklable: submitit sends it to the worker as is):
        >>> import pickle
        >>> task = RunTask(build_runs("quick", smoke=True)[0].to_json(), "out", threads=2)
        >>> pickle.loads(pickle.dumps(task)) == task, task.spec["config"]["model"]
        (True, 'test_wt')
    """

    spec: dict
    sweep_dir: str
    threads: int | None = 1
    provenance: dict = field(default_factory=dict)
    device: str | None = None
    verbose: bool = False


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run.

    Attributes:
        run_id: the run.
        status: ``"ran"``, ``"diverged"`` (ran, stopped by non-finite losses),
            ``"recorded"`` (finished earlier, row added now), ``"busy"`` (another process
            holds it), ``"failed"``.
        wall_s: seconds in the run's process (0 when it did not run now).
        harness_s: seconds the harness spent on the run outside that process.
        message: the failure's last log line, or "".
        cpu_s: CPU seconds of the run's process (0 when it did not run now).

    Example:
        >>> outcome = RunOutcome("wt_d2_s0", "failed", 3.5, 0.1, "exit 1: out of memory")
        >>> outcome.status, outcome.cpu_s
        ('failed', 0.0)
    """

    run_id: str
    status: str
    wall_s: float = 0.0
    harness_s: float = 0.0
    message: str = ""
    cpu_s: float = 0.0


@dataclass
class SweepReport:
    """Summary of one ``sweep`` call (printed at the end of the command).

    Attributes:
        planned: runs in the preset.
        skipped: runs already in results.csv.
        ran: runs executed now.
        diverged: of those, runs the trainer stopped for non-finite losses (recorded).
        busy: runs another process was executing (left alone).
        recorded: finished runs whose row was missing and was added.
        failed: outcomes of the runs that failed.
        runs_wall_s: sum of the run processes' wall times.
        runs_cpu_s: sum of their CPU times (what the runs cost, whatever else the machine ran).
        harness_s: time the harness itself spent around the runs.
        sweep_wall_s: wall time of the run phase.
        post_s: seconds in extrapolation, plots and the summary.

    Example:
        >>> SweepReport(planned=2, ran=2, runs_wall_s=10.0, harness_s=0.5).overhead
        0.05
        >>> SweepReport().overhead  # nothing ran
        0.0
    """

    planned: int = 0
    skipped: int = 0
    ran: int = 0
    diverged: int = 0
    busy: int = 0
    recorded: int = 0
    failed: list[RunOutcome] = field(default_factory=list)
    runs_wall_s: float = 0.0
    runs_cpu_s: float = 0.0
    harness_s: float = 0.0
    sweep_wall_s: float = 0.0
    post_s: float = 0.0

    @property
    def overhead(self) -> float:
        """Harness time as a share of the runs' own time (0 when nothing ran)."""
        return self.harness_s / self.runs_wall_s if self.runs_wall_s > 0 else 0.0


def run_dir_of(sweep_dir: str, run_id: str) -> str:
    """``sweep_dir/runs/run_id``.

    Example:
        >>> run_dir_of("out", "wt_d2_s0_ab")
        'out/runs/wt_d2_s0_ab'
    """
    return os.path.join(sweep_dir, RUNS, run_id)


def _flag(key: str, value) -> list[str]:
    name = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [name] if value else ["--no-" + key.replace("_", "-")]
    # one word: a value starting with '-' (--set data_dir=-d) was read as an option
    return [f"{name}={value}"]


def train_command(config: dict, run_dir: str, *, resume: bool, threads: int | None = None,
                  device: str | None = None) -> list[str]:
    """The ``python -m wtmodels.train`` command line of one run.

    Args:
        config: the run's arguments (TrainConfig and ModelConfig fields).
        run_dir: ``--out``.
        resume: add ``--resume`` (the run directory holds a checkpoint).
        threads: ``--threads``.
        device: ``--device``.

    Example:
        >>> cmd = train_command({"model": "wt_s", "mask_k": 2, "augment": False}, "r", resume=True)
        >>> cmd[3:]  # doctest: +NORMALIZE_WHITESPACE
        ['--out=r', '--progress', 'none', '--model=wt_s', '--mask-k=2', '--no-augment',
         '--resume']
    """
    cmd = [sys.executable, "-m", "wtmodels.train", f"--out={run_dir}", "--progress", "none"]
    for key, value in config.items():
        cmd += _flag(key, value)
    cmd += _flag("threads", threads) + _flag("device", device)
    if resume:
        cmd.append("--resume")
    return cmd


def custom_command(run_dir: str) -> list[str]:
    """The command line of a run with a custom runner (see :mod:`benchmarks.custom_runner`).

    Example:
        >>> custom_command("r")[1:]
        ['-m', 'benchmarks.custom_runner', 'r']
    """
    return [sys.executable, "-m", "benchmarks.custom_runner", run_dir]


def validate_runs(runs: list[RunSpec]) -> None:
    """Check every training run's arguments before anything starts (a typo in ``--set`` or a
    preset fails here, not in the middle of a sweep).

    Raises:
        ValueError: an unknown argument or a bad value, naming the run.

    Example:
        >>> validate_runs([RunSpec("r", "WT", {"model": "test_wt", "depth": 0})])
        Traceback (most recent call last):
        ...
        ValueError: run r: depth must be an integer >= 1, got 0
    """
    from wtmodels.data import list_datasets
    from wtmodels.models import get_config
    from wtmodels.train_config import resolve_config, settings_without_effect

    for run in runs:
        if run.runner is not None:  # a custom runner's own check_config, if it has one
            module = importlib.import_module(run.runner.split(":")[0])
            check = getattr(module, "check_config", None)
            try:
                if check is not None:
                    check(dict(run.config))
            except ValueError as err:
                raise ValueError(f"run {run.run_id}: {err}") from None
            continue
        try:
            cfg = resolve_config(dict(run.config))
            get_config(cfg.model, **cfg.model_overrides)
            ignored = settings_without_effect(cfg)  # the trainer would refuse the run
            if ignored:
                raise ValueError("it would silently ignore " + ", ".join(
                    f"{name} ({why})" for name, why in ignored.items()))
            if cfg.dataset not in list_datasets():
                raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of: "
                                 f"{', '.join(list_datasets())}")
        except ValueError as err:
            raise ValueError(f"run {run.run_id}: {err}") from None


def _runs_here(launcher: str, launcher_options: dict | None) -> bool:
    """Whether the runs execute on this machine: not for submitit jobs sent to Slurm, whose
    submit host usually has no GPU (each job's ``wtmodels.train`` checks its own device)."""
    if launcher != "submitit":
        return True
    cluster = (launcher_options or {}).get("cluster")
    if cluster is None:  # submitit picks Slurm where it is installed
        return not (shutil.which("sbatch") or shutil.which("srun"))
    return cluster in ("local", "debug")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_same_setting(out: str, smoke: bool, overrides: dict, write: bool,
                        planned_configs: Collection[str] | None = None,
                        rows: Collection[dict] = ()) -> None:
    """Refuse to mix sweeps of another size or other ``--set`` values into one directory:
    plots, the summary and ``recommend`` would pool them. Records the setting on first use.

    A directory with sweep rows but no recorded setting (older versions wrote none) is taken on
    only when every one of its ``rows`` with a ``config_id`` is one of ``planned_configs`` (this
    sweep's configurations, any seed): the other rows' setting is unknown.
    Rows written by hand (without a ``config_id``) are taken on as they are."""
    path = os.path.join(out, SETTING)
    setting = {"smoke": bool(smoke), "overrides": {k: overrides[k] for k in sorted(overrides)}}
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        saved = None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from None
    if saved is not None and saved != setting:
        raise ValueError(
            f"--out {out} holds sweeps with {_describe(saved)}, not {_describe(setting)}: one "
            "directory holds one setting (its plots and tables pool every row); use another "
            "--out")
    if saved is None and planned_configs is not None:
        strangers = [r for r in rows  # a sweep's rows
                     if r.get("config_id") is not None and r["config_id"] not in planned_configs]
        if strangers:
            raise ValueError(
                f"--out {out} holds {len(strangers)} results row(s) this sweep "
                f"({_describe(setting)}) would not produce (e.g. {strangers[0].get('run_id')!r}) "
                f"and no {SETTING} saying their setting (older versions wrote none): its plots "
                "and tables would pool them; use another --out, or, if they share this "
                f"setting, write {json.dumps(setting)} to {path}")
    if saved is None and write:
        try:
            os.makedirs(out, exist_ok=True)
            atomic_write_json(path, setting)
        except OSError as err:  # a read-only place, a path under a file, /proc ...
            raise ValueError(f"--out {out} cannot be created: {err.strerror or err}") from None


def _describe(setting: dict) -> str:
    sets = " ".join(f"--set {k}={v}" for k, v in setting["overrides"].items())
    size = "--smoke" if setting["smoke"] else "full size (no --smoke)"
    return f"{size} and {sets}" if sets else f"{size} and no --set"


def run_state(sweep_dir: str, run_id: str, recorded: set[str]) -> str:
    """``"recorded"`` (row in results.csv), ``"finished"`` (done.json, no row yet),
    ``"partial"`` (a checkpoint to resume) or ``"todo"``.

    Example:
        >>> run_state("/nonexistent", "x", set())
        'todo'
    """
    if run_id in recorded:
        return "recorded"
    run_dir = run_dir_of(sweep_dir, run_id)
    if _finished(run_dir):
        return "finished"
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return "partial"
    return "todo"


def _finished(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, name)) for name in (DONE, STOPPED))


@functools.cache
def _die_with_parent():
    """A ``preexec_fn`` for a child to get SIGKILL when the launching thread dies (Linux), so a
    killed sweep leaves no orphaned training process writing into its run directory; ``None``
    where ``prctl`` is missing.

    libc is loaded here, in the parent, once: the child (forked from a process whose other
    threads may hold the dynamic loader's lock, with ``--jobs`` > 1) only makes the call."""
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    death_signal = int(signal.SIGKILL)

    def set_death_signal() -> None:
        prctl(1, death_signal)  # PR_SET_PDEATHSIG

    return set_death_signal


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:300] if lines else ""


def _record(task: RunTask, run_dir: str) -> None:
    row = assemble_row(run_dir, task.provenance)
    append_row(os.path.join(task.sweep_dir, RESULTS), row)


def execute_run(task: RunTask) -> RunOutcome:
    """Run one run in its own process if it has not finished, then record its row.

    Safe to call again after a kill at any point: a finished run is only recorded (once), a run
    with a checkpoint resumes, a run without one starts over in a clean directory. A run that
    another process is executing right now (its lock is held) is left alone (``"busy"``). A
    training stopped by non-finite losses (exit status 3) is a result: it is recorded with
    ``status = "diverged"`` and not retried.

    Args:
        task: the run and where to put it.

    Returns:
        A :class:`RunOutcome`; failures are reported, not raised.

    Example (training runs in a child process and takes seconds; a run whose lock another
    process holds is left alone):
        >>> import tempfile
        >>> spec = build_runs("quick", smoke=True)[0]
        >>> sweep_dir = tempfile.mkdtemp()
        >>> run_dir = run_dir_of(sweep_dir, spec.run_id)
        >>> os.makedirs(os.path.dirname(run_dir))
        >>> with open(lock_path(run_dir), "w") as held:  # as another sweep would hold it
        ...     fcntl.flock(held, fcntl.LOCK_EX)
        ...     outcome = execute_run(RunTask(spec.to_json(), sweep_dir))
        >>> outcome.status, outcome.message
        ('busy', 'another process is running it')
    """
    outcome = _execute(task)
    if task.verbose:
        print(f"  {outcome.status:>8}  {outcome.run_id}  {outcome.wall_s:6.1f} s"
              + (f"  {outcome.message}" if outcome.message else ""), flush=True)
    return outcome


def _execute(task: RunTask) -> RunOutcome:
    start = time.perf_counter()
    spec = RunSpec(**task.spec)
    run_dir = run_dir_of(task.sweep_dir, spec.run_id)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    lock_fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return RunOutcome(spec.run_id, "busy", 0.0, time.perf_counter() - start,
                              "another process is running it")
        if _finished(run_dir):
            _record(task, run_dir)
            return RunOutcome(spec.run_id, "recorded", 0.0, time.perf_counter() - start)
        code, wall, cpu, resumed = _launch(task, spec, run_dir)
        if code == EXIT_DIVERGED and spec.runner is None:
            if not os.path.exists(os.path.join(run_dir, STOPPED)):  # the trainer's own is fuller
                atomic_write_json(os.path.join(run_dir, STOPPED), {
                    "status": "diverged", "reason": _last_line(os.path.join(run_dir, LOG))})
        elif code != 0 or not os.path.exists(os.path.join(run_dir, DONE)):
            why = _last_line(os.path.join(run_dir, LOG)) or f"exit status {code}"
            return RunOutcome(spec.run_id, "failed", wall, time.perf_counter() - start - wall,
                              f"exit {code}: {why} (log: {os.path.join(run_dir, LOG)})")
        status = "ok" if code == 0 else "diverged"
        atomic_write_json(os.path.join(run_dir, "harness.json"), {
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "threads": task.threads,
            "status": status,
            "load_average_1min": load_average(), "date": now_utc(), "resumed": resumed})
        _record(task, run_dir)
        return RunOutcome(spec.run_id, "ran" if code == 0 else "diverged", wall,
                          time.perf_counter() - start - wall, cpu_s=cpu)
    finally:
        os.close(lock_fd)


# set by torchrun / a DDP job: a sweep started inside one must not make every run join it
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                      "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of one training process: this one's, with ``threads`` for OpenMP / MKL
    and without torchrun's variables (a sweep started inside a torchrun / DDP job would give
    each run that job's ``WORLD_SIZE`` and ``RANK``, and each would wait to join it).

    Example:
        >>> env = child_env(1)
        >>> "RANK" in env, env["OMP_NUM_THREADS"]
        (False, '1')
    """
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _launch(task: RunTask, spec: RunSpec, run_dir: str) -> tuple[int, float, float, bool]:
    """Start the run's process (resuming when there is a checkpoint) and wait for it.

    Returns:
        ``(exit status, wall seconds, CPU seconds of the process, resumed)``.
    """
    resume = spec.runner is None and os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    if not resume and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # started but left nothing to resume: start clean
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "spec.json"), spec.to_json())
    if spec.runner is None:
        cmd = train_command(spec.config, run_dir, resume=resume, threads=task.threads,
                            device=task.device)
    else:
        cmd = custom_command(run_dir)
    env = child_env(task.threads)
    with open(os.path.join(run_dir, LOG), "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        run_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent())
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
        except BaseException:
            proc.kill()
            raise
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - run_start
    return code, wall, usage.ru_utime + usage.ru_stime, resume


def sweep(preset: str, out: str, *, smoke: bool = False, seeds: list[int] | None = None,
          jobs: int | None = None, launcher: str = "local", threads: int | None = None,
          device: str | None = None, dry_run: bool = False, plots: bool = True,
          extrapolation: bool = True, only: str | None = None,
          overrides: dict | None = None, launcher_options: dict | None = None,
          echo=print) -> SweepReport:
    """Run (or list) the runs of ``preset`` into ``out``; see the module docstring.

    Args:
        preset: a name of :func:`benchmarks.presets.list_presets`, or ``"module:name"`` for
            a preset that ``module`` defines with :func:`benchmarks.presets.preset`.
        out: the sweep directory.
        smoke: the preset's tiny size.
        seeds: override the preset's seeds.
        jobs: runs at once (default: the preset's).
        launcher: ``"local"`` or ``"submitit"``.
        threads: torch threads per run (default: the preset's).
        device: ``--device`` for every run.
        dry_run: list the runs and their state; run and write nothing.
        plots: draw the plots and summary table at the end.
        extrapolation: run the preset's test-time depth extrapolation at the end.
        only: run only the runs whose id contains this text.
        overrides: arguments set in every run (``--set key=value``).
        launcher_options: extra keyword arguments of :func:`benchmarks.launch.run_tasks`.
        echo: where progress lines go.

    Returns:
        A :class:`SweepReport`.

    Example:
        >>> import tempfile
        >>> sweep("depth", tempfile.mkdtemp(), smoke=True, dry_run=True, echo=lambda *a: None).ran
        0
    """
    spec = get_preset(preset)
    if not str(out).strip():  # an unset shell variable: not the current directory
        raise ValueError("--out: empty path; give the sweep directory")
    out = os.path.expanduser(out)  # --out=~/x: no shell expands it (it made a '~' directory)
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher: unknown {launcher!r}; choose one of: {', '.join(LAUNCHERS)}")
    jobs = spec.jobs if jobs is None else jobs
    threads = spec.threads if threads is None else threads
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    if message := threads_error(threads):  # OMP_NUM_THREADS=100000 crashed every run
        raise ValueError(message)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    parent = os.path.abspath(out)  # a path under a file: reading results.csv raised
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out} cannot be created: {parent} is not a directory")
    if only is not None and not only.strip():  # an unset shell variable picked every run
        raise ValueError("--only: empty text; give part of the run ids to run (--dry-run "
                         "lists them)")
    runs = build_runs(preset, smoke=smoke, seeds=seeds, overrides=overrides)
    planned_ids = [r.run_id for r in runs]  # the preset's order, --only or not
    planned_configs = {config_id_for(r.label, r.config) for r in runs}  # any seed
    if only:
        matching = [r for r in runs if only in r.run_id]
        if not matching:
            raise ValueError(f"--only {only!r} matches none of the {len(runs)} run ids of "
                             f"{preset!r} (e.g. {runs[0].run_id})")
        runs = matching
        # build_runs refuses a --set no run of the preset reads; among the runs --only picks,
        # one that none of them reads would be silently ignored as well
        unread = sorted(k for k in overrides or {} if not any(k in r.config for r in runs))
        if unread:
            raise ValueError(f"--set: none of the {len(runs)} run(s) --only {only!r} picks "
                             f"reads {', '.join(unread)} (their models would silently ignore "
                             "it)")
    validate_runs(runs)
    if device == "cuda" and _runs_here(launcher, launcher_options) and not _cuda_available():
        raise ValueError("--device cuda but no CUDA device is available")
    # the values as the runs read them (--set lr=.01 and lr=0.01 are one setting, one run id)
    setting = {k: next((r.config[k] for r in runs if k in r.config), v)
               for k, v in (overrides or {}).items()}
    # a damaged results file, or a status the report would refuse, stops the sweep now, not
    # after its runs
    existing = read_rows(os.path.join(out, RESULTS))
    check_statuses(existing)
    recorded = finished_ids(os.path.join(out, RESULTS))
    _check_same_setting(out, smoke, setting, write=not dry_run,
                        planned_configs=planned_configs, rows=existing)
    report = SweepReport(planned=len(runs))
    states = {r.run_id: run_state(out, r.run_id, recorded) for r in runs}
    if dry_run:
        _list(runs, states, echo)
        return report
    setup_start = time.perf_counter()
    os.makedirs(os.path.join(out, RUNS), exist_ok=True)
    prov = provenance()
    todo = [r for r in runs if states[r.run_id] != "recorded"]
    if todo:  # describe the machine the runs are measured on (kept when a rerun runs nothing)
        atomic_write_json(os.path.join(out, "machine.json"), {
            **describe_machine(), "preset": preset, "smoke": smoke, "jobs": jobs,
            "threads_per_run": threads, "launcher": launcher})
    report.skipped = len(runs) - len(todo)
    echo(f"{preset}: {len(runs)} runs, {report.skipped} already recorded, {len(todo)} to go "
         f"({jobs} at a time, {threads} thread(s) each) -> {out}")
    tasks = [RunTask(dataclasses.asdict(r), out, threads, prov, device, echo is print)
             for r in todo]
    setup_s = time.perf_counter() - setup_start
    phase_start = time.perf_counter()
    outcomes = run_tasks(execute_run, tasks, jobs=jobs, launcher=launcher,
                         folder=os.path.join(out, "submitit"), **(launcher_options or {}))
    report.sweep_wall_s = time.perf_counter() - phase_start + setup_s
    _tally(report, outcomes)
    # parallel runs were appended as they finished: put the rows in the preset's order, so
    # that the summary table and the figures list the configurations alike in every rerun
    order_rows(os.path.join(out, RESULTS), planned_ids)
    report.harness_s += setup_s
    if jobs == 1 and launcher == "local":  # sequential: everything outside the runs is ours
        report.harness_s = report.sweep_wall_s - report.runs_wall_s
    post_start = time.perf_counter()
    if spec.extrapolate and extrapolation:
        from benchmarks.extrapolate import extrapolate_sweep

        extrapolate_sweep(out, spec.extrapolate, threads=jobs * (threads or 1), device=device,
                          echo=echo)
    if plots:
        from benchmarks.plot import make_report

        paths, table = make_report(out)
        echo(table)
        echo(f"plots: {', '.join(os.path.basename(p) for p in paths) or 'none'}")
    report.post_s = time.perf_counter() - post_start
    if report.ran:
        _save_timing(out, report)
    return report


def _list(runs: list[RunSpec], states: dict[str, str], echo) -> None:
    for r in runs:
        echo(f"{states[r.run_id]:>9}  {r.run_id:<40} {r.label:<22} "
             + " ".join(f"{k}={v}" for k, v in r.config.items()))
    echo(f"{len(runs)} runs: " + ", ".join(
        f"{sum(s == k for s in states.values())} {k}"
        for k in ("recorded", "finished", "partial", "todo")))


def _tally(report: SweepReport, outcomes: list[RunOutcome]) -> None:
    for outcome in outcomes:
        report.runs_wall_s += outcome.wall_s
        report.runs_cpu_s += outcome.cpu_s
        report.harness_s += outcome.harness_s
        if outcome.status in ("ran", "diverged"):
            report.ran += 1
            report.diverged += outcome.status == "diverged"
        elif outcome.status == "recorded":
            report.recorded += 1
        elif outcome.status == "busy":
            report.busy += 1
        else:
            report.failed.append(outcome)


def _save_timing(out: str, report: SweepReport) -> None:
    timing = {k: v for k, v in dataclasses.asdict(report).items() if k != "failed"}
    timing.update(failed=[o.run_id for o in report.failed], harness_overhead=report.overhead,
                  date=now_utc(), load_average_1min_at_end=load_average())
    atomic_write_json(os.path.join(out, "harness_timing.json"), timing)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds: expected integers like 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds: expected integers >= 0 like 0,1,2, got {text!r}")
    return seeds


def _setting(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"set: expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


class _Parser(DashValueParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m benchmarks.run``.

    Example:
        >>> args = build_parser().parse_args(["quick", "--out", "o", "--seeds", "0,2", "--smoke"])
        >>> args.preset, args.seeds, args.smoke, args.launcher
        ('quick', [0, 2], True, 'local')
    """
    p = _Parser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help=f"one of: {', '.join(list_presets())}; or MODULE:NAME, a "
                   "preset your own module defines with @preset (see benchmarks.presets)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--jobs", type=int, help="runs at once (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the preset's)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--cluster", help="submitit cluster (default: slurm if present, else local)")
    p.add_argument("--partition", help="Slurm partition (submitit)")
    default = SUBMITIT_DEFAULTS
    p.add_argument("--gpus-per-node", type=int,
                   help=f"GPUs per Slurm job (submitit; default {default['gpus_per_node']})")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPUs per Slurm job (submitit; default {default['cpus_per_task']})")
    p.add_argument("--timeout-min", type=int,
                   help=f"per-job limit in minutes (submitit; default {default['timeout_min']})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device of each run")
    p.add_argument("--only", help="run only the runs whose id contains this text")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="set a training argument in every run, e.g. --set data_dir=/data "
                        "(JSON values: --set epochs=2); part of the run ids")
    p.add_argument("--smoke", action="store_true", help="the preset's tiny size (for tests)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    p.add_argument("--no-plots", action="store_true", help="skip plots and the summary table")
    p.add_argument("--no-extrapolation", action="store_true",
                   help="skip the test-time depth extrapolation")
    return p


def _launcher_options(args: argparse.Namespace) -> dict:
    """submitit's options from the command line; refused (ValueError) with the local launcher,
    where they would do nothing, and when out of range."""
    given = {flag: value for flag, value in (
        ("--cluster", args.cluster), ("--partition", args.partition),
        ("--gpus-per-node", args.gpus_per_node), ("--cpus-per-task", args.cpus_per_task),
        ("--timeout-min", args.timeout_min)) if value is not None}
    if args.launcher != "submitit":
        if given:
            raise ValueError(f"{', '.join(given)}: only with --launcher submitit (the local "
                             "launcher would ignore it)")
        return {}
    for flag, low in (("--gpus-per-node", 0), ("--cpus-per-task", 1), ("--timeout-min", 1)):
        if flag in given and given[flag] < low:
            raise ValueError(f"{flag}: must be >= {low}, got {given[flag]}")
    options = dict(SUBMITIT_DEFAULTS, cluster=args.cluster, slurm_partition=args.partition)
    options.update({key: value for key, value in (
        ("gpus_per_node", args.gpus_per_node), ("cpus_per_task", args.cpus_per_task),
        ("timeout_min", args.timeout_min)) if value is not None})
    return options


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if a run failed).

    Example (``--dry-run`` lists the runs and their state, here the one whose id holds
    ``ode_``; bad input: one line on stderr, exit status 2):
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> main(["deq_vs_wt", "--out", out, "--smoke", "--dry-run", "--only", "ode_"])
        ... # doctest: +ELLIPSIS
             todo  ode_w8_s0_41bf2713   ... model=test_ode width=8 ... seed=0
        1 runs: 0 recorded, 0 finished, 0 partial, 1 todo
        0
        >>> main(["deq_vs_wt", "--out", out, "--smoke", "--jobs", "0"])
        2
    """
    args = build_parser().parse_args(argv)
    try:
        options = _launcher_options(args)
        keys = [key for key, _ in args.set]
        if repeated := sorted({key for key in keys if keys.count(key) > 1}):
            raise ValueError(f"--set: {', '.join(repeated)} given more than once (one value "
                             "per key)")
        report = sweep(args.preset, args.out, smoke=args.smoke, seeds=args.seeds, jobs=args.jobs,
                       launcher=args.launcher, threads=args.threads, device=args.device,
                       dry_run=args.dry_run, plots=not args.no_plots,
                       extrapolation=not args.no_extrapolation, only=args.only,
                       overrides=dict(args.set), launcher_options=options)
    except ValueError as err:
        print(f"python -m benchmarks.run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what is recorded stays; the rerun finishes the rest
        print("python -m benchmarks.run: interrupted; rerun the same command to finish the "
              "sweep (recorded runs are kept, a run with a checkpoint resumes)", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    print(f"ran {report.ran} ({report.diverged} diverged), recorded {report.recorded}, skipped "
          f"{report.skipped}, busy elsewhere {report.busy}, failed "
          f"{len(report.failed)}; runs {report.runs_wall_s:.1f} s ({report.runs_cpu_s:.1f} "
          f"CPU s), harness "
          f"{report.harness_s:.2f} s ({100 * report.overhead:.2f}% of the runs), "
          f"extrapolation + plots {report.post_s:.1f} s")
    for outcome in report.failed:
        print(f"failed: {outcome.run_id}: {outcome.message}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    exit_with(main)
