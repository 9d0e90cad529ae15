"""The speed scripts: bad input to ``benchmarks.peft_speed`` writes nothing.

``main`` created ``--out`` before ``run_speed`` checked the cases and sizes, so an unknown case
or ``--rank 0`` left a new empty output folder behind (the other speed scripts check every
argument first).
"""

from __future__ import annotations

import pytest

from benchmarks import peft_speed


@pytest.mark.parametrize("bad, words", [
    (["--cases", "nope"], "valid cases: wt_s, capaboost_model"),
    (["--cases", ","], "valid cases: wt_s, capaboost_model"),
    (["--rank", "0"], "rank must be an integer >= 1, got 0"),
    (["--batch", "-1"], "batch must be an integer >= 1, got -1"),
    (["--repeats", "0"], "repeats must be an integer >= 1, got 0"),
    (["--threads", "0"], "threads must be an integer >= 1, got 0"),
])
def test_bad_input_creates_no_output_folder(tmp_path, capsys, bad, words):
    out = tmp_path / "new" / "results"
    assert peft_speed.main([*bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "new").exists()  # nothing written, no folder made


def test_out_tilde_still_expanded(tmp_path, monkeypatch, capsys):
    # the fix must keep --out=~/x meaning the home folder; measuring replaced by one fixed row
    row = {"case": "wt_s", "measure": "inference", "variant": "base", "impl": "", "batch": 2,
           "median_ms": 1.0, "ratio": 1.0, "ratio_to": "base", "target": None,
           "meets_target": None}
    monkeypatch.setattr(peft_speed, "measure_case", lambda *a: [dict(row)])
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert peft_speed.main(["--cases", "wt_s", "--out", "~/res"]) == 0
    assert (tmp_path / "res" / "peft_speed.csv").is_file()
    assert not (tmp_path / "~").exists()
    assert "| wt_s | inference | base |" in capsys.readouterr().out
