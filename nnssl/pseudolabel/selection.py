"""Which pseudo-labelled cases to keep (docs/methods/pseudolabel.md, FLARE22 pseudo-labelling of Gao, Xu & Fei).

The paper keeps an unlabelled case iff every organ (classes 1..13) has at least 2000 voxels in its argmax
pseudo-label (676 of 2000 cases kept). Optional extras, off by default: a minimum mean confidence and a cap on
the number of kept cases (most confident first). All functions are pure: they depend only on the label map /
statistics and the thresholds, never on the order of voxels or records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import numpy as np

# class-index -> name, for readable reasons; a Sequence is indexed by class, a Mapping looked up
ClassNames = Union[Sequence[str], Mapping[int, str]]


@dataclass(frozen=True)
class CaseStats:
    """Per-case statistics of a pseudo-label: voxel count of every class ``0..K-1`` and optional mean confidence."""

    case_id: str
    voxel_counts: np.ndarray
    mean_confidence: float | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.voxel_counts)
        if counts.ndim != 1 or counts.size < 2:
            raise ValueError(f"CaseStats {self.case_id!r}: voxel_counts must be a 1-D vector with one count per "
                             f"class (K >= 2), got shape {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError(f"CaseStats {self.case_id!r}: voxel_counts must be non-negative integers, "
                             f"got {counts.tolist()}")
        object.__setattr__(self, "voxel_counts", counts.astype(np.int64))
        if self.mean_confidence is not None and not (0.0 <= float(self.mean_confidence) <= 1.0):
            raise ValueError(f"CaseStats {self.case_id!r}: mean_confidence must be in [0, 1], "
                             f"got {self.mean_confidence!r}")


@dataclass(frozen=True)
class SelectionDecision:
    """Whether a case is kept, and every human-readable reason for the decision."""

    case_id: str
    selected: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def class_voxel_counts(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Voxel count of every class ``0..K-1`` in an integer label map of any shape (int64, ``(K,)``)."""
    label_map = np.asarray(label_map)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not np.issubdtype(label_map.dtype, np.integer):
        if not np.issubdtype(label_map.dtype, np.floating) or not np.all(np.mod(label_map, 1) == 0):
            raise ValueError(f"label_map must hold integer labels, got dtype {label_map.dtype}")
    flat = label_map.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"label_map values must be in [0, {num_classes - 1}], got [{flat.min()}, {flat.max()}]")
    return np.bincount(flat, minlength=num_classes).astype(np.int64)


def _checked_classes(num_classes: int, classes: Sequence[int] | None) -> list[int]:
    if classes is None:
        return list(range(1, num_classes))
    checked = [int(k) for k in classes]
    bad = [k for k in checked if not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {num_classes - 1}]")
    return checked


def passes_min_voxels(counts: np.ndarray, min_voxels: int = 2000, classes: Sequence[int] | None = None) -> bool:
    """True iff ``counts[k] >= min_voxels`` (inclusive) for every checked class; default: all foreground
    classes ``1..K-1`` (docs/methods/pseudolabel.md)."""
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be a 1-D vector, got shape {counts.shape}")
    return all(int(counts[k]) >= min_voxels for k in _checked_classes(counts.size, classes))


