"""Hand-made segmentation cases with known metrics, shared by the evaluation unit tests and the CLI's e2e test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def cube(shape, start, size=3, value=1, dtype=np.uint8):
    arr = np.zeros(shape, dtype=dtype)
    arr[tuple(slice(s, s + size) for s in start)] = value
    return arr


def write_nifti(path: Path, arr: np.ndarray, spacing_numpy_order) -> None:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing([float(s) for s in spacing_numpy_order[::-1]])  # SimpleITK wants x, y, z
    sitk.WriteImage(image, str(path))


def make_nifti_cases(tmp_path: Path) -> tuple[Path, Path, tuple[float, float, float]]:
    """Three cases: perfect, liver shifted by one voxel along the 2 mm axis, spleen missed."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    spacing = (2.0, 0.5, 0.5)
    shape = (9, 12, 12)
    for case, liver_shift, spleen_predicted in (("case_a", 0, True), ("case_b", 1, True), ("case_c", 0, False)):
        gt = cube(shape, (1, 1, 1), size=4) + cube(shape, (5, 7, 7), size=3, value=2)
        pred = cube(shape, (1 + liver_shift, 1, 1), size=4)
        if spleen_predicted:
            pred += cube(shape, (5, 7, 7), size=3, value=2)
        write_nifti(gt_dir / f"{case}.nii.gz", gt, spacing)
        write_nifti(pred_dir / f"{case}.nii.gz", pred, spacing)
    return pred_dir, gt_dir, spacing
