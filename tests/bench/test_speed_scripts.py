"""Speed scripts (benchmarks.models, step_time, train_speed, peft_speed): where
``--out`` points, and the provenance each CSV row carries."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import benchmarks.models as bm
import benchmarks.peft_speed as ps
import benchmarks.step_time as st
import benchmarks.train_speed as ts


def _expected_isa() -> str:
    """The CPU vector ISA, from torch's dispatch level and /proc/cpuinfo's bf16 flags."""
    isa = torch.backends.cpu.get_cpu_capability()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.startswith("flags")), set())
    return isa + " bf16" if {"avx512_bf16", "amx_tile"} & flags else isa


def _fake_models(monkeypatch):
    """benchmarks.models with its three measurements replaced by fixed rows (no timing)."""
    speed = {"check": "mask_speed", "case": "digits", "model": "wt_s", "batch": 2,
             "input": "1x8x8", "depth": 2, "mask_k": 2, "mask_kind": "random",
             "unmasked_ms": 10.0, "masked_ms": 11.0, "ratio_wall": 1.1, "ratio_best": 1.1,
             "ratio_cpu": 1.1, "repeats": 1}
    monkeypatch.setattr(bm, "mask_speed", lambda case, repeats: dict(speed))
    monkeypatch.setattr(bm, "deq_memory", lambda budgets: [])
    monkeypatch.setattr(bm, "unrolled_memory", lambda depths: [])
    monkeypatch.setattr(bm, "tune_malloc", lambda: None)


def _fake_peft(monkeypatch):
    def rows(name, rank, batch, repeats):
        return [{"case": name, "measure": "train_step", "variant": "lora", "rank": rank,
                 "copies": 1, "density": 1.0, "impl": "dense:1", "batch": batch,
                 "median_ms": 1.0, "ratio": 1.0, "ratio_to": "lora", "target": None,
                 "meets_target": None}]
    monkeypatch.setattr(ps, "measure_case", rows)


def _fake_train_speed(monkeypatch):
    monkeypatch.setattr(ts, "plain_loop", lambda *a, **k: 100.0)
    monkeypatch.setattr(ts, "harness_loop", lambda *a, **k: 80.0)


STEP_ARGS = ["--models", "test_wt", "--batch-sizes", "2", "--image-size", "8", "--variants",
             "base", "--steps", "1", "--device", "cpu", "--threads", "1"]


def _run(script: str, out: str, monkeypatch) -> int:
    """Run one script's ``main`` with ``--out OUT`` in its cheapest setting."""
    if script == "models":
        _fake_models(monkeypatch)
        try:
            return bm.main(["--quick", "--repeats", "1", "--out", out])
        except SystemExit as exc:
            return exc.code
    if script == "peft_speed":
        _fake_peft(monkeypatch)
        return ps.main(["--cases", "wt_s", "--repeats", "1", "--out", out])
    if script == "train_speed":
        _fake_train_speed(monkeypatch)
        return ts.main(["--repeats", "1", "--variants", "base", "--device", "cpu",
                        "--threads", "1", "--out", out])
    return st.main([*STEP_ARGS, "--out", out])


