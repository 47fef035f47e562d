"""Per-case segmentation metrics: Dice, normalised surface Dice (NSD), HD95 and ASD.

Why MONAI for the surface distances
-----------------------------------
Surface distances are easy to get subtly wrong (which voxels form the surface, how anisotropic spacing enters,
how surface elements are weighted for NSD). MONAI (``monai.metrics``) is actively maintained, already a dependency
of nnssl, takes the voxel spacing in mm (``spacing=``) for every distance, ships the normalised surface Dice
(``compute_surface_dice``) next to ``compute_hausdorff_distance`` and ``compute_average_surface_distance``, and is
torch-native (the same calls run on a GPU tensor). DeepMind's ``surface-distance`` code, which the FLARE22
evaluation used, is maintained on GitHub only (the PyPI uploads are third-party 0.1 snapshots) and would be one more
dependency; MONAI's ``use_subvoxels=True`` NSD reproduces its surface-element ("surfel") weighting. The tests check
MONAI on hand-computed cases.

Definitions (all distances in mm, computed with the reference file's spacing)
----------------------------------------------------------------------------
For one class, ``P`` is the predicted mask and ``G`` the reference mask.

- **Dice** ``= 2 |P ∩ G| / (|P| + |G|)``.
- **NSD at tolerance τ** (Nikolov et al. 2021, FLARE22 "surface Dice"): surface elements of ``P`` and ``G`` on the
  voxel-corner grid, weighted by their area (length in 2D) as in DeepMind's ``surface-distance``
  (``compute_surface_dice(..., use_subvoxels=True)``);
  ``NSD = (area of ∂P within τ of ∂G + area of ∂G within τ of ∂P) / (area ∂P + area ∂G)``.
- **HD95**: MONAI's ``compute_hausdorff_distance(percentile=95)``: surface voxels are ``mask XOR erode(mask)``;
  ``HD95 = max(q95(d(∂P→∂G)), q95(d(∂G→∂P)))`` with ``q95`` the linearly interpolated 95th percentile of the directed
  distances. (medpy's ``hd95``, used by some SSL papers, takes the percentile of both directions pooled; values can
  differ slightly.)
- **ASD** (average symmetric surface distance): MONAI's ``compute_average_surface_distance(symmetric=True)``:
  the mean of the pooled distances ``d(∂P→∂G) ∪ d(∂G→∂P)`` (each surface voxel counts once).

Empty masks (FLARE22 convention for Dice/NSD)
---------------------------------------------
- ``P`` and ``G`` both empty: Dice = 1, NSD = 1, HD95 = 0, ASD = 0 (nothing to find and nothing predicted is a
  perfect answer; FLARE22 scores it 1 for DSC and NSD).
- exactly one of ``P``, ``G`` empty: Dice = 0, NSD = 0 (FLARE22), and HD95 = ASD = NaN: a distance to an empty
  surface is undefined, and any finite penalty (e.g. the image diagonal) would make the mean depend on the image
  size. NaN values are excluded from means and standard deviations and counted instead (``n_undefined`` in the
  summary), so a missed or hallucinated organ still costs its full Dice and NSD.

Label values may be an int or a list of ints (nnU-Net region-based labels: the region is every voxel whose label
is in the list). The ``background`` (value 0) and ``ignore`` entries of a dataset.json are not evaluated; voxels
whose reference is the ignore label are removed from both masks before any metric is computed.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

METRIC_NAMES = ("dice", "nsd", "hd95", "asd")


def evaluated_classes(labels: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The classes to evaluate: dataset.json ``labels`` without background (value 0) and ``ignore``.

    Returns ``{class name: tuple of label values}``; a plain label becomes a 1-tuple.
    """
    classes: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if values == (0,):
            continue
        if 0 in values:
            raise ValueError(f"label {name!r}: region {list(values)} contains the background value 0")
        classes[name] = values
    if not classes:
        raise ValueError(f"labels {dict(labels)} contain no foreground class to evaluate")
    return classes


