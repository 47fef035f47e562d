"""Fast properties of the pseudo-labeling pipeline: cache completeness, the new dataset's roles and files, naming,
and the loss / sampling weights of pseudo-labeled cases. No model involved (the end-to-end run is in
test_pseudolabel_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnssl.io import atomic_write_json
from nnssl.pseudolabel.cli import case_stats, report_markdown
from nnssl.pseudolabel.dataset import (
    default_new_name,
    dice_per_class,
    load_raw_dataset,
    new_split,
    write_pseudo_labeled_dataset,
)
from nnssl.pseudolabel.predict import (
    InferenceSettings,
    confidence_path,
    is_case_complete,
    label_path,
    record_path,
)
from nnssl.pseudolabel.weighting import pseudo_label_mask, pseudo_sampling_probabilities, pseudo_weighted_loss
from nnssl.split import SplitError, load_and_validate

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _raw_dataset(root: Path) -> Path:
    """Dataset900_Tiny: 2 labeled, 3 unlabeled (with withheld labels), 1 test; labels are distinct constants so
    that every file's origin can be told from its content."""
    ds = root / "Dataset900_Tiny"
    roles = {"labeled": ["a", "b"], "unlabeled": ["u1", "u2", "u3"], "test": ["t"]}
    folders = {"labeled": ("imagesTr", "labelsTr"), "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
               "test": ("imagesTs", "labelsTs")}
    for role, ids in roles.items():
        for i, case in enumerate(ids):
            _write_nifti(ds / folders[role][0] / f"{case}_0000.nii.gz", np.full((4, 5, 6), i, np.float32))
            _write_nifti(ds / folders[role][1] / f"{case}.nii.gz", np.full((4, 5, 6), 2, np.uint8))
    atomic_write_json(ds / "dataset.json", {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 2,
                                            "file_ending": ".nii.gz", "numUnlabeled": 3})
    atomic_write_json(ds / "ssl_split.json", {**roles, "labeled_fraction": 0.4, "seed": 3, "origin": "random",
                                              "note": "kept"})
    return ds


def _pseudo_labels(folder: Path, ids: list[str]) -> dict[str, Path]:
    files = {}
    for case in ids:
        files[case] = folder / f"{case}.nii.gz"
        _write_nifti(files[case], np.ones((4, 5, 6), np.uint8))  # pseudo-labels are all 1, truths all 2
    return files


def test_new_dataset_roles_files_and_no_withheld_label(tmp_path):
    source = load_raw_dataset(_raw_dataset(tmp_path))
    files = _pseudo_labels(tmp_path / "cache", ["u1", "u2", "u3"])
    dest = tmp_path / "Dataset901_TinyPL"
    split = write_pseudo_labeled_dataset(source, dest, ["u1", "u3"], files, {"round": 1}, {"r": 1}, "# r\n")

    assert split.labeled == ["a", "b", "pl_u1", "pl_u3"] and split.unlabeled == ["u2"] and split.test == ["t"]
    assert split.extra["pseudo_labeled"] == ["pl_u1", "pl_u3"] and split.extra["note"] == "kept"
    assert split.labeled_fraction == 0.4 and split.origin == "pseudolabel:Dataset900_Tiny"
    assert load_and_validate(dest).labeled == split.labeled  # the written folder matches its split exactly
    for case in ("pl_u1", "pl_u3"):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(dest / "labelsTr" / f"{case}.nii.gz")))
        assert np.all(label == 1), "labelsTr of a pl_ case must be the pseudo-label, never the withheld label"
    assert sorted(p.name for p in (dest / "labelsUnlabeled").iterdir()) == ["u2.nii.gz"]
    assert sorted(p.name for p in (dest / "imagesUnlabeled").iterdir()) == ["u2_0000.nii.gz"]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(dest / "imagesTr" / "pl_u3_0000.nii.gz")))
    assert np.all(image == 2)  # u3 is the third unlabeled case, filled with 2
    dj = json.loads((dest / "dataset.json").read_text(encoding="utf-8"))
    assert dj["numTraining"] == 4 and dj["numUnlabeled"] == 1 and dj["name"] == "TinyPL"
    assert (dest / "pseudolabel_report.md").read_text(encoding="utf-8") == "# r\n"

    with pytest.raises(FileExistsError, match="--overwrite"):
        write_pseudo_labeled_dataset(source, dest, ["u1"], files, {}, {}, "")
    with pytest.raises(SplitError, match="not unlabeled cases"):
        write_pseudo_labeled_dataset(source, tmp_path / "Dataset902_X", ["a"], files, {}, {}, "")


