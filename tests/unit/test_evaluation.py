"""nnssl.evaluation: metrics on hand-computed cases, folder evaluation (NIfTI and PNG) and the CLI's errors
(the CLI end to end in a fresh interpreter: tests/e2e/test_evaluate_cli.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from evaluation_cases import LABELS, cube, make_nifti_cases, write_nifti

from nnssl.evaluation.cli import main
from nnssl.evaluation.evaluate import (
    evaluate_folders,
    find_case_pairs,
    format_summary_table,
    summarize_cases,
    write_outputs,
)
from nnssl.evaluation.metrics import compute_case_metrics, evaluated_classes

# ----------------------------------------------------------------------------------------------------- metrics


def test_perfect_overlap_anisotropic():
    gt = cube((8, 7, 6), (1, 1, 1)) + cube((8, 7, 6), (5, 4, 3), size=2, value=2)
    m = compute_case_metrics(gt.copy(), gt, (3.0, 0.7, 0.4), LABELS, 1.0)
    for name in ("liver", "spleen"):
        assert m[name]["dice"] == 1.0
        assert m[name]["nsd"] == pytest.approx(1.0)
        assert m[name]["hd95"] == 0.0
        assert m[name]["asd"] == 0.0
    assert m["liver"]["n_ref_voxels"] == m["liver"]["n_pred_voxels"] == 27
    assert m["spleen"]["n_ref_voxels"] == 8


def test_cubes_shifted_one_voxel_along_coarse_axis():
    """3x3x3 cubes, prediction shifted by one voxel along axis 0 (2 mm; the other axes 0.5 mm).

    Surface voxels (mask XOR erosion) are the 26 outer voxels of each cube. Distances prediction -> reference:
    9 voxels of the top layer at 2 mm, the centre of the bottom layer at 0.5 mm (nearest reference surface voxel is
    its in-plane neighbour), 16 at 0; reference -> prediction mirrors this. So the 52 pooled distances are
    18 x 2.0, 2 x 0.5 and 32 x 0: ASD = (18*2 + 2*0.5) / 52 = 37/52; the directed 95th percentiles are both 2.0.
    Dice = 2*18/54. NSD with tolerance >= 2 mm is 1 (no surface point is further than 2 mm).
    """
    gt = cube((7, 5, 5), (1, 1, 1))
    pred = cube((7, 5, 5), (2, 1, 1))
    spacing = (2.0, 0.5, 0.5)
    m = compute_case_metrics(pred, gt, spacing, {"background": 0, "organ": 1}, 1.0)["organ"]
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["asd"] == pytest.approx(37 / 52, rel=1e-6)
    assert 0.0 < m["nsd"] < 1.0
    assert compute_case_metrics(pred, gt, spacing, {"organ": 1}, 2.0)["organ"]["nsd"] == pytest.approx(1.0)
    # symmetric in prediction and reference
    swapped = compute_case_metrics(gt, pred, spacing, {"organ": 1}, 1.0)["organ"]
    for key in ("dice", "nsd", "hd95", "asd"):
        assert swapped[key] == pytest.approx(m[key])


@pytest.mark.parametrize("axis,expected_hd95", [(0, 2.0), (1, 0.5), (2, 0.8)])
def test_hd95_uses_spacing_of_the_shifted_axis(axis, expected_hd95):
    """A 5-voxel cube shifted by 1 voxel along one axis: HD95 equals that axis' spacing (every face moves by it)."""
    start = [2, 2, 2]
    gt = cube((10, 10, 10), start, size=5)
    start[axis] += 1
    pred = cube((10, 10, 10), start, size=5)
    m = compute_case_metrics(pred, gt, (2.0, 0.5, 0.8), {"organ": 1}, 1.0)["organ"]
    assert m["hd95"] == pytest.approx(expected_hd95)
    assert m["dice"] == pytest.approx(2 * 100 / 250)


def test_thin_plates_far_apart_give_exact_distances_and_zero_nsd():
    """One-voxel plates two voxels apart along a 2 mm axis: every surface distance is exactly 4 mm."""
    gt = np.zeros((9, 6, 6), np.uint8)
    pred = np.zeros_like(gt)
    gt[2, 1:5, 1:5] = 1
    pred[4, 1:5, 1:5] = 1
    spacing = (2.0, 0.5, 0.5)
    m = compute_case_metrics(pred, gt, spacing, {"organ": 1}, 1.0)["organ"]
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(4.0)
    assert m["asd"] == pytest.approx(4.0)
    assert m["nsd"] == 0.0


