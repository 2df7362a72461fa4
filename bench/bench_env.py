"""What a benchmark table records about where it ran, shared by the bench scripts."""
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short commit of this checkout; GIT_COMMIT where the copy of the tree has no .git; "?" when neither."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    except OSError:
        return "?"
    return done.stdout.strip() or "?"
