import numpy as np
import pytest

from nnssl.pseudolabel.selection import (
    CaseStats,
    SelectionDecision,
    case_stats_from_prediction,
    class_voxel_counts,
    mean_confidence,
    passes_min_voxels,
    select_cases,
)

FLARE_NAMES = ["background", "liver", "right kidney", "spleen", "pancreas", "aorta", "IVC", "RAG", "LAG",
               "gallbladder", "esophagus", "stomach", "duodenum", "left kidney"]


def _counts(organ_voxels: int = 2500, **overrides: int) -> np.ndarray:
    counts = np.full(14, organ_voxels, dtype=np.int64)
    counts[0] = 10**6
    for key, value in overrides.items():
        counts[int(key.removeprefix("c"))] = value
    return counts


def test_class_voxel_counts_hand_computed_and_voxel_order_invariant():
    label_map = np.array([[[0, 1], [2, 2]], [[0, 0], [2, 1]]], dtype=np.uint8)
    counts = class_voxel_counts(label_map, 4)
    assert counts.tolist() == [3, 2, 3, 0] and counts.dtype == np.int64
    shuffled = np.random.default_rng(0).permutation(label_map.ravel()).reshape(2, 4)
    assert class_voxel_counts(shuffled, 4).tolist() == counts.tolist()
    assert class_voxel_counts(label_map.astype(np.float32), 4).tolist() == counts.tolist()


def test_class_voxel_counts_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        class_voxel_counts(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        class_voxel_counts(np.array([-1, 0]), 3)
    with pytest.raises(ValueError, match="integer labels"):
        class_voxel_counts(np.array([0.5, 1.0]), 3)


def test_min_voxel_boundary_is_inclusive():
    assert passes_min_voxels(_counts(2000))
    assert not passes_min_voxels(_counts(2000, c3=1999))
    assert not passes_min_voxels(_counts(2000, c13=0))
    assert passes_min_voxels(_counts(2000, c3=0), classes=[1, 2, 4])  # only the listed classes are checked
    assert passes_min_voxels(np.array([0, 2000]))  # background is never checked by default


def test_select_cases_boundary_and_reasons():
    records = [CaseStats("kept", _counts(2000)), CaseStats("short", _counts(2000, c3=1999)),
               CaseStats("missing", _counts(2500, c9=0, c12=10))]
    decisions = {d.case_id: d for d in select_cases(records, min_voxels=2000, class_names=FLARE_NAMES)}
    assert decisions["kept"].selected
    assert decisions["kept"].reasons == ("all 13 checked classes have >= 2000 voxels (smallest: class 1 (liver) "
                                         "with 2000)",)
    assert not decisions["short"].selected
    assert decisions["short"].reasons == ("class 3 (spleen) has 1999 < 2000 voxels",)
    assert not decisions["missing"].selected
    assert decisions["missing"].reasons == ("class 9 (gallbladder) has 0 < 2000 voxels",
                                            "class 12 (duodenum) has 10 < 2000 voxels")
    unnamed = select_cases([records[1]])[0]
    assert unnamed == SelectionDecision("short", False, ("class 3 has 1999 < 2000 voxels",))


def test_select_cases_is_invariant_to_record_order():
    rng = np.random.default_rng(1)
    records = [CaseStats(f"case_{i:03d}", rng.integers(1900, 2200, size=14), float(rng.uniform(0.5, 1.0)))
               for i in range(20)]
    reference = select_cases(records, max_cases=5)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(records))
        assert select_cases([records[i] for i in order], max_cases=5) == reference
    assert [d.case_id for d in reference] == sorted(r.case_id for r in records)


def test_max_cases_keeps_the_most_confident_first():
    confidences = {"a": 0.70, "b": 0.95, "c": 0.80, "d": 0.99, "e": 0.90}
    records = [CaseStats(k, _counts(), v) for k, v in confidences.items()]
    records.append(CaseStats("small", _counts(c5=5), 1.0))  # most confident but fails the size filter
    decisions = {d.case_id: d for d in select_cases(records, max_cases=2)}
    assert {k for k, d in decisions.items() if d.selected} == {"d", "b"}
    assert "confidence rank 1 of 5 <= max_cases 2" in decisions["d"].reasons
    assert "confidence rank 3 of 5 > max_cases 2 (mean confidence 0.9000)" in decisions["e"].reasons
    assert not decisions["small"].selected
    assert select_cases(records, max_cases=0)[0].selected is False


def test_min_confidence_filter():
    records = [CaseStats("low", _counts(), 0.5), CaseStats("high", _counts(), 0.9)]
    decisions = {d.case_id: d for d in select_cases(records, min_confidence=0.8)}
    assert decisions["high"].selected and not decisions["low"].selected
    assert "mean confidence 0.5000 < 0.8000" in decisions["low"].reasons


def test_select_cases_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        select_cases([CaseStats("x", _counts()), CaseStats("x", _counts())])
    with pytest.raises(ValueError, match="mean_confidence"):
        select_cases([CaseStats("x", _counts())], max_cases=1)
    with pytest.raises(ValueError, match="non-negative integers"):
        CaseStats("x", np.array([1.5, 2.0]))


def test_mean_confidence_forms():
    probabilities = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]])  # (K=2, 3 voxels)
    assert mean_confidence(probabilities) == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert mean_confidence(probabilities.T, class_axis=1) == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert mean_confidence(np.array([0.9, 0.8]), class_axis=None) == pytest.approx(0.85)
    assert mean_confidence(probabilities, mask=np.array([True, False, False])) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mean_confidence(np.array([[2.0, -1.0]]))


def test_case_stats_from_prediction():
    label_map = np.zeros((4, 4, 4), dtype=np.uint8)
    label_map[0] = 1
    probabilities = np.stack([np.where(label_map == 0, 0.75, 0.25), np.where(label_map == 1, 0.75, 0.25)])
    stats = case_stats_from_prediction("c1", label_map, 2, probabilities)
    assert stats.voxel_counts.tolist() == [48, 16]
    assert stats.mean_confidence == pytest.approx(0.75)
    assert select_cases([stats], min_voxels=16)[0].selected
    assert not select_cases([stats], min_voxels=17)[0].selected