def test_2d_shifted_squares_hand_computed():
    """3x3 squares shifted one pixel along axis 0, spacing (2.0, 0.5) mm.

    HD95/ASD (surface pixels = 8 outer pixels): pooled distances 6 x 2.0, 2 x 0.5, 8 x 0 -> ASD = 13/16, HD95 = 2.
    NSD (surfels on the pixel-corner grid, DeepMind/FLARE22 weighting): each contour has 4 corner elements of length
    c = 0.5*sqrt(2^2 + 0.5^2), 4 elements of length 0.5 (normal along axis 0) and 4 of length 2.0 (normal along
    axis 1), total 4c + 10. Within 0.4 mm of the other contour: 4 elements of length 2 and 2 corners -> 8 + 2c;
    within 1 mm also the two 0.5-long elements of the overlapping side -> 9 + 2c.
    """
    gt = cube((8, 6), (1, 1))
    pred = cube((8, 6), (2, 1))
    spacing = (2.0, 0.5)
    corner = 0.5 * math.hypot(2.0, 0.5)
    total = 4 * corner + 10
    at_04 = compute_case_metrics(pred, gt, spacing, {"organ": 1}, 0.4)["organ"]
    at_1 = compute_case_metrics(pred, gt, spacing, {"organ": 1}, 1.0)["organ"]
    assert at_04["nsd"] == pytest.approx((8 + 2 * corner) / total, rel=1e-6)
    assert at_1["nsd"] == pytest.approx((9 + 2 * corner) / total, rel=1e-6)
    assert at_1["hd95"] == pytest.approx(2.0)
    assert at_1["asd"] == pytest.approx(13 / 16)
    assert at_1["dice"] == pytest.approx(2 / 3)


def test_empty_masks_follow_flare22_convention():
    gt = cube((6, 6, 6), (1, 1, 1))
    empty = np.zeros_like(gt)
    spacing = (1.0, 1.0, 1.0)
    for pred, ref in ((empty, gt), (gt, empty)):  # missed organ, hallucinated organ
        m = compute_case_metrics(pred, ref, spacing, {"organ": 1}, 1.0)["organ"]
        assert m["dice"] == 0.0 and m["nsd"] == 0.0
        assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
    both = compute_case_metrics(empty, empty.copy(), spacing, {"organ": 1}, 1.0)["organ"]
    assert both == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0, "n_ref_voxels": 0, "n_pred_voxels": 0}


def test_regions_and_ignore_label():
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[2, 2, 2] = 2  # inside the region {1, 2}
    gt[5, 5, 5] = 9  # ignored reference voxel
    pred = (gt > 0).astype(np.uint8)  # predicts the region as label 1, and something where the reference is ignored
    pred[5, 5, 5] = 1
    labels = {"background": 0, "whole": [1, 2], "core": 2, "ignore": 9}
    assert evaluated_classes(labels) == {"whole": (1, 2), "core": (2,)}
    m = compute_case_metrics(pred, gt, (1.0, 1.0, 1.0), labels, 1.0)
    assert m["whole"]["dice"] == 1.0 and m["whole"]["hd95"] == 0.0  # the ignored voxel does not count
    assert m["core"]["dice"] == 0.0 and math.isnan(m["core"]["hd95"])