def mean_confidence(probabilities: np.ndarray, class_axis: int | None = 0, mask: np.ndarray | None = None) -> float:
    """Mean over voxels of the top-class probability ``max_k p_k(v)``.

    ``probabilities``: softmax map with classes on ``class_axis`` (nnU-Net's ``(K, *spatial)`` default), or an
    already reduced max-probability map when ``class_axis is None``. ``mask``: optional bool map of the spatial
    shape restricting the mean (e.g. predicted foreground, since background dominates the plain mean).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities if class_axis is None else probabilities.max(axis=class_axis)
    if confidence.size == 0:
        raise ValueError("mean_confidence: empty probability map")
    if not np.all(np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1 + 1e-6:
        raise ValueError("mean_confidence: probabilities must be finite and in [0, 1]")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != confidence.shape:
            raise ValueError(f"mean_confidence: mask shape {mask.shape} != confidence map shape {confidence.shape}")
        if not mask.any():
            raise ValueError("mean_confidence: mask selects no voxel")
        confidence = confidence[mask]
    return float(min(confidence.mean(), 1.0))


def case_stats_from_prediction(case_id: str, label_map: np.ndarray, num_classes: int,
                               probabilities: np.ndarray | None = None, class_axis: int = 0) -> CaseStats:
    """:class:`CaseStats` of one predicted case (label map, optional softmax map with classes on ``class_axis``)."""
    confidence = None if probabilities is None else mean_confidence(probabilities, class_axis=class_axis)
    return CaseStats(case_id, class_voxel_counts(label_map, num_classes), confidence)


def _class_label(k: int, class_names: ClassNames | None) -> str:
    if class_names is None:
        return f"class {k}"
    try:
        return f"class {k} ({class_names[k]})"
    except (KeyError, IndexError):
        return f"class {k}"


def select_cases(records: Sequence[CaseStats], min_voxels: int = 2000, min_confidence: float | None = None,
                 max_cases: int | None = None, classes: Sequence[int] | None = None,
                 class_names: ClassNames | None = None) -> list[SelectionDecision]:
    """Decide for every case whether its pseudo-label is kept (docs/methods/pseudolabel.md), with the reasons.

    A case is kept iff (1) every checked class (default 1..K-1) has ``>= min_voxels`` voxels, (2) its mean
    confidence is ``>= min_confidence`` when that is given, and (3) when ``max_cases`` is given, it is among the
    ``max_cases`` most confident cases passing (1) and (2) (ties broken by case id). Decisions are returned
    sorted by case id, so the result does not depend on the order of ``records``.
    """
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if max_cases is not None and max_cases < 0:
        raise ValueError(f"max_cases must be >= 0, got {max_cases}")
    ids = [r.case_id for r in records]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"select_cases: duplicate case ids {duplicates}")
    needs_confidence = min_confidence is not None or max_cases is not None
    missing = sorted(r.case_id for r in records if needs_confidence and r.mean_confidence is None)
    if missing:
        raise ValueError(f"select_cases: min_confidence/max_cases need mean_confidence, missing for {missing[:5]}")

    reasons: dict[str, list[str]] = {}
    passing: list[CaseStats] = []
    for record in sorted(records, key=lambda r: r.case_id):
        checked = _checked_classes(record.voxel_counts.size, classes)
        case_reasons = [f"{_class_label(k, class_names)} has {int(record.voxel_counts[k])} < {min_voxels} voxels"
                        for k in checked if int(record.voxel_counts[k]) < min_voxels]
        if not case_reasons and checked:
            smallest = min(checked, key=lambda k: (int(record.voxel_counts[k]), k))
            case_reasons.append(f"all {len(checked)} checked classes have >= {min_voxels} voxels (smallest: "
                                f"{_class_label(smallest, class_names)} with {int(record.voxel_counts[smallest])})")
        size_ok = all(int(record.voxel_counts[k]) >= min_voxels for k in checked)
        confidence_ok = True
        if min_confidence is not None:
            confidence_ok = record.mean_confidence >= min_confidence
            relation = ">=" if confidence_ok else "<"
            case_reasons.append(f"mean confidence {record.mean_confidence:.4f} {relation} {min_confidence:.4f}")
        reasons[record.case_id] = case_reasons
        if size_ok and confidence_ok:
            passing.append(record)

    kept = {r.case_id for r in passing}
    if max_cases is not None:
        ranked = sorted(passing, key=lambda r: (-r.mean_confidence, r.case_id))
        for rank, record in enumerate(ranked, start=1):
            if rank <= max_cases:
                reasons[record.case_id].append(f"confidence rank {rank} of {len(ranked)} <= max_cases {max_cases}")
            else:
                kept.discard(record.case_id)
                reasons[record.case_id].append(f"confidence rank {rank} of {len(ranked)} > max_cases {max_cases} "
                                               f"(mean confidence {record.mean_confidence:.4f})")
    return [SelectionDecision(case_id, case_id in kept, tuple(reasons[case_id])) for case_id in sorted(reasons)]
