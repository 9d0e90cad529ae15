"""What a new user ran into: hand-written results with odd content, command-line misuse, Ctrl-C."""

from __future__ import annotations

import os

import pytest

from benchmarks import plot
from benchmarks import run as run_cli
from benchmarks.recommend import describe, recommend
from benchmarks.recommend import main as recommend_main
from benchmarks.results_io import write_rows
from benchmarks.summary import summary_table, to_markdown


def _rows(accs: dict[int, list]) -> list[dict]:
    """One WT row per (depth, seed) with the given test accuracies (anything, as written)."""
    return [{"run_id": f"d{d}s{s}", "label": "WT", "model": "wt_s", "depth": d, "width": 16,
             "seed": s, "test_acc": acc, "params": 1000, "status": "ok"}
            for d, values in accs.items() for s, acc in enumerate(values)]


def test_runs_without_a_finite_accuracy_are_flagged_not_silently_dropped(tmp_path, capsys):
    # NaN / blank / text accuracies were dropped from the means without a word: a point
    # "over seeds" stood on one seed, and a configuration with none vanished from the plot
    rows = _rows({2: [float("nan"), 0.8], 4: [None, "high"], 8: [0.9, 0.91]})
    fig = plot.plot_accuracy_vs_depth(rows)
    ax = fig.axes[0]
    assert any(t.get_text() == "1/2 without accuracy" for t in ax.texts)  # depth 2
    assert "WT, depth 4, width 16 (2/2 without accuracy)" in fig.get_supxlabel()
    markdown = to_markdown(summary_table(rows)).splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert "runs without accuracy" in header
    pick = recommend(rows, params=2000, tolerance=20)
    assert pick["choice"]["depth"] == 2
    assert "80.0 % over 1 seed(s) [1/2 without accuracy]" in describe(pick["choice"])
    write_rows(str(tmp_path / "results.csv"), rows)
    assert plot.main([str(tmp_path)]) == 0
    assert "runs without accuracy" in (tmp_path / "summary.md").read_text()


def test_recommend_lists_configurations_whose_every_seed_diverged():
    # their clean means are NaN, so they fell outside every budget and were never listed
    rows = _rows({2: [0.1, 0.1], 4: [0.8, 0.82]})
    for row in rows[:2]:
        row["status"] = "diverged"
    pick = recommend(rows, params=2000)
    assert pick["choice"]["depth"] == 4
    assert [g["depth"] for g in pick["unstable"]] == [2]
    assert "no clean run [2/2 diverged]" in describe(pick["unstable"][0])
    with pytest.raises(ValueError, match=r"had a diverged or failed run \(1 configuration"):
        recommend(rows[:2], params=2000)


