"""Published split lists: where they are, how to read them, and how papers choose their labeled cases.

The lists of the papers (SSL4MIS, BCP, SDCL, UA-MT, DHC, GenericSSL, GuidedNet, MGCC) ship with the package in
``nnssl/data/paper_splits``; :func:`find_splits_dir` finds them (``--splits-dir``, else ``$NNSSL_SPLITS_DIR``, else
the packaged copy, read with :mod:`importlib.resources`). A converter's ``paper_split`` reads its lists with
:func:`read_published_list` and returns a :class:`PaperSplit` with the ids as published; :func:`first_n_labeled`
labels the first N entries (or groups, ACDC: patients) of a train list, as the papers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nnssl.split import read_list_file

from .errors import ConversionError
from .options import SplitOptions

SPLITS_DIR_ENV = "NNSSL_SPLITS_DIR"
PACKAGED_SPLITS = "paper_splits"  # package data of nnssl.data


@dataclass
class PaperSplit:
    """Roles as published (ids as in the list files, the dataset's ``normalize_id`` maps them to case ids)."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    origin: str
    val: list[str] = field(default_factory=list)
    labeled_fraction: float | None = None


def find_splits_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder of published split lists: ``explicit``, else ``$NNSSL_SPLITS_DIR``, else the copy that ships
    with the package (``nnssl/data/paper_splits``, read with :mod:`importlib.resources`, so an installed nnssl
    finds it without the source tree)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise ConversionError(f"--splits-dir {path}: folder not found")
        return path
    env = os.environ.get(SPLITS_DIR_ENV)
    if env:
        if not Path(env).is_dir():
            raise ConversionError(f"${SPLITS_DIR_ENV}={env}: folder not found")
        return Path(env)
    return packaged_splits_dir()


def packaged_splits_dir() -> Path:
    """``nnssl/data/paper_splits`` of the installed package (a real folder: nnssl is never installed zipped)."""
    from importlib.resources import files

    folder = files("nnssl.data") / PACKAGED_SPLITS
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ConversionError(f"the published split lists that ship with nnssl ({folder}) are missing from this "
                              f"installation: reinstall nnssl, or pass --splits-dir DIR / set ${SPLITS_DIR_ENV}")
    return folder


def read_published_list(splits_dir: Path, relative: str) -> list[str]:
    """Ids of one published list file, in file order (CRLF and missing final newlines tolerated)."""
    path = splits_dir / relative
    if not path.is_file():
        raise ConversionError(f"published split list {path} not found (splits folder {splits_dir})")
    ids = read_list_file(path)
    if not ids:
        raise ConversionError(f"published split list {path} is empty")
    return ids


def first_n_labeled(ordered_ids: Sequence[str], options: SplitOptions, default_count: int | None, where: str,
                    group_of: Callable[[str], str] | None = None) -> tuple[list[str], list[str], int]:
    """Papers label the first N entries (or groups) of their train list; N from the options or ``default_count``.
    Returns ``(labeled, unlabeled, n_groups_in_pool)``."""
    group_of = group_of or (lambda i: i)
    groups = list(dict.fromkeys(group_of(i) for i in ordered_ids))
    if options.labeled_count is not None:
        n = options.labeled_count
    elif options.labeled_fraction is not None:
        n = max(1, int(round(options.labeled_fraction * len(groups))))
    elif default_count is not None:
        n = default_count
    else:
        raise ConversionError(f"{where}: pass --labeled-count or --labeled-fraction")
    if n > len(groups):
        raise ConversionError(f"{where}: cannot label {n}, the published train list has only {len(groups)}")
    chosen = set(groups[:n])
    return ([i for i in ordered_ids if group_of(i) in chosen], [i for i in ordered_ids if group_of(i) not in chosen],
            len(groups))
