"""A user's own sweep, defined with @preset in their own module and run as MODULE:NAME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import presets
from benchmarks.presets import build_runs, get_preset, run_id_for
from benchmarks.results_io import read_rows
from benchmarks.run import RESULTS, main, run_dir_of

SMOKE = {"dataset": "digits", "train_size": 64, "test_size": 32, "epochs": 1, "batch_size": 32}

# a two-label grid; importing it leaves a line per importing process in imported_by.txt
GRID = textwrap.dedent('''
    import os

    from benchmarks.presets import Variant, preset

    with open(os.path.join(os.path.dirname(__file__), "imported_by.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")

    SMOKE = %r


    @preset("grid", "my grid", seeds=(0, 1, 2), jobs=2)
    def grid(smoke):
        return [Variant(label, {"model": "test_wt", "depth": d, "width": 8, **extra, **SMOKE})
                for d in (1, 3) for label, extra in (("A", {}), ("B", {"mask_k": d}))]


    def helper(smoke):
        return []
    ''') % (SMOKE,)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_module(name, source)``: write ``tmp_path/name.py`` and put it on sys.path; the
    presets it registers and its import are forgotten after the test."""
    names = []
    monkeypatch.setattr(presets, "_USER_PRESETS", {})
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        *packages, leaf = name.split(".")
        folder = tmp_path.joinpath(*packages)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(packages)):  # mypkg.my_sweeps: mypkg/__init__.py too
            tmp_path.joinpath(*packages[:i + 1], "__init__.py").touch()
        (folder / f"{leaf}.py").write_text(source)
        parts = name.split(".")
        names.extend(".".join(parts[:i + 1]) for i in range(len(parts)))
        for module in names:
            sys.modules.pop(module, None)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def _example_from_docstring() -> str:
    """The ``my_sweeps.py`` of benchmarks.presets' module docstring, as a user saves it."""
    block = presets.__doc__.split("saved as ``my_sweeps.py``::\n")[1].split("\nruns with")[0]
    return textwrap.dedent(block)


def test_docstring_example_lists_its_grid_times_its_seeds(user_module):
    user_module("my_sweeps", _example_from_docstring())
    spec = get_preset("my_sweeps:ablation")
    assert spec.name == "ablation" and spec.seeds == (0, 1)
    data = {"dataset": "digits", "optimizer": "adamw", "lr": 1e-2, "batch_size": 64}
    full = build_runs("my_sweeps:ablation")  # the preset's seeds 0, 1
    expected = [(label, {"model": "wt_s", "depth": d, "width": 32, **extra, **data,
                         "epochs": 10, "seed": s})  # seed-major, in the listed order
                for s in (0, 1) for d in (2, 4)
                for label, extra in (("WT", {}), ("WT + masks", {"mask_k": d}))]
    assert [(r.label, r.config) for r in full] == expected
    assert [r.run_id for r in full] == [run_id_for(lbl, c) for lbl, c in expected]
    assert full[1].run_id.startswith("wt-masks_d2_w32_k2_s0_")
    smoke = build_runs("my_sweeps:ablation", smoke=True)  # smoke: seed 0 only
    assert len(smoke) == 4 and {r.config["model"] for r in smoke} == {"test_wt"}


def test_a_module_in_a_package_names_its_preset_with_the_dotted_path(user_module):
    user_module("mypkg.my_sweeps", _example_from_docstring())
    runs = build_runs("mypkg.my_sweeps:ablation", smoke=True, seeds=[3])
    assert [(r.label, r.config["depth"], r.config["seed"]) for r in runs] == [
        ("WT", 2, 3), ("WT + masks", 2, 3), ("WT", 4, 3), ("WT + masks", 4, 3)]
    with pytest.raises(ValueError, match="module 'mypkg' defines no preset 'ablation'"):
        get_preset("mypkg:ablation")  # the module that applies @preset names it


