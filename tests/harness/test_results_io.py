"""results.csv: each run once, whatever the concurrency and wherever a writer is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

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


def test_damaged_results_file_is_a_clear_error_in_every_command(tmp_path, capsys):
    from benchmarks import plot, recommend
    from benchmarks.results_io import read_rows
    from benchmarks.run import main as run_main

    path = tmp_path / "results.csv"
    write_rows(path, [{"run_id": "a", "test_acc": 0.5, "params": 10},
                      {"run_id": "b", "test_acc": 0.6, "params": 20}])
    path.write_text(path.read_text()[:-6])  # the last row cut short, as by a bad copy
    with pytest.raises(ValueError, match="line 3 has 2 cells for 3 columns"):
        read_rows(path)
    assert plot.main([str(tmp_path)]) == 2
    assert recommend.main([str(tmp_path), "--params", "100"]) == 2
    assert run_main(["quick", "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("damaged results file" in line for line in err)
    path.write_bytes(b"run_id,test_acc\n\xff\xfe,1\n")
    with pytest.raises(ValueError, match="not a readable results CSV"):
        read_rows(path)


def test_recovered_row_of_a_run_killed_before_harness_json_has_a_status(tmp_path):
    import json

    from benchmarks.rows import assemble_row

    (tmp_path / "spec.json").write_text(json.dumps({"run_id": "r", "label": "WT",
                                                    "config": {"seed": 0}}))
    (tmp_path / "done.json").write_text(json.dumps({"test_acc": 0.9}))
    assert assemble_row(str(tmp_path))["status"] == "ok"
    (tmp_path / "stopped.json").write_text(json.dumps({"status": "diverged"}))
    assert assemble_row(str(tmp_path))["status"] == "diverged"


@pytest.mark.parametrize("core, blank, kept", [
    ("unrolled", ("f_solver", "grad", "ode_method"), ()),
    ("deq", ("ode_method",), ("f_solver", "grad")),
    ("ode", ("f_solver", "grad"), ("ode_method",)),
])
def test_a_row_leaves_blank_the_settings_its_core_never_reads(tmp_path, core, blank, kept):
    import json

    from benchmarks.rows import assemble_row

    model = {"core": core, "f_solver": "anderson", "grad": "ift", "ode_method": "rk4",
             "mask_k": 0, "mask_density": 0.5}
    (tmp_path / "spec.json").write_text(json.dumps({"run_id": "r", "label": core,
                                                    "config": {"seed": 0}}))
    (tmp_path / "config.json").write_text(json.dumps({"model": model, "epochs": 1}))
    (tmp_path / "done.json").write_text(json.dumps({"test_acc": 0.9}))
    row = assemble_row(str(tmp_path))
    assert row["core"] == core and row["mask_density"] is None
    assert all(row[k] is None for k in blank) and all(row[k] == model[k] for k in kept)
