"""The labeled/unlabeled split file (``ssl_split.json``) and the raw-format contract it describes.

Raw-format contract (every converter writes it, every nnssl tool reads it)::

    $nnUNet_raw/DatasetXXX_Name/
        dataset.json          nnU-Net's own file; numTraining = number of *labeled* cases
        imagesTr/, labelsTr/  the labeled cases only, exactly nnU-Net's format, so that nnU-Net's
                              fingerprint and plans are computed from labeled cases only
        imagesUnlabeled/      unlabeled cases, same channel naming (CASE_0000.nii.gz, CASE_0001...)
        labelsUnlabeled/      optional: labels that exist but are withheld to simulate a labeled
                              fraction. Training never reads them; diagnostics may.
        imagesTs/, labelsTs/  optional: the test set
        ssl_split.json        this file

``ssl_split.json``::

    {"labeled": [...], "unlabeled": [...], "test": [...],
     "labeled_fraction": 0.1, "seed": 0, "origin": "random" | "paper:<method>/<dataset>" | "file:<path>",
     ...extra keys allowed...}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from nnssl.errors import NnsslError
from nnssl.io import atomic_write_json

SPLIT_FILE_NAME = "ssl_split.json"
ROLES = ("labeled", "unlabeled", "test")
# role -> (image folder, label folder or None when labels are not required)
ROLE_FOLDERS = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", None),
    "test": ("imagesTs", None),
}


class SplitError(NnsslError, ValueError):
    """A split file that is malformed or does not match the files on disk."""


# Case ids become file names in several folders (raw, preprocessed, predictions): letters, digits, '_', '-', '.',
# not starting with '.' or '-' (hidden files, options), no path separators, so an id can never leave its folder.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` is not a safe case id (see ``CASE_ID_PATTERN``), or None when it is."""
    if not isinstance(case_id, str) or not case_id:
        return "case ids must be non-empty strings"
    if CASE_ID_PATTERN.fullmatch(case_id) is None or ".." in case_id:
        return (f"case id {case_id!r} has characters outside [A-Za-z0-9_.-], a leading '.'/'-' or '..' "
                "(ids are file names and must not contain path separators)")
    return None


def check_case_id(case_id: object, where: str) -> str:
    """``case_id`` if it is safe, else a :class:`SplitError` naming ``where`` (a file or option)."""
    problem = case_id_problem(case_id)
    if problem is not None:
        raise SplitError(f"{where}: {problem}")
    return case_id  # type: ignore[return-value]


