"""A user's @preset mistakes that ran something else or pointed the wrong way: one preset name
given twice in one module (the second silently replaced the first), and a preset's build
function re-exported by another module (a package's ``__init__``) and named through it."""

from __future__ import annotations

import importlib
import sys

import pytest

from benchmarks import presets
from benchmarks.run import main

TWICE = '''
from benchmarks.presets import Variant, preset

@preset("ab", "first")
def first(smoke):
    return [Variant("A", {"model": "test_wt"})]

@preset("ab", "second")
def second(smoke):
    return [Variant("B", {"model": "test_wt"})]
'''

ONCE = '''
from benchmarks.presets import Variant, preset

@preset("ab", "only")
def build(smoke):
    return [Variant("A", {"model": "test_wt"})]
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """``tmp_path`` on sys.path, the user presets and modules imported from it forgotten after."""
    monkeypatch.setattr(presets, "_USER_PRESETS", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


def test_one_preset_name_twice_in_a_module_is_one_line_exit_2(user_dir, capsys):
    (user_dir / "twice_mod.py").write_text(TWICE)
    out = user_dir / "out"
    assert main(["twice_mod:ab", "--smoke", "--dry-run", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "'ab'" in captured.err and "first" in captured.err and "second" in captured.err
    assert captured.out == "" and not out.exists()


def test_reimporting_a_module_keeps_its_preset(user_dir):
    (user_dir / "once_mod.py").write_text(ONCE)
    module = importlib.import_module("once_mod")
    importlib.reload(module)  # the same definition again: not a second preset
    assert presets.get_preset("once_mod:ab").description == "only"


def test_a_build_function_reexported_by_a_package_points_to_its_module(user_dir, capsys):
    (user_dir / "mypkg").mkdir()
    (user_dir / "mypkg" / "my_sweeps.py").write_text(ONCE)
    (user_dir / "mypkg" / "__init__.py").write_text("from .my_sweeps import build  # noqa\n")
    assert main(["mypkg:build", "--dry-run", "--out", str(user_dir / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run mypkg.my_sweeps:ab" in err, err
    assert "not a preset defined with @preset" not in err