def test_recommend_says_what_is_missing(tmp_path, capsys):
    rows = [{"run_id": "a", "depth": 8, "test_acc": 0.6, "params": 10}]  # no label, no time
    assert describe(recommend(rows, params=20)["choice"]).startswith("depth 8: 60.0 %")
    write_rows(str(tmp_path / "results.csv"), rows)
    assert recommend_main([str(tmp_path), "--time", "60"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run in these results records train_time_s" in err


@pytest.mark.parametrize("args, message", [
    (["--set", "epochs=2", "--set", "epochs=3"], "--set: epochs given more than once"),
    (["--set", "f-max-iter=2", "--set", "f_max_iter=3"], "f_max_iter given more than once"),
    (["--partition", "gpu"], "--partition: only with --launcher submitit"),
    (["--timeout-min", "30"], "--timeout-min: only with --launcher submitit"),
    (["--launcher", "submitit", "--timeout-min", "0"], "--timeout-min: must be >= 1"),
    (["--launcher", "submitit", "--cpus-per-task", "0"], "--cpus-per-task: must be >= 1"),
    (["--launcher", "submitit", "--gpus-per-node", "-1"], "--gpus-per-node: must be >= 0"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, args, message):
    # a repeated --set kept its last value and submitit's options did nothing without it
    out = tmp_path / "X"
    assert run_cli.main(["quick", "--smoke", "--dry-run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_submitit_options_reach_the_launcher(tmp_path, monkeypatch):
    seen = {}

    def fake_sweep(*_, launcher_options=None, **__):
        seen.update(launcher_options)
        raise ValueError("stop here")

    monkeypatch.setattr(run_cli, "sweep", fake_sweep)
    run_cli.main(["quick", "--out", str(tmp_path), "--launcher", "submitit", "--timeout-min", "9"])
    assert seen == {"cluster": None, "slurm_partition": None, "gpus_per_node": 0,
                    "cpus_per_task": 1, "timeout_min": 9}


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    # a Ctrl-C printed a thread pool's traceback
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli, "sweep", interrupted)
    assert run_cli.main(["quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rerun the same command" in err


def test_notebook_survives_a_sweep_with_no_recommendation(tmp_path, monkeypatch):
    # every configuration under the notebook's median budget had a diverged seed: the
    # recommend cell raised and the notebook stopped with an error
    import nbclient
    import nbformat

    rows = _rows({2: [0.1, 0.1], 4: [0.8, 0.82]})
    for row in rows:
        row["status"] = "diverged" if row["seed"] == 0 else "ok"
    write_rows(str(tmp_path / "results.csv"), rows)
    monkeypatch.setenv("WTMODELS_RESULTS", str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    notebook = os.path.join(root, "notebooks", "guidelines.ipynb")
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={
        "metadata": {"path": os.path.dirname(notebook)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
    assert "no recommendation: budget: every configuration" in text


def test_extrapolate_says_how_many_rows_it_added(tmp_path, capsys):
    # with nothing to add (hand-written rows, no checkpoints) it printed nothing at all
    from benchmarks.extrapolate import main as extrapolate_main

    write_rows(str(tmp_path / "results.csv"), _rows({2: [0.8]}))
    assert extrapolate_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no row added to" in out and "no run with a checkpoint" in out
    assert not (tmp_path / "extrapolation.csv").exists()  # no file was made


def test_a_sweep_at_one_width_names_it_in_the_title():
    # quick runs one width: the legend said "WT" and nothing said which width
    rows = _rows({2: [0.8], 4: [0.85]})
    assert plot.plot_accuracy_vs_depth(rows).axes[0].get_title() == (
        "Accuracy vs depth, width 16")
    two = rows + [dict(r, width=32, run_id=r["run_id"] + "w") for r in rows]
    assert plot.plot_accuracy_vs_depth(two).axes[0].get_title() == (
        "Accuracy vs depth")  # the legend names them


def test_a_spreadsheet_saved_results_file_keeps_its_run_ids(tmp_path):
    # "CSV UTF-8" from a spreadsheet starts with a byte-order mark: the first column became
    # "\ufeffrun_id", so a rerun found no run recorded and wrote every row again
    from benchmarks.results_io import append_row, finished_ids, read_rows

    path = tmp_path / "results.csv"
    path.write_bytes(b"\xef\xbb\xbfrun_id,label,test_acc\r\na,WT,0.8\r\nb,WT,0.9\r\n")
    assert finished_ids(path) == {"a", "b"}
    assert append_row(path, {"run_id": "a", "test_acc": 0.1}) is False
    assert append_row(path, {"run_id": "c", "test_acc": 0.7}) is True
    assert [r["run_id"] for r in read_rows(path)] == ["a", "b", "c"]
    assert list(read_rows(path)[0]) == ["run_id", "label", "test_acc"]


@pytest.mark.parametrize("text, message", [
    ("run_id,depth,depth,test_acc\na,2,3,0.8\n", "'depth' appear more than once"),
    ("run_id,label,test_acc\na,WT,0.8\n,WT,0.9\n", "line 3 has no run_id"),
])
def test_a_header_naming_a_column_twice_or_a_row_without_an_id_is_damage(tmp_path, capsys,
                                                                          text, message):
    # a repeated column was read silently (the last one won); a row without a run_id made a
    # rerun write every row again
    (tmp_path / "results.csv").write_text(text)
    command = plot.main if "depth" in text else (
        lambda args: run_cli.main(["quick", "--smoke", "--dry-run", "--out", *args]))
    assert command([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("options, refused", [
    ({"cluster": "slurm"}, False),  # a Slurm submit host usually has no GPU; the jobs check
    ({"cluster": "local"}, True), ({"cluster": "debug"}, True),
])
def test_device_cuda_is_checked_where_the_runs_execute(tmp_path, monkeypatch, options, refused):
    monkeypatch.setattr(run_cli, "_cuda_available", lambda: False)
    call = lambda: run_cli.sweep("quick", str(tmp_path / "s"), smoke=True, device="cuda",  # noqa: E731
                                 launcher="submitit", launcher_options=options, dry_run=True,
                                 echo=lambda *a, **k: None)
    if refused:
        with pytest.raises(ValueError, match="no CUDA device"):
            call()
    else:
        call()
    with pytest.raises(ValueError, match="no CUDA device"):  # the local launcher runs here
        run_cli.sweep("quick", str(tmp_path / "s"), smoke=True, device="cuda", dry_run=True)


def test_a_set_that_makes_runs_refuse_their_own_settings_is_refused_before_any_run(tmp_path,
                                                                                   capsys):
    # fashion's smoke size trains on synthetic images of its shape: on the real dataset those
    # shape settings would be ignored, and every run failed after the sweep had started
    out = tmp_path / "f"
    code = run_cli.main(["fashion", "--smoke", "--set", "dataset=fashion_mnist",
                         "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ignore synthetic_channels" in err[0]
    assert not (out / "results.csv").exists()


def test_recommend_does_not_compare_accuracies_across_datasets(tmp_path, capsys):
    digits = [dict(r, dataset="digits") for r in _rows({2: [0.99, 0.98], 4: [0.97, 0.97]})]
    fashion = [dict(r, dataset="fashion_mnist", run_id="f" + r["run_id"], params=500)
               for r in _rows({2: [0.80, 0.81], 4: [0.82, 0.83]})]
    with pytest.raises(ValueError, match="runs on digits, fashion_mnist.*--dataset"):
        recommend(digits + fashion, params=2000)
    pick = recommend(digits + fashion, params=2000, dataset="fashion_mnist")
    assert pick["choice"]["depth"] == 4 and pick["feasible"] == 2
    with pytest.raises(ValueError, match="no runs on 'cifar10'"):
        recommend(digits + fashion, params=2000, dataset="cifar10")
    write_rows(str(tmp_path / "results.csv"), digits + fashion)
    assert recommend_main([str(tmp_path), "--params", "2000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert recommend_main([str(tmp_path), "--params", "2000", "--dataset", "digits"]) == 0
