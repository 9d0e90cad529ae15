"""README walk-through: what a new user running the README's commands met.

`benchmarks.run PRESET --set KEY=VALUE` with a key no setting has (a typo) must name the valid
choices, and those are the keys `--set` accepts: the README says `seed, out, resume, progress,
threads, device` are set by the harness and refused, so the list must not offer them.
"""
import subprocess
import sys

import pytest

from benchmarks.presets import build_runs

HARNESS_SET = {"seed", "out", "resume", "progress", "threads", "device"}


def _listed(message: str) -> set[str]:
    return {k.strip() for k in message.split("valid:", 1)[1].split(",")}


def test_unknown_set_key_lists_only_settable_keys():
    with pytest.raises(ValueError, match=r"unknown setting 'lrr'") as err:
        build_runs("quick", smoke=True, overrides={"lrr": 0.1})
    listed = _listed(str(err.value))
    assert {"lr", "epochs", "f_max_iter", "mask_k", "width"} <= listed  # known settings
    assert not listed & HARNESS_SET, listed & HARNESS_SET
    assert "model_overrides" not in listed  # --set takes flat keys


def test_unknown_set_key_cli_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "quick", "--smoke", "--dry-run",
         "--out", str(tmp_path / "s"), "--set", "lrr=0.1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown setting 'lrr'" in lines[0], proc.stderr
    assert not _listed(lines[0]) & HARNESS_SET