def dice_score(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|); 1.0 when both masks are empty (FLARE22).

    Written here instead of MONAI's DiceMetric because it is one line on boolean arrays and avoids building
    one-hot float tensors of the full volume.
    """
    denominator = int(pred_mask.sum()) + int(ref_mask.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred_mask, ref_mask).sum()) / denominator


def _crop_to_union(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one background voxel on every side.

    MONAI crops the same way internally, but only after converting the full volume to a float tensor once per
    metric; cropping first keeps those tensors at organ size. The zero border keeps masks that touch the image
    edge closed, exactly as MONAI's own padding does.
    """
    union = np.logical_or(pred_mask, ref_mask)
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    return np.pad(pred_mask[box], 1), np.pad(ref_mask[box], 1)


def surface_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """NSD at ``tolerance_mm``, HD95 and ASD (mm) of two boolean masks, with the empty-mask rules of this module.

    ``spacing`` is in mm, one entry per array axis (2D or 3D).
    """
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} != reference shape {ref_mask.shape}")
    if len(spacing) != pred_mask.ndim or pred_mask.ndim not in (2, 3):
        raise ValueError(f"spacing {list(spacing)} does not match a 2D/3D mask of shape {pred_mask.shape}")
    pred_empty, ref_empty = not pred_mask.any(), not ref_mask.any()
    if pred_empty and ref_empty:
        return {"nsd": 1.0, "hd95": 0.0, "asd": 0.0}
    if pred_empty or ref_empty:
        return {"nsd": 0.0, "hd95": float("nan"), "asd": float("nan")}

    pred_crop, ref_crop = _crop_to_union(pred_mask.astype(bool), ref_mask.astype(bool))
    y_pred = torch.from_numpy(pred_crop)[None, None].float()
    y_ref = torch.from_numpy(ref_crop)[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # Both masks are non-empty here, so MONAI's empty-mask warnings cannot apply; what remains is an internal
        # deprecation notice from MONAI calling its own helper.
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(
            y_pred, y_ref, [float(tolerance_mm)], include_background=True, spacing=spacing, use_subvoxels=True
        )
        hd95 = compute_hausdorff_distance(y_pred, y_ref, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(y_pred, y_ref, include_background=True, symmetric=True, spacing=spacing)
    return {"nsd": float(nsd.item()), "hd95": float(hd95.item()), "asd": float(asd.item())}


def compute_case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int | Sequence[int]],
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float | int]]:
    """Dice, NSD, HD95 and ASD for every foreground class of one case.

    ``pred`` and ``gt`` are integer label maps of the same 2D/3D shape, ``spacing`` the voxel size in mm per array
    axis, ``labels`` a dataset.json ``labels`` mapping (background and ``ignore`` are skipped, see the module
    docstring). Returns ``{class name: {"dice", "nsd", "hd95", "asd", "n_ref_voxels", "n_pred_voxels"}}``.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {gt.shape}")
    if tolerance_mm < 0 or not np.isfinite(tolerance_mm):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    classes = evaluated_classes(labels)
    evaluated_region = None
    if "ignore" in labels:
        evaluated_region = gt != int(labels["ignore"])

    results: dict[str, dict[str, float | int]] = {}
    for name, values in classes.items():
        pred_mask = np.isin(pred, values)
        ref_mask = np.isin(gt, values)
        if evaluated_region is not None:
            pred_mask &= evaluated_region
            ref_mask &= evaluated_region
        metrics: dict[str, float | int] = {"dice": dice_score(pred_mask, ref_mask)}
        metrics.update(surface_metrics(pred_mask, ref_mask, spacing, tolerance_mm))
        metrics["n_ref_voxels"] = int(ref_mask.sum())
        metrics["n_pred_voxels"] = int(pred_mask.sum())
        results[name] = metrics
    return results
