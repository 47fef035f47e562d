"""ssl_split.json: format, validation against the raw folder, deterministic selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnssl.split import (
    SplitError,
    SSLSplit,
    choose_labeled,
    labeled_from_list,
    load_and_validate,
    load_split,
    read_list_file,
    save_split,
    validate_split_against_raw,
)


def _raw(tmp_path: Path, labeled=("a", "b"), unlabeled=("c",), test=("d",), channels=1) -> Path:
    root = tmp_path / "Dataset001_T"
    for folder in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for case in labeled:
        for c in range(channels):
            (root / "imagesTr" / f"{case}_{c:04d}.nii.gz").write_bytes(b"x")
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes(b"x")
    for case in unlabeled:
        for c in range(channels):
            (root / "imagesUnlabeled" / f"{case}_{c:04d}.nii.gz").write_bytes(b"x")
    for case in test:
        for c in range(channels):
            (root / "imagesTs" / f"{case}_{c:04d}.nii.gz").write_bytes(b"x")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): "CT" for c in range(channels)}, "labels": {"background": 0, "x": 1},
        "numTraining": len(labeled), "file_ending": ".nii.gz"}))
    save_split(SSLSplit(list(labeled), list(unlabeled), list(test), seed=3, origin="random"),
               root / "ssl_split.json")
    return root


def test_roundtrip_keeps_extra_keys_and_fraction(tmp_path):
    split = SSLSplit(["a"], ["b", "c", "d"], ["e"], seed=1, origin="paper:X", extra={"val": ["f"]})
    save_split(split, tmp_path / "s.json")
    loaded = load_split(tmp_path / "s.json")
    assert loaded.to_dict() == split.to_dict()
    assert loaded.labeled_fraction == pytest.approx(0.25)
    assert loaded.extra == {"val": ["f"]}


def test_valid_dataset_passes(tmp_path):
    root = _raw(tmp_path, channels=2)
    assert load_and_validate(root).labeled == ["a", "b"]


@pytest.mark.parametrize("labeled,unlabeled,test,message", [
    (["a", "a"], ["c"], [], "duplicate ids in 'labeled'"),
    (["a", "b"], ["b"], [], "ids in both 'labeled' and 'unlabeled'"),
    (["a"], ["c"], ["a"], "ids in both 'labeled' and 'test'"),
])
def test_overlaps_and_duplicates_are_named(tmp_path, labeled, unlabeled, test, message):
    (tmp_path / "s.json").write_text(json.dumps({"labeled": labeled, "unlabeled": unlabeled, "test": test}))
    with pytest.raises(SplitError, match=message) as e:
        load_split(tmp_path / "s.json")
    assert "s.json" in str(e.value)


def test_unknown_and_missing_files_are_named(tmp_path):
    root = _raw(tmp_path)
    split = load_split(root / "ssl_split.json")
    split.unlabeled.append("ghost")
    with pytest.raises(SplitError, match="unlabeled case 'ghost' is missing") as e:
        validate_split_against_raw(split, root)
    assert "ghost_0000.nii.gz" in str(e.value)


def test_labeled_without_label_file(tmp_path):
    root = _raw(tmp_path)
    (root / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(SplitError, match=r"labeled case 'a' is missing .*labelsTr/a.nii.gz"):
        load_and_validate(root)


def test_strict_rejects_unlisted_cases_on_disk(tmp_path):
    """An unlabeled case sitting in imagesTr would leak into nnU-Net's fingerprint: refuse it."""
    root = _raw(tmp_path)
    (root / "imagesTr" / "c_0000.nii.gz").write_bytes(b"x")
    with pytest.raises(SplitError, match="imagesTr holds cases not listed as 'labeled'"):
        load_and_validate(root)
    load_and_validate(root, strict=False)  # non-strict only checks what is listed


def test_num_training_must_match(tmp_path):
    root = _raw(tmp_path)
    dj = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    dj["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(SplitError, match="numTraining=5"):
        load_and_validate(root)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SplitError, match="not valid JSON"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "nolab.json").write_text(json.dumps({"unlabeled": []}))
    with pytest.raises(SplitError, match="missing required key"):
        load_split(tmp_path / "nolab.json")
    (tmp_path / "type.json").write_text(json.dumps({"labeled": "a", "unlabeled": []}))
    with pytest.raises(SplitError, match="must be a list"):
        load_split(tmp_path / "type.json")
    with pytest.raises(SplitError, match="not found"):
        load_split(tmp_path / "missing.json")


def test_choose_labeled_is_deterministic_and_order_independent():
    ids = [f"case{i:03d}" for i in range(20)]
    a = choose_labeled(ids, n_labeled=4, seed=7)
    b = choose_labeled(list(reversed(ids)), n_labeled=4, seed=7)
    assert a == b and len(a[0]) == 4 and sorted(a[0] + a[1]) == ids
    assert choose_labeled(ids, n_labeled=4, seed=8) != a
    assert len(choose_labeled(ids, fraction=0.1, seed=0)[0]) == 2


def test_choose_labeled_by_group_keeps_patients_together():
    ids = [f"patient{p:03d}_{f}" for p in range(10) for f in ("ED", "ES")]
    labeled, unlabeled = choose_labeled(ids, n_labeled=3, seed=0, group_of=lambda i: i.split("_")[0])
    assert len(labeled) == 6
    patients = {i.split("_")[0] for i in labeled}
    assert patients.isdisjoint({i.split("_")[0] for i in unlabeled})
    with pytest.raises(ValueError, match="cannot label 11 groups: only 10 available"):
        choose_labeled(ids, n_labeled=11, group_of=lambda i: i.split("_")[0])


def test_read_list_file_strips_crlf_and_keeps_order(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"zeta\r\nalpha\r\n\r\nmid")
    assert read_list_file(tmp_path / "train.txt") == ["zeta", "alpha", "mid"]


def test_labeled_from_list_refuses_unknown_ids():
    assert labeled_from_list(["a", "b", "c"], ["c"]) == (["c"], ["a", "b"])
    with pytest.raises(SplitError, match="not in the training pool"):
        labeled_from_list(["a"], ["z"])
