"""Crash-safe results files: atomic writes, a lock, and a CSV that holds each run once.

A sweep directory's ``results.csv`` is rewritten whole on every append: the new content goes to
a temporary file in the same directory, is flushed and fsync'ed, then ``os.replace``'d over the
old one. A reader (or a sweep killed at any moment) therefore sees either the old table or the
new one, never half a row. Appends from several processes (``--jobs N``, submitit array jobs)
are serialised with an exclusive ``fcntl`` lock on ``.results.csv.lock``, and a row whose
``run_id`` is already present is not written again: a sweep rerun after a kill ends with every
finished run present exactly once.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> path = os.path.join(d, "results.csv")
    >>> append_row(path, {"run_id": "a", "test_acc": 0.9})
    True
    >>> append_row(path, {"run_id": "a", "test_acc": 0.5})   # already there: skipped
    False
    >>> [r["test_acc"] for r in read_rows(path)]
    [0.9]
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence

from wtmodels.atomic import atomic_write_text

#: Column that identifies a run; a results file holds each value once.
RUN_ID = "run_id"

#: Columns always read back as text, even when they look like numbers (a git sha such as
#: ``"12e4567"`` would otherwise parse as a float, and the next append wrote it back as
#: ``inf``; ``"000000012345"`` lost its zeros).
TEXT_COLUMNS = frozenset(
    {RUN_ID, "key", "config_id", "git_sha", "run_git_sha", "model", "dataset", "label", "core",
     "torch_version", "device", "date", "f_solver", "b_solver", "grad", "mask_kind", "host",
     "runner", "status", "data_dir", "resumed_with", "cpu_isa", "cpu_flags"}
)


#: A sweep directory's setting (``--smoke`` or not, the ``--set`` values), from its first sweep
SETTING = "sweep_setting.json"


def setting_note(sweep_dir: str | os.PathLike, leave_out: Iterable[str] = ()) -> str:
    """What a sweep directory's :data:`SETTING` adds to its tables and figures: ``"smoke size"``
    and the ``--set`` values but those in ``leave_out`` (named elsewhere), ``""`` for a
    full-size sweep without any (or no readable file).

    Example:
        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with open(os.path.join(d, SETTING), "w") as f:
        ...     json.dump({"smoke": False, "overrides": {"lr": 0.003, "epochs": 4}}, f)
        >>> setting_note(d)
        '--set lr=0.003 epochs=4'
    """
    try:
        with open(os.path.join(sweep_dir, SETTING)) as f:
            setting = json.load(f)
        overrides = setting.get("overrides") or {}
        parts = ["smoke size"] if setting.get("smoke") else []
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not an object
        return ""
    shown = {k: v for k, v in overrides.items() if k not in set(leave_out)} if isinstance(
        overrides, dict) else {}
    if shown:
        parts.append("--set " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return ", ".join(parts)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` body.

    The lock is released by the kernel if the holder dies, so a killed sweep never leaves a
    stale lock behind.

    Example:
        >>> import tempfile, os
        >>> with file_lock(os.path.join(tempfile.mkdtemp(), "a.lock")):
        ...     pass
    """
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _parse_cell(text: str):
    """CSV cell -> int, float, bool, None or str (the inverse of :func:`_format_cell`)."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # repr of the plain float: numpy 2's repr(np.float64(0.5)) is "np.float64(0.5)", which
        # read back as text
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a results CSV into a list of dicts with numbers parsed (missing file: ``[]``).

    Empty cells become ``None``; ``"True"``/``"False"`` become bools. A byte-order mark (a
    spreadsheet's "CSV UTF-8" save) is dropped. A damaged file (a row with more or fewer cells
    than the header, a column named twice, bytes that are not UTF-8, a directory) raises
    ``ValueError`` naming it.

    Args:
        path: a CSV written by :func:`write_rows` / :func:`append_row`.

    Returns:
        One dict per row, in file order.

    Example:
        >>> read_rows("/nonexistent/results.csv")
        []
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or ()
            if twice := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more "
                                 "than once in the header: a damaged results file")
            rows = []
            for row in reader:
                if None in row or None in row.values():  # more / fewer cells than the header
                    cells = (sum(v is not None for k, v in row.items() if k is not None)
                             + len(row.get(None) or ()))
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {cells} "
                        f"cells for {len(reader.fieldnames or ())} columns: a damaged results "
                        "file (restore it, or delete that line and rerun the sweep)")
                rows.append({k: (v if k in TEXT_COLUMNS and v != "" else _parse_cell(v))
                             for k, v in row.items()})
            return rows
    except FileNotFoundError:
        return []
    except (UnicodeDecodeError, IsADirectoryError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable results CSV ({err})") from None


def _columns(rows: Iterable[dict], first: Iterable[str] = ()) -> list[str]:
    columns = list(first)
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def rows_to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    """Format rows as CSV text; columns default to the union of keys in first-seen order.

    Example:
        >>> print(rows_to_csv([{"a": 1}, {"a": 2, "b": None}]), end="")
        a,b
        1,
        2,
    """
    columns = columns or _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format_cell(row.get(k)) for k in columns})
    return buf.getvalue()


def write_rows(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """Atomically replace ``path`` with ``rows`` as CSV.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.csv")
        >>> write_rows(p, [{"run_id": "x", "acc": 0.5}])
        >>> read_rows(p)
        [{'run_id': 'x', 'acc': 0.5}]
    """
    atomic_write_text(path, rows_to_csv(rows, columns))


def lock_path(path: str | os.PathLike) -> str:
    """The hidden lock file beside ``path``: ``dir/.name.lock``.

    Example:
        >>> lock_path("out/results.csv")
        'out/.results.csv.lock'
    """
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.lock")


def append_rows(path: str | os.PathLike, new_rows: Iterable[dict], key: str = RUN_ID) -> int:
    """Add the rows whose ``key`` is not in the CSV at ``path`` yet, in one atomic rewrite.

    Safe against concurrent appenders (exclusive lock on :func:`lock_path`) and against a kill
    at any moment (the file is rewritten atomically). New columns are added at the end; older
    rows get empty cells for them.

    Args:
        path: results CSV (created if missing).
        new_rows: rows that each hold ``key``.
        key: the column that identifies a row.

    Returns:
        How many rows were written.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "r.csv")
        >>> append_rows(p, [{"run_id": "a"}, {"run_id": "b"}]), append_rows(p, [{"run_id": "a"}])
        (2, 0)
    """
    new_rows = list(new_rows)
    for row in new_rows:
        if key not in row:
            raise ValueError(f"row: missing the {key!r} column (has {sorted(row)})")
    path = os.fspath(path)
    with file_lock(lock_path(path)):
        rows = read_rows(path)
        present = _keys(path, rows, key)
        added = 0
        for row in new_rows:
            if str(row[key]) not in present:
                rows.append(row)
                present.add(str(row[key]))
                added += 1
        if added:
            write_rows(path, rows, _columns(rows, first=[key]))
        return added


def order_rows(path: str | os.PathLike, order: Sequence[str], key: str = RUN_ID) -> bool:
    """Rewrite the CSV at ``path`` with the rows whose ``key`` is in ``order`` in that order,
    first, and every other row after them as it was (under the append lock, atomically).

    Runs that finish in parallel are appended as they finish, so without this the row order,
    and with it the summary table's and the legends' order, depended on timing. Returns whether
    the file changed (a missing file, or one already in order, is left alone).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "r.csv")
        >>> _ = append_rows(p, [{"run_id": "b"}, {"run_id": "x"}, {"run_id": "a"}])
        >>> order_rows(p, ["a", "b"]), [r["run_id"] for r in read_rows(p)]
        (True, ['a', 'b', 'x'])
    """
    path = os.fspath(path)
    rank = {str(run_id): i for i, run_id in enumerate(order)}
    with file_lock(lock_path(path)):
        rows = read_rows(path)
        ordered = sorted(rows, key=lambda r: rank.get(str(r.get(key)), len(rank)))  # stable
        if ordered == rows:
            return False
        write_rows(path, ordered, _columns(rows, first=[key]))
        return True


def append_row(path: str | os.PathLike, row: dict, key: str = RUN_ID) -> bool:
    """Add ``row`` to the CSV at ``path`` unless a row with the same ``key`` is there already
    (see :func:`append_rows`).

    Returns:
        True if the row was written, False if ``key``'s value was already present.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "r.csv")
        >>> append_row(p, {"run_id": "r1", "acc": 0.8}), append_row(p, {"run_id": "r1"})
        (True, False)
    """
    return append_rows(path, [row], key) == 1


def finished_ids(path: str | os.PathLike, key: str = RUN_ID) -> set[str]:
    """The ``key`` values present in a results CSV (empty set when there is no file).

    Example:
        >>> finished_ids("/nonexistent.csv")
        set()
    """
    return _keys(path, read_rows(path), key)


def check_unique(path, rows: list[dict], key: str = RUN_ID) -> None:
    """Raise ``ValueError`` when two of ``rows`` (read from ``path``) hold one ``key`` value: a
    results file holds each run once, and a run written twice (two files merged by hand, a row
    pasted twice) would count as two seeds in every mean. Rows without a value are let be.

    Example:
        >>> check_unique("r.csv", [{"run_id": "a"}, {"run_id": "b"}, {"run_id": "a"}])
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: r.csv: line 4 repeats run_id 'a' of line 2: a damaged results file ...
    """
    first: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if row.get(key) is None:
            continue
        value = str(row[key])
        if value in first:
            raise ValueError(f"{path}: line {line} repeats {key} {value!r} of line "
                             f"{first[value]}: a damaged results file (delete one of them)")
        first[value] = line


def _keys(path, rows: list[dict], key: str) -> set[str]:
    """The ``key`` values of ``rows``; a row without one (its column deleted or emptied by
    hand) would make every run look unrecorded and be written again, and one written twice
    would count twice: ``ValueError``."""
    for line, row in enumerate(rows, start=2):
        if row.get(key) is None:
            raise ValueError(f"{path}: line {line} has no {key}: a damaged results file (restore "
                             f"it, or delete that line and rerun the sweep)")
    check_unique(path, rows, key)
    return {str(r[key]) for r in rows}