def test_second_round_keeps_earlier_pseudo_labels(tmp_path):
    source = load_raw_dataset(_raw_dataset(tmp_path))
    files = _pseudo_labels(tmp_path / "cache", ["u1", "u2", "u3"])
    first = tmp_path / "Dataset901_TinyPL"
    write_pseudo_labeled_dataset(source, first, ["u1"], files, {"round": 1}, {}, "")
    again = load_raw_dataset(first)
    split = new_split(again, ["u3"], {"round": 2})
    assert split.extra["pseudo_labeled"] == ["pl_u1", "pl_u3"]
    assert [r["round"] for r in split.extra["pseudo_label_rounds"]] == [1, 2]
    assert split.unlabeled == ["u2"] and "pl_u1" in split.labeled


def test_default_new_name_counts_rounds():
    assert default_new_name("Dataset501_Abdomen") == "AbdomenPL"
    assert default_new_name("Dataset601_AbdomenPL") == "AbdomenPL2"
    assert default_new_name("Dataset602_AbdomenPL2") == "AbdomenPL3"


def _record(cache: Path, case: str, settings: InferenceSettings, conf: float | None = 0.9) -> None:
    label = label_path(cache, case, ".nii.gz")
    _write_nifti(label, np.zeros((2, 2, 2), np.uint8))
    if settings.save_confidence:
        np.savez_compressed(confidence_path(cache, case), confidence=np.ones((2, 2, 2), np.float16))
    atomic_write_json(record_path(cache, case), {"label_bytes": label.stat().st_size, "mean_confidence": conf})


def test_case_completeness_follows_files_and_options(tmp_path):
    plain, with_conf = InferenceSettings(), InferenceSettings(save_confidence=True)
    assert with_conf.compute_confidence  # saving confidence implies computing it
    _record(tmp_path, "done", plain, conf=None)
    assert is_case_complete(tmp_path, "done", ".nii.gz", plain)
    assert not is_case_complete(tmp_path, "done", ".nii.gz", InferenceSettings(compute_confidence=True))
    assert not is_case_complete(tmp_path, "missing", ".nii.gz", plain)
    _record(tmp_path, "truncated", plain)
    label_path(tmp_path, "truncated", ".nii.gz").write_bytes(b"xx")  # a damaged label no longer matches its record
    assert not is_case_complete(tmp_path, "truncated", ".nii.gz", plain)
    _record(tmp_path, "no_record", plain)
    record_path(tmp_path, "no_record").unlink()  # killed before the record (written last) was moved in
    assert not is_case_complete(tmp_path, "no_record", ".nii.gz", plain)
    _record(tmp_path, "conf", with_conf)
    assert is_case_complete(tmp_path, "conf", ".nii.gz", with_conf)
    confidence_path(tmp_path, "conf").unlink()
    assert not is_case_complete(tmp_path, "conf", ".nii.gz", with_conf)


