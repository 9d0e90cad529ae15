"""results.csv: each run once, whatever the concurrency and wherever a writer is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

from benchmarks.results_io import append_row, append_rows, finished_ids, read_rows, write_rows


def test_rows_round_trip_with_types_and_text_columns(tmp_path):
    path = tmp_path / "r.csv"
    rows = [{"run_id": "1", "git_sha": "12e4567", "test_acc": 0.875, "depth": 4, "ok": True,
             "mask_density": None}]
    write_rows(path, rows)
    back = read_rows(path)
    assert back == [{"run_id": "1", "git_sha": "12e4567", "test_acc": 0.875, "depth": 4,
                     "ok": True, "mask_density": None}]


def test_append_skips_a_present_id_and_grows_columns(tmp_path):
    path = tmp_path / "r.csv"
    assert append_row(path, {"run_id": "a", "x": 1})
    assert not append_row(path, {"run_id": "a", "x": 2})
    assert append_row(path, {"run_id": "b", "y": 3})
    assert read_rows(path) == [{"run_id": "a", "x": 1, "y": None},
                               {"run_id": "b", "x": None, "y": 3}]
    assert append_rows(path, [{"run_id": "b"}, {"run_id": "c"}, {"run_id": "c"}]) == 1
    assert finished_ids(path) == {"a", "b", "c"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp") or p.endswith(".tmp")]


def _append_many(path: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        append_row(path, {"run_id": f"r{i}", "value": i})


def test_concurrent_appenders_lose_and_double_nothing(tmp_path):
    path = str(tmp_path / "r.csv")
    ctx = multiprocessing.get_context("fork")
    # 4 writers, overlapping id ranges: every id must end up exactly once
    procs = [ctx.Process(target=_append_many, args=(path, 10 * w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [r["run_id"] for r in read_rows(path)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(55))
    assert all(r["value"] == int(r["run_id"][1:]) for r in read_rows(path))


_WRITER = """
import sys
from benchmarks.results_io import append_row
for i in range(int(sys.argv[2])):
    append_row(sys.argv[1], {"run_id": f"r{i}", "payload": "x" * 500, "i": i})
"""


def _rows_so_far(path: str) -> int:
    try:
        with open(path) as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


def test_a_writer_killed_at_any_moment_leaves_a_whole_file_and_a_rerun_completes(tmp_path):
    path = str(tmp_path / "r.csv")
    total, kills = 150, 0
    for delay in (0.0, 0.02):
        already = _rows_so_far(path)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, str(total)])
        deadline = time.monotonic() + 60
        while _rows_so_far(path) < already + 5 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(delay)  # now it is busy appending: kill it wherever it is
        if proc.poll() is None:
            kills += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = read_rows(path)  # always a whole, parseable table
        ids = [r["run_id"] for r in rows]
        assert len(ids) == len(set(ids))
        assert all(r["payload"] == "x" * 500 and r["run_id"] == f"r{r['i']}" for r in rows)
    assert kills == 2  # the writer was killed mid-stream each time
    assert _rows_so_far(path) < total
    subprocess.run([sys.executable, "-c", _WRITER, path, str(total)], check=True)
    assert sorted(r["i"] for r in read_rows(path)) == list(range(total))