def test_bad_arguments_are_named():
    gt = cube((6, 6, 6), (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(gt[:5], gt, (1, 1, 1), {"organ": 1}, 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        compute_case_metrics(gt, gt, (1, 1, 1), {"organ": 1}, -1.0)
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(gt, gt, (1, 1), {"organ": 1}, 1.0)
    with pytest.raises(ValueError, match="no foreground"):
        compute_case_metrics(gt, gt, (1, 1, 1), {"background": 0}, 1.0)


def test_summary_excludes_and_counts_undefined_distances():
    nan = float("nan")
    per_case = [
        {"case": "a", "metrics": {"organ": {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0}}},
        {"case": "b", "metrics": {"organ": {"dice": 0.5, "nsd": 0.5, "hd95": 4.0, "asd": 2.0}}},
        {"case": "c", "metrics": {"organ": {"dice": 0.0, "nsd": 0.0, "hd95": nan, "asd": nan}}},
    ]
    summary = summarize_cases(per_case, ["organ"])
    organ = summary["per_class"]["organ"]
    assert organ["dice"]["mean"] == pytest.approx(0.5) and organ["dice"]["n"] == 3
    assert organ["dice"]["std"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    assert organ["hd95"] == {"mean": 2.0, "std": 2.0, "n": 2, "n_undefined": 1}
    assert summary["foreground_mean"]["asd"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------- folders


def test_evaluate_folders_reads_spacing_from_files(tmp_path):
    pred_dir, gt_dir, spacing = make_nifti_cases(tmp_path)
    summary = evaluate_folders(pred_dir, gt_dir, LABELS, tolerance_mm=1.0, progress=False)
    assert summary["num_cases"] == 3
    by_case = {record["case"]: record for record in summary["per_case"]}
    assert by_case["case_b"]["spacing"] == pytest.approx(list(spacing))
    # one voxel along the 2 mm axis: HD95 = 2 mm, which proves the file's spacing (in numpy axis order) was used
    assert by_case["case_b"]["metrics"]["liver"]["hd95"] == pytest.approx(2.0)
    assert by_case["case_b"]["metrics"]["liver"]["dice"] == pytest.approx(2 * 48 / 128)
    assert by_case["case_c"]["metrics"]["spleen"]["dice"] == 0.0
    assert summary["per_class"]["spleen"]["hd95"]["n_undefined"] == 1
    assert summary["per_class"]["liver"]["dice"]["mean"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert summary["foreground_mean"]["dice"] == pytest.approx(((1 + 0.75 + 1) / 3 + 2 / 3) / 2)


def test_png_folder_is_evaluated_in_2d_with_unit_spacing(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    gt = cube((10, 12), (2, 2), size=4)
    pred = cube((10, 12), (2, 4), size=4)  # shifted two pixels along axis 1
    sitk.WriteImage(sitk.GetImageFromArray(gt), str(gt_dir / "img1.png"))
    sitk.WriteImage(sitk.GetImageFromArray(pred), str(pred_dir / "img1.png"))
    summary = evaluate_folders(pred_dir, gt_dir, {"background": 0, "lesion": 1}, file_ending=".png", progress=False)
    record = summary["per_case"][0]
    assert record["spacing"] == [1.0, 1.0]
    expected = compute_case_metrics(pred, gt, (1.0, 1.0), {"lesion": 1}, 1.0)["lesion"]
    assert record["metrics"]["lesion"] == pytest.approx(expected)
    assert record["metrics"]["lesion"]["dice"] == pytest.approx(0.5)
    assert record["metrics"]["lesion"]["hd95"] == pytest.approx(2.0)


def test_pairing_errors_list_missing_and_extra_files(tmp_path):
    pred_dir, gt_dir, _ = make_nifti_cases(tmp_path)
    (pred_dir / "case_a.nii.gz").rename(pred_dir / "case_x.nii.gz")
    with pytest.raises(ValueError) as error:
        find_case_pairs(pred_dir, gt_dir, ".nii.gz")
    assert "case_x" in str(error.value) and "case_a" in str(error.value)
    (pred_dir / "case_x.nii.gz").unlink()
    pairs, skipped = find_case_pairs(pred_dir, gt_dir, ".nii.gz", only_predicted=True)
    assert [p.case for p in pairs] == ["case_b", "case_c"] and skipped == ["case_a"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_case_pairs(tmp_path / "nowhere", gt_dir, ".nii.gz")


def test_unknown_label_value_names_the_file(tmp_path):
    pred_dir, gt_dir, spacing = make_nifti_cases(tmp_path)
    bad = cube((9, 12, 12), (1, 1, 1), size=4, value=7)
    write_nifti(pred_dir / "case_a.nii.gz", bad, spacing)
    with pytest.raises(ValueError, match=r"case_a\.nii\.gz.*\[7\]"):
        evaluate_folders(pred_dir, gt_dir, LABELS, progress=False)


def test_written_outputs_and_table(tmp_path):
    pred_dir, gt_dir, _ = make_nifti_cases(tmp_path)
    summary = evaluate_folders(pred_dir, gt_dir, LABELS, progress=False)
    summary_path, csv_path = write_outputs(summary, tmp_path / "out")
    loaded = json.loads(summary_path.read_text(encoding="utf-8"))  # strict JSON: no NaN tokens
    assert loaded["per_case"][2]["metrics"]["spleen"]["hd95"] is None
    table_from_file = format_summary_table(loaded)
    assert table_from_file == format_summary_table(summary)
    assert "liver" in table_from_file and "spleen" in table_from_file and "NSD@1mm" in table_from_file
    assert "0.9167 ± 0.1179" in table_from_file  # liver Dice over (1, 0.75, 1)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 6 and {r["class"] for r in rows} == {"liver", "spleen"}
    assert math.isnan(float(next(r for r in rows if r["case"] == "case_c" and r["class"] == "spleen")["hd95"]))


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_dataset_json_output_folder_and_errors(tmp_path, capsys):
    pred_dir, gt_dir, _ = make_nifti_cases(tmp_path)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    out = tmp_path / "results"
    args = [str(pred_dir), str(gt_dir), "--dataset-json", str(dataset_json), "--no-progress"]
    assert main([*args, "-o", str(out), "--tolerance", "2.5"]) == 0
    assert "NSD@2.5mm" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["tolerance_mm"] == 2.5
    assert (out / "per_case.csv").is_file()
    assert not (pred_dir / "summary.json").exists()

    (pred_dir / "case_b.nii.gz").unlink()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "case_b" in err and "no prediction" in err
    assert main([*args, "--only-predicted"]) == 0
    written = pred_dir / "nnssl_evaluation" / "summary.json"  # the default: a new subfolder of PRED_DIR
    assert json.loads(written.read_text(encoding="utf-8"))["references_without_prediction"] == ["case_b"]
    capsys.readouterr()
    assert main([*args, "--only-predicted"]) == 1  # existing results are never replaced silently
    assert f"{written} already exists" in capsys.readouterr().err
    assert main([*args, "--only-predicted", "--overwrite"]) == 0

    dataset_json.write_text(json.dumps({"file_ending": ".nii.gz"}))
    assert main([*args, "--overwrite"]) == 1
    assert "'labels'" in capsys.readouterr().err


def test_cli_dataset_id_without_nnunet_raw(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main([str(tmp_path), str(tmp_path), "-d", "1"]) == 1
    assert "nnUNet_raw" in capsys.readouterr().err
