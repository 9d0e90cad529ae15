"""Findings of killing training runs at random moments (SIGKILL / SIGINT fuzzing), pinned down
deterministically."""

from __future__ import annotations

import json

from wtmodels import train as train_mod

SETTINGS = ["--model", "test_wt", "--dataset", "digits", "--train-size", "64", "--test-size",
            "32", "--batch-size", "32", "--epochs", "1", "--threads", "1", "--progress", "none",
            "--device", "cpu"]


def test_ctrl_c_before_the_start_files_names_a_command_that_works(tmp_path, capsys,
                                                                     monkeypatch):
    # Ctrl-C during data loading / model building (before config.json is written) said
    # "--resume starts the run over", but --resume refuses a directory without config.json
    # (exit 2): the advice must be one that then trains the run
    out = tmp_path / "run"
    argv = [*SETTINGS, "--out", str(out)]

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod._Trainer, "_write_start_files", interrupted)
    assert train_mod.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wtmodels.train: interrupted; ")
    assert not (out / train_mod.CONFIG_FILE).exists()
    monkeypatch.undo()

    follow = argv + ["--resume"] if "--resume" in err else argv
    assert train_mod.main(follow) == 0, capsys.readouterr().err
    done = json.loads((out / train_mod.DONE_FILE).read_text())
    assert done["epochs"] == 1 and done["final"]["epoch"] == 1
    # and --resume there is indeed refused, one line, exit 2 (so it must not be the advice)
    other = tmp_path / "other"
    monkeypatch.setattr(train_mod._Trainer, "_write_start_files", interrupted)
    assert train_mod.main([*SETTINGS, "--out", str(other)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert train_mod.main([*SETTINGS, "--out", str(other), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_ctrl_c_while_reading_the_command_line_does_not_advise_resume(tmp_path, capsys,
                                                                       monkeypatch):
    # a SIGINT 56 ms into main() (fuzzing) landed in parse_settings: no --out known yet, and
    # the line said "--resume starts the run over"
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "parse_settings", interrupted)
    assert train_mod.main([*SETTINGS, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" not in err and "same command again" in err


def test_ctrl_c_in_the_capaboost_experiment_is_one_line_and_exit_130(tmp_path, capsys,
                                                                       monkeypatch):
    # SIGINT mid-experiment printed a ~70-line traceback and the process died by SIGINT (-2),
    # unlike wtmodels.train and benchmarks.run (one line, exit 130)
    from benchmarks import capaboost

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("run_capaboost", "write_summary"):
        with monkeypatch.context() as patch:
            if name == "write_summary":
                patch.setattr(capaboost, "run_capaboost", lambda *a, **k: [])
            patch.setattr(capaboost, name, interrupted)
            assert capaboost.main(["--out", str(tmp_path / name), "--smoke"]) == 130
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "interrupted; rerun the same command" in err