SCRIPTS = ["models", "step_time", "train_speed", "peft_speed"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_with_a_tilde_goes_to_the_home_directory(script, tmp_path, monkeypatch, capsys):
    """``--out=~/res``: no shell expands a tilde after '='; the scripts made a directory named
    '~' in the current directory (as benchmarks.run did before 3e1280f)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    torch_threads = torch.get_num_threads()
    try:
        assert _run(script, "~/res", monkeypatch) == 0
    finally:
        torch.set_num_threads(torch_threads)
    assert not (cwd / "~").exists()
    assert any(p.suffix == ".csv" for p in (home / "res").iterdir())


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_out_is_refused(script, tmp_path, monkeypatch, capsys):
    """``--out "$OUT"`` with OUT unset: step_time and train_speed measured, then wrote into the
    current directory (``Path("")`` is ``.``); one line on stderr, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(st, "time_variants", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(bm, "mask_speed", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(ts, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(ps, "measure_case", lambda *a, **k: pytest.fail("measured"))
    argv = {"models": lambda: bm.main(["--quick", "--out", ""]),
            "step_time": lambda: st.main([*STEP_ARGS, "--out", ""]),
            "train_speed": lambda: ts.main(["--repeats", "1", "--out", ""]),
            "peft_speed": lambda: ps.main(["--cases", "wt_s", "--out", ""])}[script]
    try:
        rc = argv()
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["models", "step_time", "peft_speed"])
def test_rows_carry_cpu_isa_and_torch_build(script, tmp_path, monkeypatch, capsys):
    """Every speed CSV says which CPU ISA measured it (bf16 autocast is 16x slower on this
    AVX2-only VM than fp32, faster on a CPU with native bf16; both say "AMD EPYC"), and the
    torch build (``torch.__version__``, with its ``+cu130`` / ``+cpu`` tag) as train_speed
    does: models and peft_speed wrote pip's ``2.14.1`` where the others wrote ``2.14.1+cu130``
    for the same install."""
    torch_threads = torch.get_num_threads()
    try:
        assert _run(script, str(tmp_path), monkeypatch) in (0, 1)
    finally:
        torch.set_num_threads(torch_threads)
    (path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows and {r["cpu_isa"] for r in rows} == {_expected_isa()}
    assert {r["torch_version"] for r in rows} == {torch.__version__}


def test_step_time_rows_record_the_steps_behind_each_median(tmp_path, capsys):
    assert st.main([*STEP_ARGS[:-6], "--steps", "3", "--device", "cpu", "--threads", "1",
                    "--out", str(tmp_path)]) == 0
    (row,) = csv.DictReader((tmp_path / "step_time_cpu_test_wt.csv").open())
    assert row["steps"] == "3"


def test_peft_speed_rows_record_the_repeats_behind_each_median(monkeypatch):
    """Train steps: the median of ``repeats`` calls; inference: of 3 x ``repeats``."""
    calls = []

    def fake_interleaved(fns, repeats, warmup=2):
        calls.append(repeats)
        return {k: 1.0 for k in fns}

    monkeypatch.setattr(ps, "_interleaved", fake_interleaved)
    rows = ps.measure_case("capaboost_model", rank=1, batch=2, repeats=2)
    assert calls == [2, 6]
    assert {(r["measure"], r["repeats"]) for r in rows} == {("train_step", 2), ("inference", 6)}


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["train_speed_cpu", "gpu/train_speed_cuda",
                                  "gpu/train_speed_cuda_16k", "gpu/train_speed_cuda_workers"])
def test_committed_train_speed_tables_follow_from_their_samples(name):
    """Each committed train_speed table: medians of the recorded samples, overhead
    plain / harness - 1, speed-up over base, and the .md row equal to the .csv."""
    rows = list(csv.DictReader((RESULTS / f"{name}.csv").open()))
    md = (RESULTS / f"{name}.md").read_text()
    med = {}
    for r in rows:
        samples = sorted(float(s) for s in r["samples"].split())
        assert len(samples) == int(r["repeats"])
        n = len(samples)
        median = (samples[(n - 1) // 2] + samples[n // 2]) / 2
        assert float(r["images_per_s"]) == pytest.approx(median, abs=0.06)
        med[(r["variant"], r["loop"])] = float(r["images_per_s"])
    for (variant, loop), rate in med.items():
        if loop != "harness":
            continue
        plain = med[(variant, "plain")]
        overhead = 100 * (plain / rate - 1)
        speedup = rate / med[("base", "harness")]
        assert f"| {variant} | {plain:.1f} | {rate:.1f} | {overhead:+.1f}% | " in md
        row = next(r for r in rows if (r["variant"], r["loop"]) == (variant, loop))
        assert float(row["speedup_vs_base"]) == pytest.approx(speedup, abs=6e-4)


def test_committed_peft_speed_table_follows_from_its_csv():
    rows = list(csv.DictReader((RESULTS / "peft_speed.csv").open()))
    md = (RESULTS / "peft_speed.md").read_text()
    ms = {(r["case"], r["variant"]): float(r["median_ms"]) for r in rows}
    for r in rows:
        ratio = ms[(r["case"], r["variant"])] / ms[(r["case"], r["ratio_to"])]
        assert float(r["ratio"]) == pytest.approx(ratio, rel=1e-9)
        assert (f"| {r['case']} | {r['measure']} | {r['variant']} | {r['impl']} | {r['batch']} "
                f"| {float(r['median_ms']):.1f} | {ratio:.3f} | {r['ratio_to']} |") in md


def test_committed_models_table_follows_from_its_csv():
    rows = list(csv.DictReader((RESULTS / "models.csv").open()))
    md = (RESULTS / "models.md").read_text()
    for r in (r for r in rows if r["check"] == "mask_speed"):
        ratio = float(r["masked_ms"]) / float(r["unmasked_ms"])
        assert float(r["ratio_wall"]) == pytest.approx(ratio, abs=6e-4)  # ms rounded to 0.01
        assert f"| {r['unmasked_ms']} | {r['masked_ms']} | {r['ratio_wall']} |" in md
    for key, short in (("peak_mb", "peak"), ("saved_for_backward_mb", "saved")):
        for masked in (False, True):
            pts = [(int(r["depth"]), float(r[key])) for r in rows
                   if r["check"] == "unrolled_memory" and (r["mask_k"] != "0") == masked]
            n = len(pts)
            mx, my = sum(d for d, _ in pts) / n, sum(y for _, y in pts) / n
            b = (sum((d - mx) * (y - my) for d, y in pts) / sum((d - mx) ** 2 for d, _ in pts))
            label = f"unrolled{'_masked' if masked else ''}_{short}_mb_per_iter"
            assert f"- `{label}`: {round(b, 4)}" in md
    peaks = [float(r["peak_mb"]) for r in rows if r["check"] == "deq_memory"]
    assert f"- `deq_peak_spread`: {round(max(peaks) / min(peaks) - 1, 4)}" in md
