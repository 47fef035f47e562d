"""Split a long per-case job into parts, the way ``nnUNetv2_predict -num_parts N -part_id i`` does.

Part ``i`` of ``N`` takes every ``N``-th case of the sorted list starting at ``i`` (nnU-Net's ``list[i::N]``), so the
parts are disjoint, cover every case and do not depend on which part starts first. Each part writes only its own
cases into the shared output folder (atomically, each through its own temporary folder), so N GPUs or nodes that
share a file system (a SLURM array) run the parts concurrently; a part that is killed is simply run again. The
command without parts then checks that every case is done (computing what is missing) and finishes the job.

nnU-Net has no reusable function for this (its predictor slices inline), hence these few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

from nnssl.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """Part ``part_id`` of ``num_parts`` (``Part(1, 0)`` is the whole job)."""

    num_parts: int = 1
    part_id: int = 0

    def __post_init__(self) -> None:
        if self.num_parts < 1:
            raise InputError(f"-num_parts must be >= 1, got {self.num_parts}")
        if not 0 <= self.part_id < self.num_parts:
            raise InputError(f"-part_id must be in 0..{self.num_parts - 1} with -num_parts {self.num_parts}, "
                             f"got {self.part_id}")

    @property
    def is_whole(self) -> bool:
        return self.num_parts == 1

    def select(self, cases: Sequence[T]) -> list[T]:
        """This part's cases of ``cases`` (sorted first, so every part sees the same order)."""
        return sorted(cases)[self.part_id::self.num_parts]

    def partial_dir_name(self, base: str = ".partial") -> str:
        """The temporary folder of this part: parts never clean up each other's unfinished files."""
        return base if self.is_whole else f"{base}-part{self.part_id}of{self.num_parts}"

    def describe(self) -> str:
        return "" if self.is_whole else f" (part {self.part_id} of {self.num_parts})"


def add_part_arguments(parser) -> None:
    """``-num_parts`` / ``-part_id`` with nnUNetv2_predict's names and defaults."""
    parser.add_argument("-num_parts", type=int, default=1,
                        help="split the cases into this many parts, e.g. one per GPU or SLURM array task "
                             "(nnUNetv2_predict's option; default 1: all cases)")
    parser.add_argument("-part_id", type=int, default=0,
                        help="which part this run does (0 .. num_parts-1); when every part has finished, run the "
                             "command without -num_parts: it checks that every case is done and finishes the job")
