"""Which code and CPU produced a result: the git commit of the checkout the library runs from,
and the vector ISA torch's CPU kernels dispatch to.

Example:
    >>> from wtmodels.provenance import git_sha
    >>> isinstance(git_sha(), str)
    True
"""

from __future__ import annotations

import os
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = "benchmarks/results"  # outputs: edits there do not make the code dirty


def git_sha(root: str = _ROOT) -> str:
    """12-character sha of ``HEAD`` with ``-dirty`` when tracked files other than the results
    under ``benchmarks/results/`` differ (a benchmark rewriting its own results does not make
    the code the next run measures "dirty"); outside a git checkout (an installed wheel, a
    ``git archive`` snapshot) the ``WTMODELS_GIT_SHA`` environment variable, else
    ``"unknown"``.

    Example:
        >>> isinstance(git_sha(), str)
        True
    """
    if not os.path.exists(os.path.join(root, ".git")):
        return os.environ.get("WTMODELS_GIT_SHA", "unknown")
    # git's GIT_DIR, GIT_WORK_TREE, GIT_INDEX_FILE ... point it at another repository: set in
    # a git hook or `git rebase --exec` of another project, they made this the sha (and dirt)
    # of that project's checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True, timeout=10, env=env).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", f":(exclude){RESULTS_DIR}"],
                               cwd=root, check=True, capture_output=True, text=True,
                               timeout=10, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def cpu_isa() -> str:
    """The CPU's vector ISA as torch dispatches to it (``AVX2``, ``AVX512``, ...), with
    `` bf16`` where the CPU has native bf16 (AVX512-BF16 / AMX): without it ``amp`` runs ~20x
    slower than fp32, with it faster; "AMD EPYC" alone does not say which.

    Example:
        >>> import torch
        >>> cpu_isa().split()[0] == torch.backends.cpu.get_cpu_capability()
        True
    """
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    if any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")):
        isa += " bf16"
    return isa
