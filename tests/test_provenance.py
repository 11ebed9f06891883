"""What a run records of where it came from: the commit, marked when the working tree differs from it."""

import subprocess

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