def test_case_stats_confidence_region_and_report_table():
    records = {"x": {"voxel_counts": [10, 5, 0], "mean_confidence": 0.95, "mean_foreground_confidence": 0.6,
                     "label_file": "x.nii.gz"},
               "y": {"voxel_counts": [15, 0, 0], "mean_confidence": 0.99, "mean_foreground_confidence": None,
                     "label_file": "y.nii.gz"}}
    fg = {s.case_id: s.mean_confidence for s in case_stats(records, "foreground")}
    assert fg == {"x": 0.6, "y": 0.99}  # no foreground voxel: the all-voxel mean stands in
    assert {s.case_id: s.mean_confidence for s in case_stats(records, "all")} == {"x": 0.95, "y": 0.99}
    assert all(s.mean_confidence is None for s in case_stats(records, None))
    report = {"new_dataset": "D", "source_dataset": "S", "num_selected": 1, "num_predicted": 2,
              "model": {"trainer": "T", "plans": "P", "configuration": "C", "folds": ["0"], "checkpoint": "c.pth"},
              "selection": {"rule": "r", "min_voxels": 1, "min_confidence": None, "max_cases": None},
              "cases": [{"case_id": "x", "selected": True, "new_id": "pl_x", "selection_confidence": 0.6,
                         "voxel_counts": {"background": 10, "liver": 5}, "reasons": ["a|b"]}]}
    table = report_markdown(report)
    assert "| x | yes | pl_x | 5 | 0.600 | a/b |" in table


def test_dice_per_class_exact():
    pred = np.array([0, 1, 1, 2, 2, 2])
    truth = np.array([0, 1, 2, 2, 2, 0])
    assert dice_per_class(pred, truth, [1, 2, 3]) == {1: 2 / 3, 2: 4 / 6, 3: None}


def _ce_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target)


def test_pseudo_weighted_loss_mixes_groups_by_count():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)
    target = torch.randint(0, 3, (4, 5))
    is_pseudo = pseudo_label_mask(["a", "pl_b", "c", "pl_d"])
    assert is_pseudo.tolist() == [False, True, False, True]
    # w = 1 is nnU-Net's loss on the whole batch; for a per-sample mean the group formula agrees with it
    full = _ce_loss(logits, target)
    assert torch.equal(pseudo_weighted_loss(_ce_loss, logits, target, is_pseudo, 1.0), full)
    real, pseudo = _ce_loss(logits[[0, 2]], target[[0, 2]]), _ce_loss(logits[[1, 3]], target[[1, 3]])
    assert torch.allclose((real + pseudo) / 2, full)
    half = pseudo_weighted_loss(_ce_loss, logits, target, is_pseudo, 0.5)
    assert torch.allclose(half, (2 * real + 0.5 * 2 * pseudo) / 4)
    # gradients of pseudo samples are scaled by w relative to w = 1, real samples untouched
    (g_half,) = torch.autograd.grad(half, logits)
    (g_full,) = torch.autograd.grad(pseudo_weighted_loss(_ce_loss, logits, target, is_pseudo, 1.0), logits)
    assert torch.allclose(g_half[[0, 2]], g_full[[0, 2]]) and torch.allclose(g_half[[1, 3]], 0.5 * g_full[[1, 3]])
    zero = pseudo_weighted_loss(_ce_loss, logits, target, is_pseudo, 0.0)
    assert torch.count_nonzero(torch.autograd.grad(zero, logits)[0][[1, 3]]) == 0


def test_pseudo_weighted_loss_deep_supervision_lists_and_edge_batches():
    torch.manual_seed(1)
    outputs = [torch.randn(3, 2, 4), torch.randn(3, 2, 2)]
    targets = [torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 2))]

    def ds_loss(out, tgt):
        return sum(_ce_loss(o, t) for o, t in zip(out, tgt))

    mask = torch.tensor([True, False, False])
    expected = (2 * ds_loss([o[1:] for o in outputs], [t[1:] for t in targets])
                + 0.25 * ds_loss([o[:1] for o in outputs], [t[:1] for t in targets])) / 3
    assert torch.allclose(pseudo_weighted_loss(ds_loss, outputs, targets, mask, 0.25), expected)
    everything = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(pseudo_weighted_loss(ds_loss, outputs, targets, everything, 0.25),
                          0.25 * ds_loss(outputs, targets))
    nothing = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(pseudo_weighted_loss(ds_loss, outputs, targets, nothing, 0.25), ds_loss(outputs, targets))
    with pytest.raises(ValueError, match="pseudo_weight"):
        pseudo_weighted_loss(ds_loss, outputs, targets, mask, -1.0)


