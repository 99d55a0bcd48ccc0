"""Where a result came from: the commit of the checkout that produced it (one function, used by every writer).

Result files (experiment runs, campaigns, every `scripts/bench_*.py`) record `git_commit()`:

- `$SLORA_GIT_COMMIT`, when set. A copy of the tree without its `.git` (the lent GPU machine
  receives the working tree, not the repository) cannot know its commit, so the command that
  runs there says it: `SLORA_GIT_COMMIT=$(git rev-parse HEAD)` written into it here.
- Otherwise `git rev-parse HEAD` of the checkout this package lives in, with `-dirty` appended
  when tracked files differ from that commit (the result then came from uncommitted code; files
  under `benchmarks/results/`, which runs rewrite, and Markdown files do not count).
- None when the package does not sit at the top of a git checkout. `git` looks for a repository
  in parent folders too, so a copy inside some other repository would otherwise report that
  repository's HEAD.
"""

from __future__ import annotations

import os
import subprocess

ENV = "SLORA_GIT_COMMIT"
RESULTS = "benchmarks/results"  # recorded results and Markdown notes: editing them does not make the code dirty
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def git_commit(path: str | None = None, *, short: bool = False) -> str | None:
    """The commit a result came from (module docstring); `path`: another checkout's root (the env var
    then does not apply); `short`: the abbreviated hash."""
    if path is None and os.environ.get(ENV):
        return os.environ[ENV]
    root = os.path.realpath(path or REPO_ROOT)
    try:
        if os.path.realpath(_git(root, "rev-parse", "--show-toplevel")) != root:
            return None
        sha = _git(root, "rev-parse", "--short" if short else "--verify", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS}",
                     ":(exclude,glob)**/*.md")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")
