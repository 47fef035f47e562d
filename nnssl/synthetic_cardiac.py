"""A 2D cardiac-MRI-like case (short-axis cine slice, ACDC labels): the most common SSL benchmark setting.

Labels as ACDC: 1 right-ventricle cavity, 2 left-ventricle myocardium, 3 left-ventricle cavity; three nested or
adjacent structures of very different size (the myocardium is a thin ring, the RV a crescent).

What makes it hard enough that labels are worth having and unlabeled images can help:

- **anatomy varies**: heart position, size, rotation, LV eccentricity, wall thickness, RV crescent extent and
  papillary muscles (dark spots in the LV cavity that belong to the cavity label, as in ACDC);
- **distractors**: the aorta/pulmonary trunk and the liver have blood- and tissue-like intensities next to the heart,
  so intensity alone does not segment it;
- **scanner-like domain shift**: every case is drawn from one of ``N_SCANNERS`` acquisition styles (contrast curve,
  blood/myocardium contrast, noise level, bias-field strength, blur, ghosting), so a handful of labeled cases does
  not cover the intensity distribution that the unlabeled cases show. ``make_case(rng, scanner=0)`` forces one
  style: the benchmark's labeled cases come from one site, the unlabeled and test cases from all three, the
  common situation in which unlabeled images are worth the most.

Drawn in pixel units on a ``SHAPE`` grid (PNG, spacing 1 as nnU-Net's NaturalImage2DIO reads it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE = (64, 64)
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
N_SCANNERS = 3
# tissue intensities before the scanner's contrast curve: (blood, myocardium, fat, lung, liver, chest wall)
_TISSUE = {"blood": 0.85, "myo": 0.3, "fat": 0.75, "lung": 0.05, "liver": 0.45, "wall": 0.4}
# per scanner: (gamma range, blood-myocardium contrast scale, noise sigma range, bias strength, blur sigma, ghost)
_SCANNERS = (
    ((0.8, 1.1), 1.0, (0.02, 0.05), 0.15, 0.5, 0.00),
    ((1.2, 1.7), 0.65, (0.05, 0.09), 0.35, 0.8, 0.12),
    ((0.5, 0.75), 0.8, (0.03, 0.07), 0.25, 1.1, 0.06),
)


def _radial_shape(rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float], radius: float, aspect: float,
                  angle: float, rng: np.random.Generator, roughness: float) -> tuple[np.ndarray, np.ndarray]:
    """(normalised radius, boundary radius) of a rotated ellipse whose boundary is perturbed by low Fourier modes."""
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += roughness / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) / radius, boundary


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), sigma)
    return field / (field.std() + 1e-8)


def make_case(rng: np.random.Generator, scanner: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One short-axis slice: ``(image uint8, label uint8 in 0..3, scanner index)``.

    ``scanner`` forces the acquisition style (``None``: drawn at random). The draw is made either way, so a forced
    case has the same anatomy as the unforced case of the same ``rng``.
    """
    rows, cols = np.indices(SHAPE, dtype=np.float64)
    h, w = SHAPE
    drawn = int(rng.integers(N_SCANNERS))
    if scanner is not None and not 0 <= scanner < N_SCANNERS:
        raise ValueError(f"scanner must be in 0..{N_SCANNERS - 1}, got {scanner}")
    scanner = drawn if scanner is None else scanner
    gamma_range, contrast, noise_range, bias_strength, blur, ghost = _SCANNERS[scanner]

    # Body and lungs: an elliptical thorax with two dark lungs, the heart between them.
    body, _ = _radial_shape(rows, cols, (h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)),
                            rng.uniform(27, 31), rng.uniform(0.75, 0.9), 0.0, rng, 0.1)
    image = np.zeros(SHAPE)
    image[body < 1] = _TISSUE["wall"]
    cy, cx = h / 2 + rng.uniform(-5, 5), w / 2 + rng.uniform(-5, 5)
    for side in (-1, 1):
        lung, edge = _radial_shape(rows, cols, (cy - 2 + rng.uniform(-3, 3), cx + side * rng.uniform(17, 21)),
                                   rng.uniform(9, 12), rng.uniform(1.3, 1.7), rng.uniform(-0.3, 0.3), rng, 0.3)
        image[(lung < edge) & (body < 0.92)] = _TISSUE["lung"]
    liver, edge = _radial_shape(rows, cols, (cy + rng.uniform(14, 18), cx - rng.uniform(6, 12)), rng.uniform(9, 13),
                                rng.uniform(0.6, 0.9), rng.uniform(-0.5, 0.5), rng, 0.2)
    image[(liver < edge) & (body < 0.95)] = _TISSUE["liver"]
    mediastinum, edge = _radial_shape(rows, cols, (cy, cx), rng.uniform(15, 18), rng.uniform(0.8, 1.0), 0.0, rng,
                                      0.3)
    image[mediastinum < edge] = _TISSUE["wall"]

    # Heart: LV cavity, myocardial ring around it, RV crescent on the septal side.
    angle = rng.uniform(-0.5, 0.5)
    r_lv = rng.uniform(5.0, 9.5)
    lv, lv_edge = _radial_shape(rows, cols, (cy, cx), r_lv, rng.uniform(0.8, 1.0), angle, rng, 0.12)
    thickness = rng.uniform(2.2, 4.5) / r_lv
    label = np.zeros(SHAPE, dtype=np.uint8)
    myo_outer = lv < lv_edge * (1 + thickness)
    rv_angle = np.pi + rng.uniform(-0.45, 0.45)  # image left = patient right
    rv_dist = r_lv * (1 + thickness) + rng.uniform(1.5, 4.0)
    rv, rv_edge = _radial_shape(rows, cols, (cy + rv_dist * np.sin(rv_angle) * 0.6, cx + rv_dist * np.cos(rv_angle)),
                                r_lv * rng.uniform(1.0, 1.5), rng.uniform(1.2, 1.8), rv_angle + np.pi / 2, rng, 0.2)
    septum = ndimage.binary_dilation(myo_outer, iterations=int(rng.integers(1, 3)))
    label[(rv < rv_edge) & ~septum] = 1
    label[myo_outer] = 2
    label[lv < lv_edge] = 3
    # Outflow tract / aorta: a blood-bright disc near the heart that is not labeled.
    aorta = np.hypot(rows - (cy - r_lv - rng.uniform(6, 10)), cols - (cx + rng.uniform(-4, 6))) < rng.uniform(2.5, 4)
    image[aorta & (label == 0)] = _TISSUE["blood"]

    # RV free wall (thin, myocardium-dark, not labeled) and patchy epicardial fat (bright) around the heart
    heart = label > 0
    rim = ndimage.binary_dilation(heart, iterations=1) & ~heart
    image[rim & ndimage.binary_dilation(label == 1, iterations=1)] = _TISSUE["myo"]
    fat_rim = ndimage.binary_dilation(heart, iterations=int(rng.integers(2, 4))) & ~heart & ~rim
    image[fat_rim & (_smooth_noise(rng, 2.0) > rng.uniform(-0.3, 0.5))] = _TISSUE["fat"]
    blood = _TISSUE["myo"] + contrast * (_TISSUE["blood"] - _TISSUE["myo"])
    image[label == 2] = _TISSUE["myo"]
    image[(label == 1) | (label == 3)] = blood
    # Papillary muscles: dark spots inside the LV cavity, labeled as cavity (ACDC's convention).
    for _ in range(int(rng.integers(0, 3))):
        a = angle + rng.uniform(0, 2 * np.pi)
        spot = np.hypot(rows - cy - 0.6 * r_lv * np.sin(a), cols - cx - 0.6 * r_lv * np.cos(a)) < rng.uniform(1, 1.8)
        image[spot & (label == 3)] = _TISSUE["myo"] * 1.2

    # Acquisition: texture, blur, bias field, ghosting along the phase-encoding axis, contrast curve, Rician noise.
    image = image * (1 + 0.06 * _smooth_noise(rng, 1.5))
    image = ndimage.gaussian_filter(image, blur)
    image = image * np.exp(bias_strength * _smooth_noise(rng, 12.0))
    if ghost > 0:
        image = image + ghost * np.roll(image, int(rng.integers(h // 4, h // 2)), axis=0)
    image = np.clip(image, 0, None) ** rng.uniform(*gamma_range)
    sigma = rng.uniform(*noise_range)
    image = np.hypot(image + sigma * rng.standard_normal(SHAPE), sigma * rng.standard_normal(SHAPE))
    image = image / np.percentile(image, 99.5) * rng.uniform(0.75, 0.95)
    return np.clip(np.rint(255 * image), 0, 255).astype(np.uint8), label, scanner
