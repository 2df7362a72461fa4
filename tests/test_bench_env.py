"""bench/bench_env.py: the commit a benchmark table names."""
import re
import subprocess
from pathlib import Path

from bench.bench_env import git_commit

REPO = Path(__file__).resolve().parents[1]


def test_git_commit_is_this_checkouts_unless_set(monkeypatch):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    assert re.fullmatch(r"[0-9a-f]{7,}", git_commit()) and git_commit() == head.strip()
    monkeypatch.setenv("GIT_COMMIT", "1234abc")  # a copy of the tree without .git (the GPU machine)
    assert git_commit() == "1234abc"
