"""What a run records of where it came from: the commit, marked when the working tree differs from it."""

import os
import shutil
import subprocess
import sys

from conftest import REPO
from hetconv import provenance


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_is_marked_dirty_when_a_tracked_file_differs_and_unknown_outside_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "layer.py").write_text("part = 4\n")
    git(repo, "add", "layer.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "layer")
    monkeypatch.setattr(provenance, "REPO_ROOT", repo)
    head = git(repo, "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("untracked files do not change what runs\n")
    assert provenance.git_commit() == head
    (repo / "layer.py").write_text("part = 8\n")
    assert provenance.git_commit() == head + "-dirty"
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above it
    monkeypatch.setattr(provenance, "REPO_ROOT", outside)
    assert provenance.git_commit() == "unknown"


def test_a_script_runs_its_own_checkouts_code(tmp_path):
    """A venv shared by two checkouts (one conda env, a git worktree) has one installed: scripts/, like train.py, must
    not count, time or tabulate with the other's code, nor write into its results/."""
    other = tmp_path / "checkout"
    for folder in ("hetconv", "models", "scripts"):
        shutil.copytree(REPO / folder, other / folder)
    report = other / "hetconv" / "report.py"
    report.write_text(report.read_text().replace('"expected a whole number >= 1', '"this checkout wants a number >= 1'))
    result = subprocess.run([sys.executable, str(other / "scripts" / "make_fake_cifar.py"), str(tmp_path / "data"),
                             "--train", "0"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 2 and "this checkout wants a number >= 1" in result.stderr
