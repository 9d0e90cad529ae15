"""Reproducibility as a researcher depends on it: same command, same numbers, stable ids, true
provenance.

Each check runs what the README promises on a case the other tests do not: two separate
processes (other ``PYTHONHASHSEED``, other ``--num-workers``), a sweep run twice (``--jobs`` 1
and 2), ``--set`` spellings of one value, seeds at the ends of their range, git variables of
another repository in the environment, and a run resumed with other threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import presets
from benchmarks.presets import Preset, Variant, build_runs
from benchmarks.results_io import append_row, read_rows
from benchmarks.rows import assemble_row
from benchmarks.run import RESULTS, sweep
from wtmodels import train as train_mod
from wtmodels.checkpoint import load_checkpoint
from wtmodels.data import SyntheticImages
from wtmodels.provenance import cpu_isa, git_sha
from wtmodels.train import run

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"epoch_time_s", "eval_time_s", "images_per_s", "peak_mem_mb"}
TINY = dict(dataset="digits", train_size=64, test_size=32, batch_size=32, threads=1,
            progress="none", device="cpu")


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def _cli(out: Path, flags: list[str], hash_seed: int) -> None:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    argv = [sys.executable, "-m", "wtmodels.train", "--out", str(out), *flags]
    for key, value in TINY.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_same_command_in_two_processes_gives_the_same_numbers_whatever_the_workers(tmp_path):
    # a DEQ with distinct masks, dropout, augmentation and random Hutchinson probes: every
    # generator matters; string hashing (PYTHONHASHSEED) and loader workers must not
    flags = ["--model", "test_deq", "--epochs", "2", "--mask-k", "2", "--dropout", "0.2",
             "--augment", "--jac-reg-weight", "0.1", "--jac-reg-freq", "0.5", "--seed", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    _cli(a, flags + ["--num-workers", "0"], hash_seed=1)
    _cli(b, flags + ["--num-workers", "2"], hash_seed=2)
    assert _metrics(a) == _metrics(b) and len(_metrics(a)) == 2
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("mask" in k for k in wa)  # the masks travel in the state: equal too


def test_a_sweep_run_twice_with_one_or_two_jobs_gives_the_same_rows(tmp_path, monkeypatch):
    data = {k: v for k, v in TINY.items() if k not in ("threads", "progress", "device")}
    variants = [Variant("WT masks", {"model": "test_wt", **data, "epochs": 1, "mask_k": 2,
                                     "dropout": 0.1}),
                Variant("DEQ", {"model": "test_deq", **data, "epochs": 1})]
    monkeypatch.setitem(presets._PRESETS, "repro7", Preset("repro7", "test", lambda s: variants))
    for name, jobs in (("a", 1), ("b", 2)):
        sweep("repro7", str(tmp_path / name), jobs=jobs, plots=False, device="cpu",
              echo=lambda *_: None)
    varying = {"epoch_time_s", "train_time_s", "images_per_s", "peak_mem_mb", "wall_s", "cpu_s",
               "date", "load_average_1min", "eval_time_s", "git_sha", "run_git_sha"}

    def rows(name):
        return sorted(({k: v for k, v in r.items() if k not in varying}
                       for r in read_rows(tmp_path / name / RESULTS)), key=lambda r: r["run_id"])

    first, second = rows("a"), rows("b")
    assert len(first) == 2 and first == second
    assert all(r["status"] == "ok" and r["test_acc"] is not None for r in first)


def test_a_whole_number_for_a_float_setting_is_one_run_id():
    # --set lr=1 and --set lr=1.0 (JSON: an int and a float) train the same run; they got two
    # ids, so a rerun with the other spelling trained everything again beside the first rows
    one = build_runs("quick", smoke=True, overrides={"lr": 1, "f_tol": 1})
    other = build_runs("quick", smoke=True, overrides={"lr": 1.0, "f_tol": 1.0})
    assert [r.run_id for r in one] == [r.run_id for r in other]
    assert {type(r.config["lr"]) for r in one} == {float}
    # integer settings keep their integers
    assert build_runs("quick", smoke=True, overrides={"epochs": 2})[0].config["epochs"] == 2
    # a custom runner's settings (capaboost) follow the types its preset gives them
    one = build_runs("capaboost", smoke=True, overrides={"lr": 1})
    assert [r.run_id for r in one] == [
        r.run_id for r in build_runs("capaboost", smoke=True, overrides={"lr": 1.0})]
    assert {type(r.config["lr"]) for r in one} == {float}


def test_run_ids_do_not_depend_on_the_process():
    code = ("from benchmarks.presets import build_runs; "
            "print(' '.join(r.run_id for r in build_runs('quick', smoke=True)))")
    ids = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONHASHSEED=str(seed)), check=True).stdout
           for seed in (1, 2)}
    assert len(ids) == 1
    assert ids.pop().split() == [r.run_id for r in build_runs("quick", smoke=True)]


@pytest.mark.parametrize("key", ["seed", "data_seed"])
def test_seeds_at_the_end_of_their_range(tmp_path, key):
    # 2**64 - 1 trains; 2**64 was "Overflow when unpacking long long", naming nothing; a large
    # data seed of synthetic images failed while reading the data
    settings = dict(TINY, model="test_wt", epochs=1, dataset="synthetic", train_size=32,
                    test_size=32)
    assert 0.0 <= run({**settings, key: 2**64 - 1})["test_acc"] <= 1.0
    with pytest.raises(ValueError, match=f"{key} must be < 18446744073709551616"):
        run({**settings, key: 2**64})
    assert train_mod.main(["--out", str(tmp_path / "r"), "--model", "test_wt",
                           "--" + key.replace("_", "-"), str(2**64)]) == 2


def test_synthetic_images_of_small_seeds_are_unchanged():
    ds = SyntheticImages(8, num_classes=2, shape=(1, 6, 6), seed=3, split=1)
    gen = torch.Generator().manual_seed((3 * 1_000_003 + 1) * 1_000_003 + 5)
    shift = torch.randint(-2, 3, (2,), generator=gen)
    expected = torch.roll(ds.prototypes[1], shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
    expected = expected + 0.5 * torch.randn((1, 6, 6), generator=gen)
    assert torch.equal(ds[5][0], expected)
    big = SyntheticImages(4, num_classes=2, shape=(1, 6, 6), seed=2**63, split=1)
    assert torch.equal(big[3][0], big[3][0])


def test_git_sha_is_this_checkout_s_even_with_another_repository_s_git_variables(
        tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=n"]
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    (other / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=other, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=other, check=True)
    theirs = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=other, check=True,
                            capture_output=True, text=True).stdout.strip()
    ours = git_sha()
    # as a git hook or `git rebase --exec` of the other project sets them
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    assert git_sha() == ours and not git_sha().startswith(theirs)
    # and -dirty follows the tracked files of the checkout given
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    assert git_sha(str(other)) == theirs
    (other / "f").write_text("y")
    assert git_sha(str(other)) == theirs + "-dirty"


def test_a_run_resumed_with_other_threads_says_so(tmp_path, train_killed_after_epoch):
    # config.json's env described the first process only: a run resumed with 2 threads (which
    # changes the numbers) was recorded as a 1-thread run
    out = tmp_path / "run"
    train_killed_after_epoch(dict(TINY, model="test_wt", epochs=2, out=str(out)))
    run({"out": str(out), "resume": True, "threads": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["env"]["threads"] == 1
    (resume,) = config["resumes"]
    assert resume["from_epoch"] == 1 and resume["env"]["threads"] == 2
    assert resume["env"]["git_sha"] == git_sha()
    (out / "spec.json").write_text(json.dumps({"run_id": "r", "label": "WT", "config": {}}))
    row = assemble_row(str(out))
    assert row["threads"] == 1 and row["resumed_with"] == "epoch 2-: threads 2"
    # a resume of the finished run trains nothing and records nothing
    run({"out": str(out), "resume": True, "threads": 1})
    assert len(json.loads((out / "config.json").read_text())["resumes"]) == 1


def test_a_run_records_its_cpu_isa_and_a_resume_on_another_says_so(
        tmp_path, train_killed_after_epoch, monkeypatch):
    # the same seeded run gives other numbers where torch's CPU kernels dispatch to another
    # vector ISA (the committed quick sweep did not reproduce bit for bit on an AVX2 VM):
    # config.json, the results row and resumed_with name it
    out = tmp_path / "run"
    train_killed_after_epoch(dict(TINY, model="test_wt", epochs=2, out=str(out)))
    here = torch.backends.cpu.get_cpu_capability()
    other = "AVX512" if here != "AVX512" else "AVX2"
    here, bf16 = cpu_isa(), cpu_isa()[len(here):]  # " bf16" on a CPU with native bf16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    other += bf16
    run({"out": str(out), "resume": True})
    config = json.loads((out / "config.json").read_text())
    assert config["env"]["cpu_isa"] == here
    assert config["resumes"][0]["env"]["cpu_isa"] == other
    (out / "spec.json").write_text(json.dumps({"run_id": "r", "label": "WT", "config": {}}))
    row = assemble_row(str(out))
    assert row["cpu_isa"] == here and row["resumed_with"] == f"epoch 2-: cpu_isa {other}"
    # a run begun before cpu_isa was recorded: unknown, not different
    del config["env"]["cpu_isa"]
    (out / "config.json").write_text(json.dumps(config))
    assert "resumed_with" not in assemble_row(str(out))


def test_cpu_vector_flags_reads_the_flags_line(tmp_path):
    from benchmarks.provenance import cpu_vector_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                    "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 sha_ni\n")
    assert cpu_vector_flags(str(info)) == "avx2 fma avx512f avx512bw avx512_bf16"
    info.write_text("processor\t: 0\n")
    assert cpu_vector_flags(str(info)) == "unknown"
    assert cpu_vector_flags(str(tmp_path / "missing")) == "unknown"


def test_a_run_resumed_alike_has_no_resumed_with_column(tmp_path, train_killed_after_epoch):
    out = tmp_path / "run"
    train_killed_after_epoch(dict(TINY, model="test_wt", epochs=2, out=str(out)))
    run({"out": str(out), "resume": True})
    assert len(json.loads((out / "config.json").read_text())["resumes"]) == 1
    (out / "spec.json").write_text(json.dumps({"run_id": "r", "label": "WT", "config": {}}))
    assert "resumed_with" not in assemble_row(str(out))


def test_a_run_s_own_git_sha_survives_the_next_append(tmp_path):
    # run_git_sha was parsed as a number: "1234567e8901" became inf when the next row was
    # appended (results.csv is rewritten whole), "000000012345" lost its zeros
    path = tmp_path / RESULTS
    shas = ["1234567e8901", "000000012345", "123456789012"]
    for i, sha in enumerate(shas):
        append_row(path, {"run_id": f"r{i}", "git_sha": sha, "run_git_sha": sha,
                          "data_dir": "1e3"})
    rows = read_rows(path)
    assert [r["run_git_sha"] for r in rows] == shas == [r["git_sha"] for r in rows]
    assert {r["data_dir"] for r in rows} == {"1e3"}


def test_a_sweep_rerun_with_other_threads_keeps_the_first_threads_and_says_what_changed(
        tmp_path, monkeypatch, train_killed_after_epoch):
    # the row's threads came from harness.json (the last process) while config.json said what
    # the first process used: a run resumed with other threads looked like a plain 2-thread run
    data = {k: v for k, v in TINY.items() if k not in ("threads", "progress", "device")}
    variants = [Variant("WT", {"model": "test_wt", **data, "epochs": 2})]
    monkeypatch.setitem(presets._PRESETS, "repro7t", Preset("repro7t", "test", lambda s: variants))
    out = tmp_path / "s"
    (spec,) = build_runs("repro7t")
    run_dir = out / "runs" / spec.run_id
    train_killed_after_epoch({**spec.config, "out": str(run_dir), "threads": 1,
                                        "progress": "none", "device": "cpu"})  # first process
    report = sweep("repro7t", str(out), threads=2, device="cpu", plots=False,
                   echo=lambda *_: None)
    assert report.ran == 1 and not report.failed
    (row,) = read_rows(out / RESULTS)
    assert row["resumed"] is True and row["epochs_done"] == 2
    assert row["threads"] == 1 and row["resumed_with"] == "epoch 2-: threads 2"
