"""Provenance of benchmark rows: git sha, library versions, device and machine description.

Example:
    >>> info = provenance()
    >>> sorted(info) == ["git_sha", "torch_version"]
    True
    >>> machine = describe_machine()
    >>> machine["cpu_count"] >= 1
    True
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from wtmodels.provenance import cpu_isa, git_sha  # noqa: F401 (cpu_isa: re-exported)

# the most torch threads a benchmark accepts: far more crashed the process (libgomp could not
# create them; --threads 1000000 was a segmentation fault, 1e20 an OverflowError traceback)
MAX_THREADS = 1024


def threads_error(threads: int | None) -> str | None:
    """None where ``threads`` (None: torch's default) is a valid ``--threads``, else the message.

    Example:
        >>> threads_error(2) is None and threads_error(None) is None
        True
        >>> threads_error(0)
        '--threads must be >= 1 and <= 1024, got 0'
    """
    if threads is None or 1 <= threads <= MAX_THREADS:
        return None
    return f"--threads must be >= 1 and <= {MAX_THREADS}, got {threads}"


def check_writable(out: str | os.PathLike) -> None:
    """Check that the directory ``out`` takes files, before any measuring: one that cannot be
    written (read-only, ``/proc``) otherwise failed only when the run wrote its results,
    minutes later. Raises ``OSError`` with a one-line message naming ``--out``.

    Example:
        >>> check_writable("/proc")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        OSError: --out /proc is not writable: ...
    """
    try:
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise OSError(f"--out {os.fspath(out)} is not writable: {err.strerror or err}") from None


def make_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (and its parents), :func:`check_writable` it and return it with a leading
    ``~`` expanded (``--out=~/x``: no shell expands it, and a directory named ``~`` was made).
    Raises ``ValueError`` for an empty path (an unset shell variable, not the current
    directory) and ``OSError`` with a one-line message naming ``--out``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     make_out_dir(os.path.join(d, "a", "b")).is_dir()
        True
    """
    if not os.fspath(out).strip():
        raise ValueError("--out: empty path; give the output directory")
    out = Path(os.path.expanduser(os.fspath(out)))
    if out.exists() and not out.is_dir():  # makedirs would say only "File exists"
        raise OSError(f"--out {os.fspath(out)} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:  # a file in the way, no permission
        raise OSError(f"--out {os.fspath(out)} cannot be created: {err.strerror or err}"
                      ) from None
    check_writable(out)
    return out


def package_version(package: str) -> str:
    """The installed version of ``package`` (pip's metadata), ``"absent"`` where it is not.

    Example:
        >>> package_version("no-such-package-here")
        'absent'
    """
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def provenance() -> dict:
    """The sweep-wide provenance columns (cheap: no torch import).

    Example:
        >>> provenance()["torch_version"] != ""
        True
    """
    return {"git_sha": git_sha(), "torch_version": package_version("torch")}


def now_utc() -> str:
    """The current UTC time as ISO 8601, seconds resolution.

    Example:
        >>> now_utc().endswith("+00:00")
        True
    """
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cpuinfo_field(key: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The value of the first ``key : value`` line of ``cpuinfo``; None where there is none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


#: /proc/cpuinfo flags that decide which vector kernels torch and oneDNN run
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_vector_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vector-extension flags among :data:`VECTOR_FLAGS` (from ``cpuinfo``, without
    importing torch), space-separated; ``"unknown"`` where that file or its flags are missing.

    A seeded CPU run is bit-identical on the same machine, but another vector ISA (AVX2 here,
    AVX-512 there) rounds differently and training amplifies it: "AMD EPYC" alone does not say
    which the numbers came from.

    Example:
        >>> flags = cpu_vector_flags()
        >>> flags == "unknown" or set(flags.split()) <= set(VECTOR_FLAGS)
        True
    """
    flags = _cpuinfo_field("flags", cpuinfo)
    if flags is None:
        return "unknown"
    present = set(flags.split())
    return " ".join(flag for flag in VECTOR_FLAGS if flag in present)


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report it).

    Example:
        >>> load_average() is None or load_average() >= 0
        True
    """
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe_machine(sha: str | None = None) -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, OS, Python, torch, GPU.

    ``sha``: the ``git_sha()`` of the code measured, taken when the run started (default: now;
    a file edited or a commit made during a long run made the results claim code that was not
    the one measured).

    Example:
        >>> "cpu_model" in describe_machine()
        True
    """
    info = {
        "date": now_utc(),
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_vector_flags(),
        "cpu_count": os.cpu_count() or 1,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "load_average_1min": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch_version": package_version("torch"),
        "torchvision_version": package_version("torchvision"),
        "git_sha": git_sha() if sha is None else sha,
    }
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        # a failing nvidia-smi (no driver: exit 9, no device: 6) says why on stdout
        info["gpus"] = ([g.strip() for g in out.stdout.splitlines() if g.strip()]
                        if out.returncode == 0 else [])
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    return info
