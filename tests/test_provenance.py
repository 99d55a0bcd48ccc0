"""`slora_jax.provenance.git_commit`: what result files record as their commit."""

from __future__ import annotations

import subprocess

import pytest

from slora_jax import provenance
from slora_jax.provenance import git_commit


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a.txt").write_text("one\n")
    git(root, "add", "a.txt")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_commit_and_dirty_flag(repo):
    sha = git(repo, "rev-parse", "HEAD")
    assert git_commit(str(repo)) == sha and len(sha) == 40
    assert sha.startswith(git_commit(str(repo), short=True)) and len(git_commit(str(repo), short=True)) < 40
    (repo / "new.txt").write_text("untracked files do not make a tree dirty\n")
    assert git_commit(str(repo)) == sha
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text("{}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a result")
    sha = git(repo, "rev-parse", "HEAD")
    (results / "r.json").write_text('{"rewritten": true}\n')
    assert git_commit(str(repo)) == sha  # a run rewriting a recorded result is not uncommitted code
    (repo / "NOTES.md").write_text("notes\n")
    git(repo, "add", "NOTES.md")
    git(repo, "commit", "-q", "-m", "notes")
    sha = git(repo, "rev-parse", "HEAD")
    (repo / "NOTES.md").write_text("notes edited while a run goes\n")
    assert git_commit(str(repo)) == sha
    (repo / "a.txt").write_text("two\n")
    assert git_commit(str(repo)) == sha + "-dirty"


def test_a_copy_inside_another_repository_has_no_commit(repo):
    """The bug this fixes: `git rev-parse HEAD` in a copy of the tree that lies inside some other repository
    (and has no .git of its own) printed that repository's HEAD."""
    copy = repo / "copy_of_tree"
    copy.mkdir()
    assert git_commit(str(copy)) is None


def test_not_a_repository(tmp_path):
    assert git_commit(str(tmp_path)) is None


def test_environment_names_the_commit(monkeypatch, repo):
    monkeypatch.setenv(provenance.ENV, "abc123")
    assert git_commit() == "abc123"
    assert git_commit(str(repo)) == git(repo, "rev-parse", "HEAD")  # another checkout: its own commit
    monkeypatch.delenv(provenance.ENV)
    here = git_commit()
    assert here is None or here.split("-")[0] == git(provenance.REPO_ROOT, "rev-parse", "HEAD")
