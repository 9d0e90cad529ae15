"""Findings of a randomized fuzz of the command lines: bad input is one line on stderr, exit 2.

- ``--flag=--`` (Python < 3.13 argparse handed the flag an empty list): a ``TypeError`` traceback
  in every program but ``wtmodels.train`` / ``peft_speed`` (which said "got []").
- ``--min-lr -1e-5`` / ``--tolerance -inf``: argparse took the value for a flag ("expected one
  argument", naming neither the value nor the rule it breaks).
- ``capaboost`` / ``extrapolate --threads 1000000``: a segmentation fault (exit 139; capaboost
  had made --out first), and 10**20 "Overflow when unpacking long long" (capaboost: exit 2 with
  --out created); the other commands cap --threads at 1024.
- ``capaboost --out ''``: "--out  cannot be created: No such file or directory".
- ``solvers`` / ``deq_layer --tag ../x``: the message did not name the refused tag.
- ``benchmarks.run --out FILE/sub``: a ``NotADirectoryError`` traceback reading results.csv.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tests.bench.test_benchmark_cli_refusals import _exit_code
from wtmodels.cli import DashValueParser


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_dash_value_is_the_string_dashes():
    parser = DashValueParser(prog="demo")
    parser.add_argument("--name")
    parser.add_argument("rest", nargs="?")
    assert parser.parse_args(["--name=--"]).name == "--"
    assert parser.parse_args(["--name", "a", "--", "--"]).rest == "--"  # separator unchanged
    assert parser.parse_args(["--name=a"]).name == "a"


@pytest.mark.parametrize("nargs, want", [("?", "--"), ("+", ["--"]), ("*", ["--"])])
def test_dash_value_of_a_flag_taking_several_values(nargs, want):
    # before 3.13 argparse gave nargs="?" its const and "+" / "*" an empty list
    parser = DashValueParser(prog="demo")
    parser.add_argument("--names", nargs=nargs, **({"const": "CONST"} if nargs == "?" else {}))
    assert parser.parse_args(["--names=--"]).names == want
    assert parser.parse_args(["--names", "a"]).names == ("a" if nargs == "?" else ["a"])


def test_negative_exponent_and_infinity_are_values(capsys):
    parser = DashValueParser(prog="demo")
    parser.add_argument("--x", type=float)
    for text, value in (("-1e-5", -1e-5), ("-1.5E3", -1500.0), ("-inf", float("-inf")),
                        ("-3", -3.0), ("-.5", -0.5)):
        assert parser.parse_args(["--x", text]).x == value
    with pytest.raises(SystemExit):
        parser.parse_args(["--x", "-y"])  # a flag-looking word is still no value
    capsys.readouterr()


@pytest.mark.parametrize("module, argv, message", [
    ("wtmodels.train", ["--model", "test_wt", "--min-lr", "-1e-5"],
     "min_lr must be >= 0; got -1e-05"),
    ("benchmarks.recommend", [None, "--params", "1e5", "--tolerance", "-inf"],
     "tolerance: must be a finite number >= 0 points, got -inf"),
])
def test_negative_number_reaches_the_range_check(module, argv, message, tmp_path, capsys):
    argv = [SWEEP if a is None else a for a in argv]
    if module == "wtmodels.train":
        argv += ["--out", str(tmp_path / "out")]
    assert _exit_code(importlib.import_module(module).main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(message), err
    assert os.listdir(tmp_path) == []


SWEEP = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "quick")


@pytest.mark.parametrize("module, argv, flag", [
    ("wtmodels.train", ["--model", "test_wt", "--epochs=--"], "--epochs"),
    ("benchmarks.run", ["quick", "--smoke", "--dry-run", "--jobs=--"], "--jobs"),
    ("benchmarks.recommend", [SWEEP, "--params=--"], "--params"),
    ("benchmarks.extrapolate", [SWEEP, "--threads=--"], "--threads"),
    ("benchmarks.plot", [SWEEP, "--mask-density=--"], "--mask-density"),
    ("benchmarks.capaboost", ["--smoke", "--threads=--"], "--threads"),
    ("benchmarks.solvers", ["--quick", "--repeats=--"], "--repeats"),
    ("benchmarks.deq_layer", ["--quick", "--repeats=--"], "--repeats"),
    ("benchmarks.models", ["--quick", "--repeats=--"], "--repeats"),
    ("benchmarks.step_time", ["--steps=--"], "--steps"),
    ("benchmarks.train_speed", ["--repeats=--"], "--repeats"),
    ("benchmarks.peft_speed", ["--repeats=--"], "--repeats"),
])
def test_flag_equals_dashes_is_one_line_exit_2(module, argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    if module not in ("benchmarks.recommend", "benchmarks.extrapolate", "benchmarks.plot"):
        argv = [*argv, "--out", str(out)]
    main = importlib.import_module(module).main
    assert _exit_code(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"argument {flag}: invalid" in err and "'--'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--dry-run"], ["--no-plots"]])
def test_run_out_under_a_file_is_one_line_exit_2(extra, tmp_path, capsys):
    import benchmarks.run as run

    afile = tmp_path / "afile"
    afile.write_text("x")
    before = sorted(os.listdir(tmp_path))
    code = run.main(["quick", "--smoke", "--out", str(afile / "sub" / "deeper"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err == (f"python -m benchmarks.run: error: --out {afile / 'sub' / 'deeper'} cannot be "
                   f"created: {afile} is not a directory\n")
    assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "x"


@pytest.mark.parametrize("module", ["benchmarks.capaboost", "benchmarks.extrapolate"])
@pytest.mark.parametrize("threads", ["1000000", str(10**20), "0"])
def test_threads_beyond_the_cap_is_one_line_exit_2(module, threads, tmp_path, capsys):
    out = tmp_path / "out"
    argv = (["--smoke", "--out", str(out)] if module == "benchmarks.capaboost"
            else [SWEEP]) + ["--threads", threads]
    assert _exit_code(importlib.import_module(module).main, argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: --threads must be >= 1 and <= 1024, got {threads}\n"), err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("out", ["", " "])
def test_capaboost_empty_out_says_so(out, tmp_path, monkeypatch, capsys):
    import benchmarks.capaboost as cb

    monkeypatch.chdir(tmp_path)
    assert cb.main(["--smoke", "--out", out]) == 2
    assert capsys.readouterr().err == ("python -m benchmarks.capaboost: error: --out: empty path; "
                                       "give the output directory\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", ["benchmarks.solvers", "benchmarks.deq_layer"])
@pytest.mark.parametrize("tag", ["../x", "", "a b"])
def test_bad_tag_is_named(module, tag, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--tag", tag]
    assert _exit_code(importlib.import_module(module).main, argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --tag must be letters, digits, '-' or '_', got {tag!r}\n"
    assert not out.exists()


def test_capaboost_out_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    # --out=~/x (no shell expands it) made a folder named '~' in the working directory
    import benchmarks.capaboost as cb

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert cb.main(["--smoke", "--out=~/x", "--threads", "0"]) == 2  # refused before any folder
    assert not home.exists() and os.listdir(work) == []
    monkeypatch.setattr(cb, "run_capaboost", lambda out, **kw: [])
    monkeypatch.setattr(cb, "write_summary", lambda rows, out: f"summary in {out}\n")
    assert cb.main(["--smoke", "--out=~/x"]) == 0
    assert capsys.readouterr().out == f"summary in {home / 'x'}\n"
    assert (home / "x").is_dir() and os.listdir(work) == []


@pytest.mark.parametrize("only", ["", " "])
def test_run_empty_only_is_refused_not_every_run(only, tmp_path, capsys):
    # --only "$UNSET" matched every run of the preset (the empty text is in every run id)
    import benchmarks.run as run

    out = tmp_path / "sweep"
    assert run.main(["quick", "--smoke", "--dry-run", "--out", str(out), "--only", only]) == 2
    assert capsys.readouterr().err == ("python -m benchmarks.run: error: --only: empty text; "
                                       "give part of the run ids to run (--dry-run lists them)\n")
    assert not out.exists()

