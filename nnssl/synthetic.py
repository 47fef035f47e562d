"""Synthetic raw datasets in the nnssl raw-format contract (see :mod:`nnssl.split`), for demos, tests and benchmarks.

Two kinds, both small enough that ~30 cases are written in seconds:

- ``"3d"``: CT-like abdominal volumes (NIfTI, ~32x48x48 voxels z,y,x, anisotropic spacing ~(3.0, 1.5, 1.5) mm,
  HU values) with labels 1 liver, 2 spleen, 3 kidney (left+right), 4 adrenal (tiny when ``imbalanced``).
- ``"2d"``: ultrasound-like B-mode images (grayscale PNG, 64x64, BUSI-like) with label 1 lesion: a hypoechoic
  blob with an irregular border and posterior shadowing or enhancement; ~10% of cases are normal (empty mask).
- ``"cardiac"``: cardiac-MRI-like short-axis slices (grayscale PNG, 64x64, ACDC labels 1 RV, 2 MYO, 3 LV) from
  three scanner-like acquisition styles (:mod:`nnssl.synthetic_cardiac`).
- ``"cardiac3d"``: the same as short-axis stacks (NIfTI, 10x48x48 voxels of ~8x1.6x1.6 mm, ACDC labels;
  :mod:`nnssl.synthetic_cardiac3d`).

``n_val`` cases (any kind) go to imagesVal/labelsVal and are listed under ``val`` in ssl_split.json: a validation set
apart from the test set, for learning curves (fold 0 validates on it; see the README's Folds section).

Every case is drawn from its own generator seeded by ``(seed, case index)``, so arrays are byte-identical for the
same seed. Per-case variation (organ position, size, rotation, shape, contrast phase, noise, bias) is large
enough that a few labeled cases do not cover the distribution, which is what makes unlabeled data useful.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from nnssl import synthetic_cardiac, synthetic_cardiac3d
from nnssl.io import atomic_output_dir, atomic_write_json
from nnssl.split import SSLSplit, choose_labeled, save_split, validate_split_against_raw

KINDS = ("3d", "2d", "cardiac", "cardiac3d")
DEFAULT_NAMES = {"3d": "Synthetic3D", "2d": "Synthetic2D", "cardiac": "SyntheticCardiac",
                 "cardiac3d": "SyntheticCardiac3D"}
FILE_ENDINGS = {"3d": ".nii.gz", "2d": ".png", "cardiac": ".png", "cardiac3d": ".nii.gz"}
SCANNER_KINDS = ("cardiac", "cardiac3d")  # kinds drawn from scanner-like acquisition styles
NATURAL_IMAGE_KINDS = ("2d", "cardiac")
LABELS = {
    "3d": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "adrenal": 4},
    "2d": {"background": 0, "lesion": 1},
    "cardiac": dict(synthetic_cardiac.LABELS),
    "cardiac3d": dict(synthetic_cardiac.LABELS),
}
CHANNEL_NAMES = {"3d": {"0": "CT"}, "2d": {"0": "ultrasound"}, "cardiac": {"0": "cineMRI"},
                 "cardiac3d": {"0": "cineMRI"}}
CASE_PREFIX = "syn_"
SHAPE_3D = (32, 48, 48)  # z, y, x
SPACING_3D = (3.0, 1.5, 1.5)  # mm, z, y, x
SHAPE_2D = (64, 64)  # rows = depth below the probe, columns = lateral
NORMAL_FRACTION_2D = 0.1
# One seed stream per case, independent of the number of cases; this offset keeps role/normal draws apart.
_GLOBAL_STREAM = 1_000_003


# ----------------------------------------------------------------------------------------------- shared helpers


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std low-frequency random field: coarse white noise, upsampled with Gaussian weights.

    The upsampling is a separable matrix product rather than ``ndimage.zoom(order=3)``: same smoothness here,
    about 30x faster at these sizes, and generation time is dominated by this function.
    """
    field = rng.standard_normal(coarse)
    for axis, (size, n_nodes) in enumerate(zip(shape, coarse)):
        fine_pos = (np.arange(size) + 0.5) / size * n_nodes - 0.5  # fine samples in coarse-node units
        weights = np.exp(-0.5 * ((fine_pos[:, None] - np.arange(n_nodes)[None, :]) / 0.7) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-8)


