"""Review 14: training harness (resume refusals, schedule, metrics) against known answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wtmodels import train as train_mod
from wtmodels.train import run

TINY = dict(model="test_wt", dataset="digits", train_size=40, test_size=20, batch_size=16,
            threads=1, progress="none", seed=0, device="cpu", epochs=1)


def _snapshot(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("r14") / "run"
    run({**TINY, "out": str(out)})
    return out


def test_resume_names_every_differing_setting(finished, capsys):
    # lr and epochs both differ: one line naming both (it named epochs alone, so the retry
    # with the epochs fixed failed again on lr)
    before = _snapshot(finished)
    code = train_mod.main(["--out", str(finished), "--resume", "--lr", "0.5", "--epochs", "2",
                           "--depth", "2"])  # depth 2 is the run's own (test_wt's default)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "epochs=2" in err and "lr=0.5" in err and "depth" not in err, err
    assert "epochs=1" in err and "lr=0.01" in err, err  # the run's values
    assert _snapshot(finished) == before