@dataclass
class SSLSplit:
    labeled: list[str]
    unlabeled: list[str]
    test: list[str] = field(default_factory=list)
    labeled_fraction: float | None = None
    seed: int | None = None
    origin: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labeled_fraction is None:
            pool = len(self.labeled) + len(self.unlabeled)
            self.labeled_fraction = len(self.labeled) / pool if pool else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {
            "labeled": list(self.labeled),
            "unlabeled": list(self.unlabeled),
            "test": list(self.test),
            "labeled_fraction": self.labeled_fraction,
            "seed": self.seed,
            "origin": self.origin,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "SSLSplit":
        if not isinstance(d, dict):
            raise SplitError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("labeled", "unlabeled") if k not in d]
        if missing:
            raise SplitError(f"{source}: missing required key(s) {missing}")
        for role in ROLES:
            if role in d and not (isinstance(d[role], list) and all(isinstance(i, str) for i in d[role])):
                raise SplitError(f"{source}: '{role}' must be a list of case id strings")
            for case_id in d.get(role, []):
                check_case_id(case_id, f"{source} '{role}'")
        known = set(ROLES) | {"labeled_fraction", "seed", "origin"}
        return cls(
            labeled=list(d["labeled"]),
            unlabeled=list(d["unlabeled"]),
            test=list(d.get("test", [])),
            labeled_fraction=d.get("labeled_fraction"),
            seed=d.get("seed"),
            origin=d.get("origin", "unknown"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def check_roles(self, source: str = "<split>") -> None:
        """Each id appears once, in one role only."""
        problems = []
        for role in ROLES:
            ids = getattr(self, role)
            dups = sorted({i for i in ids if ids.count(i) > 1})
            if dups:
                problems.append(f"duplicate ids in '{role}': {dups[:10]}")
        for a_i, a in enumerate(ROLES):
            for b in ROLES[a_i + 1:]:
                both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
                if both:
                    problems.append(f"ids in both '{a}' and '{b}': {both[:10]}")
        if problems:
            raise SplitError(f"{source}: " + "; ".join(problems))


def load_split(path: str | os.PathLike) -> SSLSplit:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: split file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}: not valid JSON ({e})") from e
    split = SSLSplit.from_dict(d, source=str(path))
    split.check_roles(source=str(path))
    return split


def save_split(split: SSLSplit, path: str | os.PathLike) -> None:
    split.check_roles(source=str(path))
    atomic_write_json(path, split.to_dict())


def _case_files(folder: Path, case: str, channels: int, file_ending: str) -> list[Path]:
    return [folder / f"{case}_{c:04d}{file_ending}" for c in range(channels)]


def cases_in_folder(folder: Path, file_ending: str) -> set[str]:
    """Case ids of channel files ``CASE_XXXX<ending>`` in ``folder`` (empty if it does not exist)."""
    if not folder.is_dir():
        return set()
    n = len(file_ending) + 5
    return {
        f[:-n]
        for f in os.listdir(folder)
        if f.endswith(file_ending) and f[-n] == "_" and f[-n + 1:-len(file_ending)].isdigit()
    }


def validate_split_against_raw(split: SSLSplit, raw_dataset_dir: str | os.PathLike, strict: bool = True) -> None:
    """Check the split against the dataset folder; raise :class:`SplitError` naming every problem.

    - every listed id has all its channel files (and a label for labeled cases);
    - ``strict``: every case on disk is listed, in the role its folder implies, so nothing is used by accident;
    - labeled ids are exactly the ``imagesTr`` cases, which is what nnU-Net's fingerprint will see.
    """
    root = Path(raw_dataset_dir)
    source = str(root / SPLIT_FILE_NAME)
    split.check_roles(source)
    ds_json = root / "dataset.json"
    if not ds_json.is_file():
        raise SplitError(f"{ds_json}: dataset.json not found")
    dj = json.loads(ds_json.read_text(encoding="utf-8"))
    channels = len(dj.get("channel_names", dj.get("modality", {"0": None})))
    ending = dj.get("file_ending", ".nii.gz")
    problems: list[str] = []
    for role in ROLES:
        img_dir, lab_dir = ROLE_FOLDERS[role]
        for case in getattr(split, role):
            missing = [str(p) for p in _case_files(root / img_dir, case, channels, ending) if not p.is_file()]
            if lab_dir is not None and not (root / lab_dir / f"{case}{ending}").is_file():
                missing.append(str(root / lab_dir / f"{case}{ending}"))
            if missing:
                problems.append(f"{role} case '{case}' is missing {missing}")
        if strict:
            on_disk = cases_in_folder(root / img_dir, ending)
            unlisted = sorted(on_disk - set(getattr(split, role)))
            if unlisted:
                problems.append(f"{root / img_dir} holds cases not listed as '{role}': {unlisted[:10]}")
    if strict and dj.get("numTraining") is not None and dj["numTraining"] != len(split.labeled):
        problems.append(f"{ds_json}: numTraining={dj['numTraining']} but the split lists {len(split.labeled)} labeled")
    if problems:
        raise SplitError(f"{source} does not match {root}:\n  - " + "\n  - ".join(problems))


def load_and_validate(raw_dataset_dir: str | os.PathLike, strict: bool = True) -> SSLSplit:
    split = load_split(Path(raw_dataset_dir) / SPLIT_FILE_NAME)
    validate_split_against_raw(split, raw_dataset_dir, strict=strict)
    return split


def read_list_file(path: str | os.PathLike) -> list[str]:
    """Ids of a published split list, in file order (order matters: papers label the first N lines).

    Published files mix CRLF and LF and may lack a final newline, so every line is stripped.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s]


def choose_labeled(
    ids: Sequence[str],
    n_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    group_of: Callable[[str], str] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministically choose labeled ids from a pool; returns ``(labeled, unlabeled)``, each sorted.

    Selection is by group when ``group_of`` is given (e.g. ACDC: a patient brings both its frames), and then
    ``n_labeled`` counts groups. Same ids + same seed -> same split, independent of input order.
    """
    if (n_labeled is None) == (fraction is None):
        raise ValueError("give exactly one of n_labeled or fraction")
    unit = "groups" if group_of is not None else "cases"
    group_of = group_of or (lambda i: i)
    groups = sorted({group_of(i) for i in ids})
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
        n_labeled = max(1, int(round(fraction * len(groups))))
    if n_labeled < 1 or n_labeled > len(groups):
        raise ValueError(f"cannot label {n_labeled} {unit}: only {len(groups)} available")
    order = np.random.RandomState(seed).permutation(len(groups))
    chosen = {groups[i] for i in order[:n_labeled]}
    labeled = sorted(i for i in ids if group_of(i) in chosen)
    unlabeled = sorted(i for i in ids if group_of(i) not in chosen)
    return labeled, unlabeled


def labeled_from_list(pool: Iterable[str], labeled_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``pool`` into the given labeled ids and the rest, refusing ids that are not in the pool."""
    pool = list(pool)
    labeled = list(labeled_ids)
    unknown = sorted(set(labeled) - set(pool))
    if unknown:
        raise SplitError(f"labeled ids not in the training pool: {unknown[:10]}")
    lab = set(labeled)
    return labeled, [i for i in pool if i not in lab]
