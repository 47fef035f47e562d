"""A 3D cardiac-MRI-like case (short-axis cine stack, ACDC labels), for the 3D label-efficiency preset.

The volume the 2D :mod:`nnssl.synthetic_cardiac` slice comes from: ``SHAPE`` = ``N_SLICES`` short-axis slices from
above the base to below the apex, ACDC-like anisotropy (thick slices, ``SPACING`` mm), labels 1 RV cavity, 2 LV
myocardium, 3 LV cavity. ``IN_PLANE`` sets the sampling (48: 1.6 mm pixels as the 2D set's scale; 32 x 32 at 2.4 mm
was only 1.3x faster per iteration on 2 CPU cores, and its fully supervised reference missed the RV on seed 0).
The same tissues, distractors and scanner-like acquisition styles (``_SCANNERS``) as the 2D set, plus what only a
stack has:

- **through-plane anatomy**: the LV cavity narrows from base to apex and ends in a myocardial cap, the RV crescent
  ends before the apex, the outflow tract (blood-bright, unlabeled) sits above the base and the liver below the apex,
  so which slices hold which label varies with each case's base and apex level;
- **slice misalignment**: separate breath-holds shift some slices in plane by a pixel or two (image and label
  together, as ACDC's stacks do).

The anatomy is drawn once per case (centre, orientation, radii, boundary roughness shared by every slice, a small
tilt of the long axis), so the structures are coherent 3D shapes. Drawn in anatomy units (``FIELD_OF_VIEW`` units
across, 1.6 mm each) and sampled every ``STEP`` units; intensities are written as uint8-ranged int16 (MRI: nnU-Net
z-scores each image).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnssl.synthetic_cardiac import _SCANNERS, _TISSUE, N_SCANNERS, _radial_shape

N_SLICES = 10
FIELD_OF_VIEW = 48.0  # anatomy units across (1 unit = 1.6 mm)
IN_PLANE = 48  # pixels across
STEP = FIELD_OF_VIEW / IN_PLANE  # anatomy units per pixel
SHAPE = (N_SLICES, IN_PLANE, IN_PLANE)  # z (base -> apex), rows, columns
SPACING = (8.0, 1.6 * STEP, 1.6 * STEP)  # mm, z, y, x (ACDC: 5-10 mm slices, 1.2-1.8 mm in plane)


def _smooth_noise(rng: np.random.Generator, sigma: tuple[float, float, float]) -> np.ndarray:
    """Unit-variance smooth noise; ``sigma`` in slices and anatomy units."""
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), (sigma[0], sigma[1] / STEP, sigma[2] / STEP))
    return field / (field.std() + 1e-8)


def _taper(level: np.ndarray, end: float) -> np.ndarray:
    """Cross-section radius factor of a half-ellipsoid whose tip is at ``level == end`` (0 beyond it)."""
    return np.sqrt(np.clip(1.0 - (level / end) ** 2, 0.0, None))


def make_case(rng: np.random.Generator, scanner: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, int, tuple[float, float, float]]:
    """One short-axis stack: ``(image int16, label uint8 in 0..3, scanner index, spacing (z, y, x) mm)``.

    ``scanner`` forces the acquisition style (``None``: drawn at random); the draw is made either way, so a forced
    case has the same anatomy as the unforced case of the same ``rng``.
    """
    if scanner is not None and not 0 <= scanner < N_SCANNERS:
        raise ValueError(f"scanner must be in 0..{N_SCANNERS - 1}, got {scanner}")
    drawn = int(rng.integers(N_SCANNERS))
    scanner = drawn if scanner is None else scanner
    gamma_range, contrast, noise_range, bias_strength, blur, ghost = _SCANNERS[scanner]
    spacing = tuple(float(s * rng.uniform(0.95, 1.05)) for s in SPACING)
    _, rows, cols = np.indices(SHAPE, dtype=np.float64) * STEP  # anatomy units
    n_z, h, w = N_SLICES, FIELD_OF_VIEW, FIELD_OF_VIEW

    # Long axis: base at slice z_base, apex at z_apex; level 0 at the base, 1 at the apex, per slice (shape (Z,1,1)).
    z_base = rng.uniform(0.5, 2.0)
    z_apex = rng.uniform(n_z - 2.5, n_z - 0.5)
    level = (np.arange(n_z, dtype=np.float64)[:, None, None] - z_base) / (z_apex - z_base)
    tilt = rng.uniform(-1.2, 1.2, size=2)  # in-plane drift of the heart centre per slice (px): an oblique long axis
    cy = h / 2 + rng.uniform(-4, 4) + tilt[0] * (level - 0.5) * 3
    cx = w / 2 + rng.uniform(-4, 4) + tilt[1] * (level - 0.5) * 3

    # Thorax: chest wall, two lungs (a little smaller towards the apex), mediastinum, liver below the apex.
    body, _ = _radial_shape(rows, cols, (h / 2 + rng.uniform(-1, 1), w / 2 + rng.uniform(-1, 1)),
                            rng.uniform(22, 25), rng.uniform(0.8, 0.9), 0.0, rng, 0.1)
    image = np.zeros(SHAPE)
    image[body < 1] = _TISSUE["wall"]
    for side in (-1, 1):
        lung_radius = rng.uniform(7, 9.5) * (1.05 - 0.25 * np.clip(level, 0, 1))
        lung, edge = _radial_shape(rows, cols, (cy - 2 + rng.uniform(-2, 2), cx + side * rng.uniform(15, 18)),
                                   lung_radius, rng.uniform(1.3, 1.7), rng.uniform(-0.3, 0.3), rng, 0.3)
        image[(lung < edge) & (body < 0.92)] = _TISSUE["lung"]
    mediastinum, edge = _radial_shape(rows, cols, (cy, cx), rng.uniform(13, 15), rng.uniform(0.8, 1.0), 0.0, rng, 0.3)
    image[mediastinum < edge] = _TISSUE["wall"]
    liver_radius = rng.uniform(10, 14) * np.clip((level - rng.uniform(0.55, 0.8)) * 2.5, 0, 1) + 1e-3
    liver, edge = _radial_shape(rows, cols, (cy + rng.uniform(9, 13), cx - rng.uniform(5, 10)), liver_radius,
                                rng.uniform(0.6, 0.9), rng.uniform(-0.5, 0.5), rng, 0.2)
    image[(liver < edge) & (body < 0.95)] = _TISSUE["liver"]

    # Heart: LV cavity (a half-ellipsoid ending at the apex), myocardium around it with an apical cap, RV crescent on
    # the septal side ending before the apex.
    angle = rng.uniform(-0.5, 0.5)
    r_lv = rng.uniform(5.0, 8.5)
    thickness = rng.uniform(2.0, 3.8)
    aspect = rng.uniform(0.8, 1.0)
    cavity_radius = r_lv * _taper(np.clip(level, 0, None), 1.0) + 1e-3
    outer_radius = (r_lv + thickness) * _taper(np.clip(level, 0, None), 1.0 + thickness / r_lv * 0.6) + 1e-3
    in_heart = level >= -0.05  # nothing of the ventricles above the base
    lv, lv_edge = _radial_shape(rows, cols, (cy, cx), cavity_radius, aspect, angle, rng, 0.12)
    outer, outer_edge = _radial_shape(rows, cols, (cy, cx), outer_radius, aspect, angle, rng, 0.08)
    label = np.zeros(SHAPE, dtype=np.uint8)
    myo_outer = (outer < outer_edge) & in_heart
    rv_end = rng.uniform(0.6, 0.85)
    rv_angle = np.pi + rng.uniform(-0.45, 0.45)  # image left = patient right
    rv_dist = r_lv + thickness + rng.uniform(1.0, 3.0)
    rv_radius = r_lv * rng.uniform(1.0, 1.4) * _taper(np.clip(level, 0, None), rv_end) + 1e-3
    rv, rv_edge = _radial_shape(rows, cols, (cy + rv_dist * np.sin(rv_angle) * 0.6, cx + rv_dist * np.cos(rv_angle)),
                                rv_radius, rng.uniform(1.2, 1.8), rv_angle + np.pi / 2, rng, 0.2)
    septum = ndimage.binary_dilation(myo_outer, structure=_in_plane(), iterations=int(rng.integers(1, 3)))
    label[(rv < rv_edge) & ~septum & in_heart] = 1
    label[myo_outer] = 2
    label[(lv < lv_edge) & in_heart & (level <= 1.0)] = 3
    # Outflow tract above the base: a blood-bright disc that is not labeled.
    aorta = (np.hypot(rows - (cy - r_lv * 0.3), cols - (cx + rng.uniform(-3, 3))) < rng.uniform(3.5, 5.5)) & (
        level < 0.0)
    image[aorta] = _TISSUE["blood"]

    # RV free wall (thin, dark, unlabeled), patchy epicardial fat, blood and myocardium intensities, papillary muscles.
    heart = label > 0
    rim = ndimage.binary_dilation(heart, structure=_in_plane()) & ~heart
    image[rim & ndimage.binary_dilation(label == 1, structure=_in_plane())] = _TISSUE["myo"]
    fat_rim = ndimage.binary_dilation(heart, structure=_in_plane(), iterations=int(rng.integers(2, 4))) & ~heart & ~rim
    image[fat_rim & (_smooth_noise(rng, (0.7, 2.0, 2.0)) > rng.uniform(-0.3, 0.5))] = _TISSUE["fat"]
    blood = _TISSUE["myo"] + contrast * (_TISSUE["blood"] - _TISSUE["myo"])
    image[label == 2] = _TISSUE["myo"]
    image[(label == 1) | (label == 3)] = blood
    for _ in range(int(rng.integers(0, 3))):  # papillary muscles: dark, mid-ventricular, labeled as cavity (ACDC)
        a = angle + rng.uniform(0, 2 * np.pi)
        spot = (np.hypot(rows - cy - 0.5 * cavity_radius * np.sin(a), cols - cx - 0.5 * cavity_radius * np.cos(a))
                < rng.uniform(1, 1.8)) & (np.abs(level - 0.5) < 0.3)
        image[spot & (label == 3)] = _TISSUE["myo"] * 1.2

    # Breath-hold misalignment: some slices shifted in plane, image and label together.
    for k in np.flatnonzero(rng.random(n_z) < 0.3):
        shift = tuple(int(s) for s in rng.integers(-2, 3, size=2))
        image[k] = np.roll(image[k], shift, axis=(0, 1))
        label[k] = np.roll(label[k], shift, axis=(0, 1))

    # Acquisition (per slice in plane, as a 2D cine sequence is acquired): texture, blur, bias field, ghosting along
    # the phase-encoding axis, contrast curve, Rician noise; each slice its own intensity scale.
    image = image * (1 + 0.06 * _smooth_noise(rng, (0.5, 1.5, 1.5)))
    image = ndimage.gaussian_filter(image, (0, blur / STEP, blur / STEP))
    image = image * np.exp(bias_strength * _smooth_noise(rng, (3.0, 10.0, 10.0)))
    if ghost > 0:
        image = image + ghost * np.roll(image, int(rng.integers(IN_PLANE // 4, IN_PLANE // 2)), axis=1)
    image = np.clip(image, 0, None) ** rng.uniform(*gamma_range)
    sigma = rng.uniform(*noise_range)
    image = np.hypot(image + sigma * rng.standard_normal(SHAPE), sigma * rng.standard_normal(SHAPE))
    image = image * rng.uniform(0.9, 1.1, size=(n_z, 1, 1))
    image = image / np.percentile(image, 99.5) * rng.uniform(0.75, 0.95)
    return np.clip(np.rint(255 * image), 0, 255).astype(np.int16), label, scanner, spacing


def _in_plane() -> np.ndarray:
    """4-connectivity within a slice: the structuring element of in-plane dilations (slices are 8 mm apart)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure
