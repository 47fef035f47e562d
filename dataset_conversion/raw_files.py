"""Raw files of a download: list them (also inside ``.zip`` archives), match them by name, pair images with labels.

:func:`walk_raw_tree` lists every file under a raw folder as a :class:`FileRef` (a file on disk or a member of a zip
archive, with its folder names, so that converters can tell training from testing parts); hidden files and OS junk
are skipped with one note line. :func:`match_files` picks the files whose name matches a pattern, keyed by case,
and refuses two files for one case (except an extracted copy next to its archive); :func:`pair_files` checks that
every image has its label and the reverse. Converters only describe their layout with these; nothing is read here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

from .errors import ConversionError

_IGNORED_NAMES = {"__macosx", "desktop.ini", "thumbs.db"}


@dataclass(frozen=True)
class FileRef:
    """A raw file on disk or a member of a zip archive. ``folders``: its folder names relative to the raw root
    (a zip archive counts as a folder named by its stem), used to tell training from testing parts."""

    path: Path
    member: str | None = None
    folders: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def in_folder(self, pattern: str) -> bool:
        """True when one of the file's folders fully matches ``pattern`` (regex, case-insensitive)."""
        return any(re.fullmatch(pattern, f, flags=re.IGNORECASE) for f in self.folders)

    @contextlib.contextmanager
    def local_path(self) -> Iterator[Path]:
        """A real file path for readers that need one; zip members are extracted to a temporary file."""
        if self.member is None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="nnssl_zip_") as tmp:
            target = Path(tmp) / self.name
            self.copy_to(target)
            yield target

    def copy_to(self, dest: Path) -> None:
        if self.member is None:
            shutil.copyfile(self.path, dest)
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ConversionError(f"{self}: cannot extract from archive ({e})") from e


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _zip_members(archive: Path, folders: tuple[str, ...]) -> list[FileRef]:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{archive}: not a readable zip archive ({e})") from e
    refs = []
    for member in names:
        parts = PurePosixPath(member).parts
        if member.endswith("/") or any(_ignored(p) for p in parts):
            continue
        refs.append(FileRef(archive, member, folders + (archive.name[: -len(".zip")],) + parts[:-1]))
    return refs


def walk_raw_tree(root: str | os.PathLike) -> list[FileRef]:
    """Every file under ``root`` (following links, looking into ``.zip`` archives). Hidden files and folders and OS
    junk (``__MACOSX``, ``Thumbs.db``) are skipped, and reported in one note line so that nothing is skipped
    silently (downloads often carry them; a case file hidden by a leading '.' would otherwise just go missing)."""
    root = Path(root)
    if not root.exists():
        raise ConversionError(f"{root}: raw data folder does not exist")
    if not root.is_dir():
        raise ConversionError(f"{root}: raw data path is not a folder")
    refs: list[FileRef] = []
    skipped: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        skipped += [Path(dirpath) / d for d in dirnames if _ignored(d)]
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        folders = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if _ignored(name):
                skipped.append(Path(dirpath) / name)
                continue
            path = Path(dirpath) / name
            if name.lower().endswith(".zip"):
                refs.extend(_zip_members(path, folders))
            else:
                refs.append(FileRef(path, None, folders))
    if skipped:
        shown = ", ".join(str(p) for p in sorted(skipped)[:3])
        print(f"note: skipped {len(skipped)} hidden or system file(s)/folder(s) in {root}: {shown}"
              + (", ..." if len(skipped) > 3 else ""))
    if not refs:
        raise ConversionError(f"{root}: raw data folder is empty")
    return refs


def match_files(refs: Sequence[FileRef], pattern: str, where: Callable[[FileRef], bool] | None = None,
                ) -> dict[str, FileRef]:
    """``{key: file}`` for files whose name fully matches ``pattern`` (its first group is the key).

    The same key twice is an error naming both files, except that an extracted file wins over the same file inside
    a zip archive (mirrors often ship both).
    """
    found: dict[str, FileRef] = {}
    for ref in refs:
        m = re.fullmatch(pattern, ref.name, flags=re.IGNORECASE)
        if m is None or (where is not None and not where(ref)):
            continue
        key = m.group(1)
        other = found.get(key)
        if other is not None:
            if (other.member is None) == (ref.member is None):
                raise ConversionError(f"two raw files for the same case '{key}': {other} and {ref}")
            if ref.member is not None:
                continue
        found[key] = ref
    return found


def pair_files(images: dict[str, FileRef], labels: dict[str, FileRef], what: str,
               expected_label: Callable[[str], str] | None = None) -> None:
    """Every image has its label and the reverse; the error names the files without a partner.

    ``expected_label(key)`` describes the label file that was looked for (name and folder), so that the user knows
    what is missing and where it should be."""
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    problems = [f"image without label: {images[k]}" + (f" (no {expected_label(k)})" if expected_label else "")
                for k in no_label[:10]]
    problems += [f"label without image: {labels[k]}" for k in no_image[:10]]
    if problems:
        extra = len(no_label) + len(no_image) - len(problems)
        more = f" (and {extra} more)" if extra > 0 else ""
        sep = " " if len(problems) == 1 else "\n  "  # one problem: one line, as every other error
        raise ConversionError(f"{what}: unpaired files{more}:{sep}" + sep.join(problems))
