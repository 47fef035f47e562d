"""Helpers for the bad-input tests: run a console script in a subprocess and check that it failed the way a user
error must fail (exit 1, one message naming the file/id and the problem, no traceback, nothing written or deleted).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


def tree_snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime_ns)}`` of every file and folder under ``roots`` (hidden ones included)."""
    snap: dict[str, tuple[int, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                snap[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return snap


def run_script(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """Exit ``code``, no traceback, and every fragment (file names, ids, the problem) in the output; returns the
    error line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{out[-4000:]}"
    assert TRACEBACK not in out, out[-4000:]
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in the output:\n{out[-4000:]}"
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors, f"no error line on stderr:\n{proc.stderr[-2000:]}"
    return errors[-1]


def assert_unchanged(before: dict[str, tuple[int, int]], *roots: Path) -> None:
    after = tree_snapshot(*roots)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"