def test_pseudo_sampling_probabilities():
    p = pseudo_sampling_probabilities(["a", "b", "pl_c", "pl_d"], 0.5)
    assert np.allclose(p, [1 / 3, 1 / 3, 1 / 6, 1 / 6]) and np.isclose(p.sum(), 1.0)
    assert p[2] == p[0] / 2  # a pseudo case is drawn half as often as a real one
    assert pseudo_sampling_probabilities(["a", "pl_c"], 1.0) is None  # uniform: nnU-Net's default path
    assert pseudo_sampling_probabilities(["a", "b"], 0.5) is None
    assert pseudo_sampling_probabilities(["pl_a", "pl_b"], 0.0) is None  # one group only: relative weight moot
    assert np.allclose(pseudo_sampling_probabilities(["a", "pl_b"], 0.0), [1.0, 0.0])
    with pytest.raises(ValueError, match="pseudo_weight"):
        pseudo_sampling_probabilities(["a"], -0.5)


def test_finetune_split_of_fewer_than_five_real_cases_stops_with_a_message(tmp_path):
    """nnU-Net's KFold would die in scikit-learn; the trainer says what to do instead, before training."""
    from types import SimpleNamespace

    from nnssl.pseudolabel.training_data import write_split_of_real_cases

    keys = ["case_0", "case_1", "case_2", "pl_case_3", "pl_case_4", "pl_case_5"]
    fake = SimpleNamespace(preprocessed_dataset_folder_base=str(tmp_path), preprocessed_dataset_folder=str(tmp_path),
                           dataset_class=SimpleNamespace(get_identifiers=lambda folder: keys), fold=0,
                           plans_manager=SimpleNamespace(dataset_name="Dataset901_X"),
                           print_to_log_file=lambda *a: None)
    with pytest.raises(SystemExit) as stop:
        write_split_of_real_cases(fake)
    assert "only 3 real labeled case(s)" in str(stop.value) and "'all'" in str(stop.value)
    assert not (tmp_path / "splits_final.json").exists()

    fake.dataset_class = SimpleNamespace(get_identifiers=lambda folder: keys + ["case_6", "case_7"])
    write_split_of_real_cases(fake)
    splits = json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))
    assert len(splits) == 5 and all("pl_case_3" in s["train"] and "pl_case_3" not in s["val"] for s in splits)


def test_segmentation_heads_are_restored_only_from_the_model_the_network_holds(tmp_path):
    import json

    from torch import nn

    from nnssl.pseudolabel.heads import restore_segmentation_heads, source_checkpoints

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Conv2d(1, 2, 1)
            self.decoder = nn.Module()
            self.decoder.seg_layers = nn.ModuleList([nn.Conv2d(2, 3, 1)])

    torch.manual_seed(0)
    stage1, fresh = Net(), Net()
    fresh.encoder.load_state_dict(stage1.encoder.state_dict())  # what -pretrained_weights does: all but the heads
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": stage1.state_dict()}, path)
    split = tmp_path / "ssl_split.json"
    split.write_text(json.dumps({"pseudo_label_rounds": [{"model": {"checkpoint_files": ["old.pth"]}},
                                                         {"model": {"checkpoint_files": [str(path)]}}]}))
    assert source_checkpoints([None, tmp_path / "missing.json", split]) == [str(path)]  # the newest round
    messages = []
    other = Net()
    assert not restore_segmentation_heads(other, [str(tmp_path / "gone.pth"), str(path)], messages.append)
    assert "not found" in messages[0] and "left as initialised" in messages[-1]
    assert restore_segmentation_heads(fresh, [str(path)], messages.append)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), stage1.state_dict().values()))