def test_real_sweep_rerun_and_setting_check_by_the_command_line(tmp_path):
    # the module sits in the current directory, as for runner=; not on PYTHONPATH
    (tmp_path / "lab_grid.py").write_text(GRID)
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "benchmarks.run", "lab_grid:grid", "--out",
                               str(out), "--smoke", *argv], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    proc = cli("--seeds", "0", "--only", "_d1_", "--no-extrapolation")  # A and B at depth 1
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(out / RESULTS)
    assert sorted((r["label"], r["depth"], r["mask_k"], r["seed"]) for r in rows) == [
        ("A", 1, 0, 0), ("B", 1, 1, 0)]
    a = {"model": "test_wt", "depth": 1, "width": 8, **SMOKE, "seed": 0}
    assert sorted(r["run_id"] for r in rows) == sorted(
        [run_id_for("A", a), run_id_for("B", {**a, "mask_k": 1})])
    assert all(r["status"] == "ok" and r["epochs_done"] == 1 for r in rows)
    assert (out / "summary.md").exists() and (out / "plots").is_dir()
    assert json.loads((out / "machine.json").read_text())["preset"] == "lab_grid:grid"
    # the harness imported the module once; the two training processes never did
    assert len((tmp_path / "imported_by.txt").read_text().split()) == 1
    again = cli("--seeds", "0", "--only", "_d1_", "--no-plots", "--no-extrapolation")
    assert again.returncode == 0 and "skipped 2" in again.stdout and "ran 0" in again.stdout
    other = cli("--seeds", "0", "--set", "epochs=2", "--dry-run")  # another setting: refused
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "holds sweeps with --smoke and no --set" in other.stderr
    assert len(read_rows(out / RESULTS)) == 2