def _rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation about the z, y and x axes (in this order) for points given as (z, y, x)."""
    a, b, c = angles_rad
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])  # in-plane (y, x)
    ry = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------- 3D CT-like


@dataclass(frozen=True)
class _Organ:
    label: int
    center_mm: tuple[float, float, float]  # z, y, x relative to the volume centre; +y posterior, +x patient left
    radii_mm: tuple[float, float, float]
    base_hu: float  # unenhanced mean
    enhancement_hu: float  # added at full contrast


# Anatomy in a small (~96 x 72 x 72 mm) field of view. Painting order matters: later organs win overlaps, so the
# tiny adrenal is painted last and keeps its voxels.
_ORGANS = (
    _Organ(1, (8.0, -4.0, -13.0), (24.0, 18.0, 15.0), 55.0, 45.0),  # liver, patient right = image left
    _Organ(2, (14.0, 6.0, 19.0), (15.0, 10.0, 7.5), 45.0, 75.0),  # spleen
    _Organ(3, (-9.0, 12.0, -14.0), (13.0, 7.0, 6.0), 35.0, 170.0),  # right kidney
    _Organ(3, (-7.0, 12.0, 14.0), (13.0, 7.0, 6.0), 35.0, 170.0),  # left kidney
    _Organ(4, (9.0, 10.0, 6.5), (4.5, 4.0, 4.0), 30.0, 40.0),  # left adrenal
)
_ADRENAL_BALANCED_RADII_MM = (10.0, 7.0, 6.0)  # about one kidney's volume


def _deformed_ellipsoid(
    rng: np.random.Generator, coords_mm: np.ndarray, center: np.ndarray, radii: np.ndarray, deform: float
) -> np.ndarray:
    """Voxels inside a randomly rotated ellipsoid whose surface is pushed in/out by a smooth random field."""
    rot = _rotation_matrix(rng.uniform(-0.3, 0.3, size=3))
    local = np.einsum("ij,j...->i...", rot, coords_mm - center[:, None, None, None]) / radii[:, None, None, None]
    bump = _smooth_field(rng, coords_mm.shape[1:], (4, 5, 5))
    return (local**2).sum(0) < (1.0 + deform * bump) ** 2


def shape_3d(voxel_scale: float) -> tuple[int, int, int]:
    """Volume shape for voxels ``voxel_scale`` times the default spacing, covering the same field of view."""
    return tuple(int(round(n / voxel_scale)) for n in SHAPE_3D)


def _make_case_3d(rng: np.random.Generator, imbalanced: bool, voxel_scale: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One CT-like case: ``(image int16 HU, label uint8, spacing (z, y, x) mm)``.

    Anatomy is drawn in mm, so ``voxel_scale`` only changes the sampling: the same body and organs on a grid of
    ``SHAPE_3D / voxel_scale`` voxels of ``SPACING_3D * voxel_scale`` mm (and the same random draws)."""
    shape = shape_3d(voxel_scale)
    spacing = tuple(float(s * voxel_scale * rng.uniform(0.95, 1.05)) for s in SPACING_3D)
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    coords = (grid - centre[:, None, None, None]) * np.array(spacing)[:, None, None, None]
    z, y, x = coords
    half_y, half_x = shape[1] * spacing[1] / 2, shape[2] * spacing[2] / 2

    # Body: elliptical cross-section whose radii vary smoothly along z; fat rim of a few mm.
    ry = half_y * rng.uniform(0.82, 0.9) * (1 + 0.03 * np.sin(z / 20.0 + rng.uniform(0, 6.28)))
    rx = half_x * rng.uniform(0.88, 0.95) * (1 + 0.03 * np.sin(z / 25.0 + rng.uniform(0, 6.28)))
    body_r = np.sqrt((y / ry) ** 2 + (x / rx) ** 2)
    body = body_r < 1.0
    fat_mm = rng.uniform(4.0, 7.0)
    inner = np.sqrt((y / (ry - fat_mm)) ** 2 + (x / (rx - fat_mm)) ** 2) < 1.0
    spine = (y - (ry - fat_mm - 7.0)) ** 2 + (x - rng.uniform(-1.5, 1.5)) ** 2 < rng.uniform(4.5, 6.0) ** 2
    allowed = inner & ~spine

    label = np.zeros(shape, dtype=np.uint8)
    organ_masks = []
    for organ in _ORGANS:
        radii = _ADRENAL_BALANCED_RADII_MM if (organ.label == 4 and not imbalanced) else organ.radii_mm
        radii = np.array(radii) * rng.uniform(0.85, 1.15, size=3)
        jitter = 2.0 if organ.label == 4 else 4.0  # the adrenal sits between kidney and spleen: little room
        center = np.array(organ.center_mm) + rng.uniform(-jitter, jitter, size=3)
        mask = _deformed_ellipsoid(rng, coords, center, radii, deform=0.12) & allowed
        label[mask] = organ.label
        organ_masks.append((organ, mask))

    # Contrast phase shared by all organs of a case (0 = native, 1 = portal venous), so organ intensities
    # overlap across cases while staying ordered within one.
    contrast = rng.uniform(0.5, 1.0)
    soft_tissue_hu = rng.uniform(10.0, 30.0)
    image = np.full(shape, -1000.0)
    image[body] = rng.uniform(-110.0, -90.0)
    image[inner] = soft_tissue_hu
    # Mesenteric / retroperitoneal fat between organs, which is what outlines kidneys and spleen on real CT.
    visceral_fat = inner & (label == 0) & (_smooth_field(rng, shape, (5, 7, 7)) > rng.uniform(-0.2, 0.4))
    image[visceral_fat] = rng.uniform(-110.0, -70.0)
    # Bowel loops: soft-tissue blobs in organ-like HU that are not labeled, so intensity alone is not enough.
    for _ in range(int(rng.integers(1, 4))):
        c = np.array([rng.uniform(-25, 25), rng.uniform(-22, -8), rng.uniform(-15, 15)])
        blob = _deformed_ellipsoid(rng, coords, c, rng.uniform(4.0, 8.0, size=3), deform=0.2) & inner
        image[blob & (label == 0)] = rng.uniform(20.0, 90.0)
    image[spine] = rng.uniform(300.0, 500.0)
    texture = _smooth_field(rng, shape, (8, 12, 12))
    for organ, mask in organ_masks:
        visible = mask & (label == organ.label)  # minus voxels a later organ painted over
        mean_hu = organ.base_hu + organ.enhancement_hu * contrast + rng.normal(0.0, 8.0)
        image[visible] = mean_hu + 6.0 * texture[visible]

    bias = rng.uniform(8.0, 20.0) * _smooth_field(rng, shape, (3, 3, 3))
    image = np.where(body, image + bias, image)
    image = ndimage.gaussian_filter(image, sigma=(0.4, 0.7, 0.7))  # partial-volume blur
    image += rng.normal(0.0, rng.uniform(10.0, 18.0), size=shape)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image, label, spacing


