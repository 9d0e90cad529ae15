"""Speed benchmarks: provenance a reader needs to reproduce the committed numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

import benchmarks.train_speed as ts


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_train_speed_records_the_cpu_vector_isa(tmp_path, monkeypatch, capsys):
    """bf16 autocast is 1.46x faster than fp32 on a CPU with native bf16 and ~20x slower on an
    AVX2-only one (both report "AMD EPYC"): the files must say which CPU ISA measured them."""
    monkeypatch.setattr(ts, "plain_loop", lambda *a, **k: 100.0)
    monkeypatch.setattr(ts, "harness_loop", lambda *a, **k: 80.0)
    assert ts.main(["--repeats", "1", "--variants", "base,amp", "--device", "cpu",
                    "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "train_speed_cpu.csv").open()))
    flags = _cpu_flags()
    expected = torch.backends.cpu.get_cpu_capability()
    if flags and ({"avx512_bf16", "amx_tile"} & flags):
        expected += " bf16"
    assert {r["cpu_isa"] for r in rows} == {expected}
    assert f"(CPU ISA {expected})" in (tmp_path / "train_speed_cpu.md").read_text()
