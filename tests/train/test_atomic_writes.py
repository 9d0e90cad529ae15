"""Atomic writes: readers see the old or the new file, with the permissions a plain write gives."""

import os
import stat

import pytest

from wtmodels import atomic


def test_written_files_get_the_mode_of_a_plain_write(tmp_path):
    target = tmp_path / "results.csv"
    atomic.atomic_write_text(target, "a,b\n")
    plain = tmp_path / "plain.csv"
    plain.write_text("a,b\n")
    assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    atomic.atomic_write_text(target, "old\n")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(target, boom)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]