def _write_nifti(array: np.ndarray, spacing_zyx: tuple[float, ...], path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK orders spacing x, y, z
    sitk.WriteImage(img, str(path), useCompression=True)


# ----------------------------------------------------------------------------------------------- 2D ultrasound-like


def _lesion_mask(rng: np.random.Generator, imbalanced: bool) -> np.ndarray:
    """Irregular blob: polar radius r(theta) = r0 * (1 + sum_k a_k cos(k theta + phi_k)), k = 2..8."""
    rows, cols = np.indices(SHAPE_2D, dtype=np.float64)
    r0 = rng.uniform(5.0, 10.0) if imbalanced else rng.uniform(9.0, 14.0)
    cr = rng.uniform(18.0, 40.0)
    cc = rng.uniform(16.0, SHAPE_2D[1] - 16.0)
    theta = np.arctan2((rows - cr) / 0.8, cols - cc)  # lesions are wider than tall ("parallel" orientation)
    irregularity = rng.uniform(0.1, 0.6)
    radius = np.ones_like(theta)
    for k in range(2, 9):
        radius += irregularity / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot((rows - cr) / 0.8, cols - cc) < r0 * radius


def _make_case_2d(rng: np.random.Generator, has_lesion: bool, imbalanced: bool) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode-like image: ``(image uint8, label uint8 in {0, 1})``."""
    h, w = SHAPE_2D
    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]
    # Layered echogenicity: bright skin, dark subcutaneous fat, textured gland, darker pectoral muscle.
    fat_bottom = rng.uniform(9, 16) + 2.0 * np.sin(cols / rng.uniform(6, 12) + rng.uniform(0, 6.28))
    muscle_top = rng.uniform(48, 56) + 2.0 * np.sin(cols / rng.uniform(8, 14) + rng.uniform(0, 6.28))
    echo = np.full(SHAPE_2D, rng.uniform(0.5, 0.7)) * (1 + 0.25 * _smooth_field(rng, SHAPE_2D, (8, 8)))
    echo = np.where(rows < fat_bottom, rng.uniform(0.15, 0.3), echo)
    echo = np.where(rows < rng.uniform(2, 4), 0.95, echo)
    echo = np.where(rows > muscle_top, rng.uniform(0.35, 0.5) * (1 + 0.2 * np.sin(rows * 1.3)), echo)

    label = np.zeros(SHAPE_2D, dtype=np.uint8)
    if has_lesion:
        lesion = _lesion_mask(rng, imbalanced)
        label[lesion] = 1
        echo = np.where(lesion, rng.uniform(0.03, 0.15), echo)
        # Posterior acoustic feature below the lesion: shadowing (solid, often malignant) or enhancement
        # (cystic), fading with depth and smeared laterally like a real beam.
        lesion_cols = lesion.any(axis=0)
        bottom = np.where(lesion_cols, h - 1 - np.argmax(lesion[::-1], axis=0), h)
        below = (rows > bottom[None, :]).astype(np.float64)
        below = ndimage.gaussian_filter1d(below, sigma=1.5, axis=1)
        factor = rng.uniform(0.35, 0.6) if rng.random() < 0.6 else rng.uniform(1.3, 1.7)
        fade = np.exp(-np.clip(rows - bottom[None, :], 0, None) / rng.uniform(15, 40))
        echo = echo * (1 + (factor - 1) * below * fade)

    # Fully developed speckle: magnitude of low-pass complex Gaussian noise (Rayleigh amplitude), correlated
    # more laterally than axially as with a real point-spread function.
    re = ndimage.gaussian_filter(rng.standard_normal(SHAPE_2D), sigma=(0.6, 1.1))
    im = ndimage.gaussian_filter(rng.standard_normal(SHAPE_2D), sigma=(0.6, 1.1))
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    attenuation = np.exp(-rows * rng.uniform(0.004, 0.012))  # imperfect time-gain compensation
    envelope = echo * speckle * attenuation
    gain = rng.uniform(8.0, 14.0)
    compressed = np.log1p(gain * envelope) / np.log1p(gain * 3.0)  # log compression to display range
    image = np.clip(np.rint(255 * compressed), 0, 255).astype(np.uint8)
    return image, label


def _write_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path, format="PNG")


# ----------------------------------------------------------------------------------------------- dataset writer


def _check_arguments(dataset_id: int, kind: str, n_labeled: int, n_unlabeled: int, n_test: int, name: str) -> None:
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net's DatasetXXX), got {dataset_id!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n_labeled < 1:
        raise ValueError(f"n_labeled must be >= 1 (nnU-Net needs labeled training cases), got {n_labeled}")
    if n_unlabeled < 0 or n_test < 0:
        raise ValueError(f"n_unlabeled and n_test must be >= 0, got {n_unlabeled} and {n_test}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")


def _check_no_other_dataset_with_id(raw_root: Path, dataset_id: int, folder_name: str) -> None:
    """nnU-Net resolves ``-d ID`` by prefix and fails on two folders with the same id; refuse to create that."""
    if not raw_root.is_dir():
        return
    prefix = f"Dataset{dataset_id:03d}_"
    others = sorted(p.name for p in raw_root.iterdir() if p.name.startswith(prefix) and p.name != folder_name)
    if others:
        raise FileExistsError(f"{raw_root}: dataset id {dataset_id} is already used by {others}; choose another id")


def _assign_roles(n_labeled: int, n_unlabeled: int, n_test: int, seed: int, n_val: int = 0,
                  ) -> tuple[list[str], list[str], list[str], list[str]]:
    """Role-independent numbering: ids are ``syn_0000...`` over all cases, roles drawn at random from them. The
    validation cases are numbered after all others, so adding them leaves the other roles' draws unchanged."""
    ids = [f"{CASE_PREFIX}{i:04d}" for i in range(n_labeled + n_unlabeled + n_test)]
    order = np.random.default_rng([seed, _GLOBAL_STREAM]).permutation(len(ids))
    test = sorted(ids[i] for i in order[:n_test])
    pool = [ids[i] for i in order[n_test:]]
    labeled, unlabeled = choose_labeled(pool, n_labeled=n_labeled, seed=seed)
    val = [f"{CASE_PREFIX}{i:04d}" for i in range(len(ids), len(ids) + n_val)]
    return labeled, unlabeled, test, val


def _normal_cases_2d(labeled: list[str], others: list[str], seed: int) -> set[str]:
    """~10% lesion-free cases; the first labeled case always has a lesion so training never sees only empties."""
    candidates = sorted(labeled[1:] + others)
    n_normal = int(round(NORMAL_FRACTION_2D * (len(labeled) + len(others))))
    order = np.random.default_rng([seed, _GLOBAL_STREAM + 1]).permutation(len(candidates))
    return {candidates[i] for i in order[:n_normal]}


def make_synthetic_dataset(
    raw_root: str | Path,
    dataset_id: int,
    kind: str = "3d",
    n_labeled: int = 6,
    n_unlabeled: int = 12,
    n_test: int = 4,
    seed: int = 0,
    imbalanced: bool = True,
    name: str | None = None,
    overwrite: bool = False,
    voxel_scale: float = 1.0,
    n_val: int = 0,
    labeled_scanner: int | None = None,
) -> Path:
    """Write ``raw_root/Dataset{id:03d}_{name}`` in the nnssl raw-format contract and return its path.

    Labeled cases go to imagesTr/labelsTr, unlabeled ones to imagesUnlabeled with their withheld ground truth in
    labelsUnlabeled, test cases to imagesTs/labelsTs. ``imbalanced`` (3D) makes the adrenal a few dozen voxels
    against thousands of liver voxels; (2D) it makes lesions smaller. ``voxel_scale`` (3D) samples the same
    anatomy with voxels that many times larger (1.5: 21x32x32 voxels of 4.5x2.25x2.25 mm, about 3.4x fewer voxels,
    for CPU benchmarks). ``labeled_scanner`` (cardiac, cardiac3d) draws every labeled case from that acquisition style
    (unlabeled, validation and test cases from all of them). The folder appears only when complete.
    """
    if voxel_scale <= 0 or (kind != "3d" and voxel_scale != 1.0):
        raise ValueError(f"voxel_scale must be > 0 and is for kind '3d' only (got {voxel_scale} for '{kind}')")
    if labeled_scanner is not None and kind not in SCANNER_KINDS:
        raise ValueError(f"labeled_scanner is for kinds {', '.join(SCANNER_KINDS)} only (got it for '{kind}')")
    name = name or DEFAULT_NAMES.get(kind, "")
    _check_arguments(dataset_id, kind, n_labeled, n_unlabeled, n_test, name)
    raw_root = Path(raw_root)
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    final = raw_root / folder_name
    _check_no_other_dataset_with_id(raw_root, dataset_id, folder_name)
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val}")
    labeled, unlabeled, test, val = _assign_roles(n_labeled, n_unlabeled, n_test, seed, n_val)
    ending = FILE_ENDINGS[kind]
    folders = {
        **{c: ("imagesTr", "labelsTr") for c in labeled},
        **{c: ("imagesUnlabeled", "labelsUnlabeled") for c in unlabeled},
        **{c: ("imagesTs", "labelsTs") for c in test},
        **{c: ("imagesVal", "labelsVal") for c in val},
    }
    scanners: dict[str, int] = {}
    normal = _normal_cases_2d(labeled, unlabeled + test, seed) if kind == "2d" else set()

    with atomic_output_dir(final, overwrite=overwrite,
                           replace_only_with=("dataset.json", "ssl_split.json"), clean_stale=True) as out:
        for sub in {f for pair in folders.values() for f in pair}:
            (out / sub).mkdir()
        for case in sorted(folders):
            rng = np.random.default_rng([seed, int(case[len(CASE_PREFIX):])])
            img_dir, lab_dir = folders[case]
            if kind == "3d":
                image, label, spacing = _make_case_3d(rng, imbalanced, voxel_scale)
                _write_nifti(image, spacing, out / img_dir / f"{case}_0000{ending}")
                _write_nifti(label, spacing, out / lab_dir / f"{case}{ending}")
            elif kind == "cardiac3d":
                forced = labeled_scanner if case in labeled else None
                image, label, scanners[case], spacing = synthetic_cardiac3d.make_case(rng, scanner=forced)
                _write_nifti(image, spacing, out / img_dir / f"{case}_0000{ending}")
                _write_nifti(label, spacing, out / lab_dir / f"{case}{ending}")
            else:
                if kind == "cardiac":
                    forced = labeled_scanner if case in labeled else None
                    image, label, scanners[case] = synthetic_cardiac.make_case(rng, scanner=forced)
                else:
                    image, label = _make_case_2d(rng, has_lesion=case not in normal, imbalanced=imbalanced)
                _write_png(image, out / img_dir / f"{case}_0000{ending}")
                _write_png(label, out / lab_dir / f"{case}{ending}")
        dataset_json = {
            "channel_names": CHANNEL_NAMES[kind],
            "labels": LABELS[kind],
            "numTraining": len(labeled),
            "file_ending": ending,
            "name": folder_name,
            "description": f"nnssl synthetic {kind} dataset (seed {seed}, imbalanced={imbalanced}"
                           + (f", voxel_scale={voxel_scale})" if voxel_scale != 1.0 else ")"),
            "numUnlabeled": len(unlabeled),
            "numTest": len(test),
        }
        if kind in NATURAL_IMAGE_KINDS:
            dataset_json["overwrite_image_reader_writer"] = "NaturalImage2DIO"
        atomic_write_json(out / "dataset.json", dataset_json)
        extra = {"generator": "nnssl.synthetic", "kind": kind, "imbalanced": imbalanced, "voxel_scale": voxel_scale}
        if kind == "2d":
            extra["normal_cases"] = sorted(normal)
        if kind in SCANNER_KINDS:
            extra["scanner_of_case"] = dict(sorted(scanners.items()))
            extra["labeled_scanner"] = labeled_scanner
        if val:
            extra["val"] = val
        split = SSLSplit(labeled, unlabeled, test, seed=seed, origin="synthetic", extra=extra)
        save_split(split, out / "ssl_split.json")
        validate_split_against_raw(split, out)
    return final


