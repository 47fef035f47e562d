"""The options of a conversion: how to choose the split roles, and how to write.

:class:`SplitOptions` holds the role choice of ``nnssl_convert`` (random with a seed, ``--split paper`` with a
published list, or ``--split-file``; labeled count or fraction, test hold-out, subset of real unlabeled images) and
checks it on construction, so a bad option fails before any file is read, with a message naming the option.
:class:`ConversionOptions` adds how to write (``--overwrite``, worker processes, progress bar); every
``convert_<dataset>`` takes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError

MAX_SEED = 2**32 - 1  # numpy's RandomState accepts seeds in [0, 2**32 - 1]


@dataclass(frozen=True)
class SplitOptions:
    """How to choose roles. ``split``: "random" (seeded), "paper" (published lists) or "file" (``split_file``).

    ``labeled_count``/``labeled_fraction`` count groups (ACDC: patients). ``test_fraction`` holds out part of the
    labeled pool as test set (None: the dataset's default); the held-out part depends on ``test_seed`` only, so
    changing ``seed`` changes the labeled choice but never the test set. ``unlabeled_count`` keeps a seeded subset
    of the dataset's real unlabeled images (FLARE22's 2000, AMOS's unlabeled release).
    """

    split: str = "random"
    labeled_count: int | None = None
    labeled_fraction: float | None = None
    seed: int = 0
    test_fraction: float | None = None
    test_seed: int = 0
    unlabeled_count: int | None = None
    split_file: Path | None = None
    splits_dir: Path | None = None
    paper: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("random", "paper", "file"):
            raise ConversionError(f"split must be random, paper or file, got {self.split!r}")
        if self.labeled_count is not None and self.labeled_fraction is not None:
            raise ConversionError("give only one of --labeled-count and --labeled-fraction")
        if self.labeled_count is not None and self.labeled_count < 1:
            raise ConversionError(f"--labeled-count must be >= 1, got {self.labeled_count}")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ConversionError(f"--labeled-fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.test_fraction is not None and not 0 <= self.test_fraction < 1:
            raise ConversionError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        for option, seed in (("--seed", self.seed), ("--test-seed", self.test_seed)):
            if not 0 <= seed <= MAX_SEED:
                raise ConversionError(f"{option} must be in 0..{MAX_SEED}, got {seed}")
        if self.unlabeled_count is not None and self.unlabeled_count < 0:
            raise ConversionError(f"--unlabeled-count must be >= 0, got {self.unlabeled_count}")
        if (self.split == "file") != (self.split_file is not None):
            raise ConversionError("--split-file PATH goes with split 'file' (and only with it)")


@dataclass(frozen=True)
class ConversionOptions:
    """Options every converter takes: the split, plus how to write."""

    split: SplitOptions = field(default_factory=SplitOptions)
    overwrite: bool = False
    num_processes: int = 1
    progress: bool = True
