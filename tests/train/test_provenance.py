"""git_sha: rewritten benchmark results do not mark the code dirty; code edits still do."""

import subprocess

from wtmodels.provenance import git_sha

GIT = ["git", "-c", "user.email=a@b", "-c", "user.name=n"]


def _repo(root):
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "solvers.md").write_text("old numbers")
    (root / "benchmarks" / "solvers.py").write_text("code")
    (root / "results").mkdir()
    (root / "results" / "other.md").write_text("x")
    subprocess.run(["git", "add", "."], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "x"], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_results_rewritten_by_a_run_leave_the_sha_clean(tmp_path):
    sha = _repo(tmp_path)
    assert git_sha(str(tmp_path)) == sha
    (tmp_path / "benchmarks" / "results" / "solvers.md").write_text("new numbers")
    assert git_sha(str(tmp_path)) == sha  # a second benchmark run measures the same code
    # a results folder elsewhere is not special
    (tmp_path / "results" / "other.md").write_text("y")
    assert git_sha(str(tmp_path)) == sha + "-dirty"


def test_a_code_edit_beside_new_results_is_dirty(tmp_path):
    sha = _repo(tmp_path)
    (tmp_path / "benchmarks" / "results" / "solvers.md").write_text("new numbers")
    (tmp_path / "benchmarks" / "solvers.py").write_text("edited code")
    assert git_sha(str(tmp_path)) == sha + "-dirty"