def test_dry_run_seeds_set_and_only_reach_the_user_preset(user_module, tmp_path, capsys):
    user_module("grid_mod", GRID)
    out = tmp_path / "s"
    argv = ["grid_mod:grid", "--smoke", "--out", str(out), "--dry-run"]
    assert main(argv + ["--seeds", "4,7", "--set", "lr=0.5", "--only", "b_"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2 + 1  # B at depths 1 and 3, seeds 4 and 7, plus the tally
    assert sorted(line.split()[1].split("_")[1:4] for line in lines[:-1]) == [
        ["d1", "w8", "k1"], ["d1", "w8", "k1"], ["d3", "w8", "k3"], ["d3", "w8", "k3"]]
    assert all("lr=0.5" in line and line.split()[0] == "todo" for line in lines[:-1])
    assert {line.split()[1].split("_")[4] for line in lines[:-1]} == {"s4", "s7"}
    assert main(argv) == 0  # smoke: seed 0, 4 runs
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("4 runs:")
    assert main(argv[:1] + argv[2:]) == 0  # full size: the preset's seeds 0, 1, 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("12 runs:")
    assert main(argv + ["--set", "depth=2"]) == 2  # the grid sweeps depth, as for built-ins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweeps depth" in err
    assert not out.exists()


RUNNER = textwrap.dedent('''
    from benchmarks.presets import Variant, preset


    def fake_train(config, out_dir):
        return {"test_acc": config["depth"] / 10, "lr_seen": config["lr"]}


    @preset("fake", "a custom runner", runner="runner_mod:fake_train")
    def fake(smoke):
        return [Variant("F", {"depth": d, "lr": 0.1}) for d in (2, 5)]
    ''')


def test_custom_runner_of_a_user_preset_records_what_it_returned(user_module, tmp_path,
                                                                 monkeypatch):
    user_module("runner_mod", RUNNER)
    # the runner's own process imports its module (as runner= always did): from PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    out = tmp_path / "s"
    argv = ["runner_mod:fake", "--out", str(out), "--seeds", "0,1", "--jobs", "2",
            "--set", "lr=1", "--no-plots"]
    assert main(argv) == 0
    rows = sorted(read_rows(out / RESULTS), key=lambda r: (r["seed"], r["depth"]))
    assert [(r["label"], r["depth"], r["seed"], r["test_acc"], r["lr_seen"]) for r in rows] == [
        ("F", 2, 0, 0.2, 1.0), ("F", 5, 0, 0.5, 1.0), ("F", 2, 1, 0.2, 1.0),
        ("F", 5, 1, 0.5, 1.0)]
    spec = json.loads((tmp_path / "s" / "runs" / rows[0]["run_id"] / "spec.json").read_text())
    assert spec["runner"] == "runner_mod:fake_train"
    assert os.path.isdir(run_dir_of(str(out), rows[0]["run_id"]))


BAD_BUILDS = {
    "returns_dict": 'return {"model": "test_wt"}',
    "returns_dicts": 'return [{"model": "test_wt"}]',
    "returns_nothing": "return []",
    "sets_seed": 'return [Variant("A", {"model": "test_wt", "seed": 3})]',
}


@pytest.mark.parametrize("target, source, message", [
    ("no_such_sweeps:grid", None,
     "preset: module 'no_such_sweeps' is not there"),
    ("bad_mod:nope", GRID,
     "preset: module 'bad_mod' defines no preset 'nope' (its presets: grid;"),
    ("bad_mod:helper", GRID,
     "preset: bad_mod.helper is a function, not a preset defined with @preset('helper', ...)"),
    ("bad_mod:SMOKE", GRID, "preset: bad_mod.SMOKE is a dict, not a preset"),
    ("bad_mod:quick", 'from benchmarks.presets import preset\n\n'
     '@preset("quick", "mine")\ndef quick(smoke):\n    return []\n',
     "preset 'quick' in bad_mod: 'quick' is a built-in preset; give yours another name"),
    ("bad_mod:x", 'from benchmarks.presets import preset\n\n'
     '@preset("x", "mine", seed=(0,))\ndef x(smoke):\n    return []\n',
     "preset 'x': unknown option 'seed'; valid: seeds,"),
    ("my_sweeps.py:ablation", None, "name the module, not its file: my_sweeps:..."),
    *[(f"bad_mod:{name}", 'from benchmarks.presets import Variant, preset\n\n'
       f'@preset("{name}", "bad")\ndef build(smoke):\n    {body}\n', message)
      for name, body, message in [
          ("returns_dict", BAD_BUILDS["returns_dict"],
           "preset 'bad_mod:returns_dict': its build function (smoke=True) returned a dict, "
           "expected a list of Variant(label, config)"),
          ("returns_dicts", BAD_BUILDS["returns_dicts"],
           "returned a dict at index 0, expected Variant(label, config)"),
          ("returns_nothing", BAD_BUILDS["returns_nothing"], "returned no variants"),
          ("sets_seed", BAD_BUILDS["sets_seed"],
           "variant 0 ('A') sets seed; give seeds with @preset(..., seeds=(0, 1)) or --seeds"),
      ]],
])
def test_bad_user_preset_is_one_line_exit_2_and_writes_nothing(user_module, tmp_path, capsys,
                                                               target, source, message):
    if source is not None:
        user_module(target.split(":")[0], source)
    out = tmp_path / "out"
    assert main([target, "--smoke", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.err.startswith("python -m benchmarks.run: error: ")
    assert not out.exists() and captured.out == ""


def test_the_build_function_under_another_name_points_to_the_preset(user_module, tmp_path,
                                                                    capsys):
    user_module("alias_mod", 'from benchmarks.presets import Variant, preset\n\n'
                '@preset("abl", "mine")\ndef build(smoke):\n'
                '    return [Variant("A", {"model": "test_wt"})]\n')
    assert main(["alias_mod:build", "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "is the build function of preset 'abl': run alias_mod:abl" in capsys.readouterr().err
    assert len(build_runs("alias_mod:abl", seeds=[0, 1])) == 2


def test_missing_module_by_the_command_line_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "not_a_module_x:grid",
                           "--out", str(tmp_path / "o"), "--smoke"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "module 'not_a_module_x' is not there" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "o").exists()
