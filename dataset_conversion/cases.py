"""Cases and the checks every image and label map passes before it is written.

A :class:`Case` is one output case (one :class:`~dataset_conversion.readers.ImageSource` per channel, an optional
label, the group that must not be split across roles); a :class:`DatasetFormat` is what goes into dataset.json plus
the rules label maps must satisfy. :func:`check_image` checks dimension, components, size, spacing and finite
values; :func:`align_label` puts a label on its image's voxel grid, where the only change allowed is an exact axis
permutation/flip (labels are never resampled); :func:`label_to_uint8` applies the label remap and refuses
non-integer or unexpected values. Geometry is compared with tolerances since NIfTI stores it as float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .errors import ConversionError
from .readers import ImageSource

# Geometry tolerances: NIfTI stores spacing/origin as float32, so exact equality is too strict.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    """One output case: ``images`` one source per channel, ``label`` None for unlabeled data, ``group`` the unit
    that must never be split across roles (ACDC: the patient; default: the case itself)."""

    case_id: str
    images: tuple[ImageSource, ...]
    label: ImageSource | None = None
    group: str | None = None


@dataclass(frozen=True)
class DatasetFormat:
    """What goes into dataset.json plus the rules that label maps must satisfy.

    ``label_remap`` maps raw label values to output values (LA: 255 -> 1); raw values allowed are the output label
    values plus the remap keys. ``ndim`` is 3 for volumes, 2 for natural images (PNG, nnU-Net's NaturalImage2DIO).
    """

    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str = ".nii.gz"
    ndim: int = 3
    label_remap: dict[int, int] = field(default_factory=dict)
    description: str = ""
    reference: str = ""
    licence: str = "see the original dataset"

    def allowed_raw_label_values(self) -> set[int]:
        return set(self.labels.values()) | set(self.label_remap)


def check_image(image: sitk.Image, fmt: DatasetFormat, source: object) -> None:
    if image.GetDimension() != fmt.ndim:
        raise ConversionError(f"{source}: image is {image.GetDimension()}D (size {image.GetSize()}) "
                              f"but {fmt.ndim}D images were expected")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{source}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                              "expected a scalar image")
    if min(image.GetSize()) < 1:
        raise ConversionError(f"{source}: empty image (size {image.GetSize()})")
    if not all(np.isfinite(s) and s > 0 for s in image.GetSpacing()):
        raise ConversionError(f"{source}: invalid spacing {image.GetSpacing()}")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and not np.isfinite(
            sitk.GetArrayViewFromImage(image)).all():
        raise ConversionError(f"{source}: image holds NaN or infinite values")


def geometry_mismatch(a: sitk.Image, b: sitk.Image) -> str | None:
    """Why two images do not share one voxel grid (size, spacing, origin, direction), or None when they do."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=_SPACING_RTOL, atol=0):
        return f"spacing {a.GetSpacing()} vs {b.GetSpacing()}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=_ORIGIN_ATOL_MM):
        return f"origin {a.GetOrigin()} vs {b.GetOrigin()}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_DIRECTION_ATOL):
        return f"direction {a.GetDirection()} vs {b.GetDirection()}"
    return None


def align_label(image: sitk.Image, label: sitk.Image, image_src: object, label_src: object) -> sitk.Image:
    """The label on the image's voxel grid, or a :class:`ConversionError` naming both files.

    When only the stored orientation differs (the same physical grid written with permuted/flipped axes, a known
    pitfall of DICOM-derived labels such as NIH Pancreas-CT), the label is reoriented with
    ``sitk.DICOMOrient``: an exact voxel permutation, not a resampling.
    """
    problem = geometry_mismatch(image, label)
    if problem is None:
        return label
    if image.GetDimension() == 3 and problem.startswith(("direction", "origin", "size")):
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        reoriented = sitk.DICOMOrient(label, code)
        if geometry_mismatch(image, reoriented) is None:
            return reoriented
    raise ConversionError(f"image and label do not share one voxel grid ({problem}): {image_src} and {label_src}")


def label_to_uint8(label: sitk.Image, fmt: DatasetFormat, source: object) -> np.ndarray:
    """Label array as uint8 with ``fmt.label_remap`` applied; non-integer or unexpected values are errors."""
    arr = sitk.GetArrayFromImage(label)
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{source}: label map has {label.GetNumberOfComponentsPerPixel()} components per voxel")
    rounded = np.rint(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.allclose(arr, rounded, rtol=0, atol=1e-3):
        raise ConversionError(f"{source}: label map holds non-integer values (e.g. {arr[arr != rounded].flat[0]})")
    values = {int(v) for v in np.unique(rounded)}
    unexpected = sorted(values - fmt.allowed_raw_label_values())
    if unexpected:
        raise ConversionError(f"{source}: unexpected label values {unexpected[:20]}; "
                              f"expected a subset of {sorted(fmt.allowed_raw_label_values())}")
    out = rounded.astype(np.int64)
    for raw, new in fmt.label_remap.items():
        out[rounded == raw] = new
    return out.astype(np.uint8)