# ----------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="nnssl_make_synthetic",
        description="Write a synthetic nnssl raw dataset (labeled, unlabeled with withheld labels, test).",
    )
    p.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    p.add_argument("--kind", choices=KINDS, default="3d",
                   help="3d: CT-like NIfTI organs; 2d: ultrasound-like PNG; cardiac: cine-MRI-like PNG (RV/MYO/LV); "
                        "cardiac3d: cine-MRI-like short-axis stacks (NIfTI, RV/MYO/LV)")
    p.add_argument("--labeled", type=int, default=6, help="number of labeled cases (default 6)")
    p.add_argument("--unlabeled", type=int, default=12, help="number of unlabeled cases (default 12)")
    p.add_argument("--test", type=int, default=4, help="number of test cases (default 4)")
    p.add_argument("--val", type=int, default=0, help="number of validation cases (imagesVal, default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="no class imbalance (3D adrenal as large as a kidney)")
    p.add_argument("--voxel-scale", type=float, default=1.0,
                   help="3d: voxels this many times the default 3x1.5x1.5 mm, same field of view (default 1)")
    p.add_argument("--labeled-scanner", type=int, default=None,
                   help="cardiac, cardiac3d: draw every labeled case from this acquisition style (0..2; default: "
                        "any)")
    p.add_argument("--name", default=None, help="dataset name (default Synthetic3D / Synthetic2D)")
    p.add_argument("--raw", default=None, help="raw data root (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise SystemExit("nnssl_make_synthetic: give --raw DIR or set the nnUNet_raw environment variable")
    try:
        path = make_synthetic_dataset(
            raw, args.dataset_id, kind=args.kind, n_labeled=args.labeled, n_unlabeled=args.unlabeled,
            n_test=args.test, seed=args.seed, imbalanced=not args.balanced, name=args.name, overwrite=args.overwrite,
            voxel_scale=args.voxel_scale, n_val=args.val, labeled_scanner=args.labeled_scanner,
        )
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"nnssl_make_synthetic: {e}") from e
    split = json.loads((path / "ssl_split.json").read_text(encoding="utf-8"))
    print(f"wrote {path} ({len(split['labeled'])} labeled, {len(split['unlabeled'])} unlabeled, "
          f"{len(split['test'])} test)")


if __name__ == "__main__":
    main()
