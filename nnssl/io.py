"""Atomic file and folder writes.

A killed job (Ctrl-C, OOM killer, preempted node) must never leave a file that looks complete but is not.
Everything here writes to a temporary name in the destination's own folder (same file system, so the final
``os.replace`` is atomic) and only then moves it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from nnssl.errors import OutputExistsError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # explicit: CI may run under the C locale
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs should have the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


PARTIAL_INFIX = ".partial."


def partial_dir_prefix(final: str | os.PathLike) -> str:
    """Name prefix of the temporary folders :func:`atomic_output_dir` creates next to ``final``."""
    return f".{Path(final).name}{PARTIAL_INFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def stale_partial_dirs(final: str | os.PathLike) -> list[Path]:
    """Temporary folders of ``final`` left by a killed run (``.NAME.partial.PID.XXXX``, or the older
    ``.NAME.partial.XXXX`` without a pid); folders of a process that is still running are not stale."""
    final = Path(final)
    prefix = partial_dir_prefix(final)
    if not final.parent.is_dir():
        return []
    stale = []
    for p in sorted(final.parent.iterdir()):
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid, sep, _ = p.name[len(prefix):].partition(".")
        if sep and pid.isdigit() and _pid_alive(int(pid)):
            continue  # another run writing the same output right now
        stale.append(p)
    return stale


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False, replace_only_with: tuple[str, ...] = (),
                      clean_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; move it to ``final`` only if the block succeeds.

    Refuses to touch an existing ``final`` unless ``overwrite`` is set, so a user's data is never replaced
    without being asked. With ``replace_only_with`` (file names, e.g. ``("dataset.json", "ssl_split.json")``) an
    existing ``final`` is only replaced when it holds all of them, i.e. when it is an output of the same kind and
    not an arbitrary folder of the user. ``clean_stale`` first removes the temporary folders of ``final`` left by
    a killed run (:func:`stale_partial_dirs`). On any error the temporary folder is removed and ``final`` is left
    as it was.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{final} already exists; pass --overwrite to replace it")
        missing = [name for name in replace_only_with if not (final / name).is_file()]
        if missing:
            raise OutputExistsError(f"{final} exists and is not an output of this tool (no {' + '.join(missing)}); "
                                    "--overwrite only replaces such outputs: remove it yourself or choose another "
                                    "output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        for stale in stale_partial_dirs(final):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial_dir_prefix(final)}{os.getpid()}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a dataset folder should have the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        if trash.is_symlink():
            trash.unlink()  # a replaced symlink: remove the link, never the folder it points to
        else:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
