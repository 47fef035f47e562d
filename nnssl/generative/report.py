"""The sanity report a user looks at after generating: is the model broken?

``report/real_vs_generated.png``: real training images (top row) over generated ones (bottom row), channel 0, both
at the configuration's preprocessing and in one intensity window (the real images' 1st..99th percentile).
``report/histograms.png``: the pooled intensity histograms. ``report/report.json`` and ``report.md``: per channel
the mean and standard deviation of the intensities, the Wasserstein-1 distance between the real and the generated
intensity distributions next to the same distance between two halves of the real images (what "as close as real
images are to each other" means), the mean per-image standard deviation (contrast, texture), and the image sizes.

Warnings (heuristics, in the report and printed): non-finite values; a histogram distance more than
``HISTOGRAM_RATIO`` times the real-vs-real one (and above 0.1 normalised units); generated images with less than
``FLAT_RATIO`` of the real images' per-image contrast (a collapsed model gives flat or identical images);
generated images that are near copies of each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnssl.io import atomic_write_json, atomic_write_text

HISTOGRAM_RATIO = 3.0
FLAT_RATIO = 0.25
GRID_COLUMNS = 8
_VALUES = 200_000


def _pooled(images: list[np.ndarray], channel: int, rng: np.random.Generator) -> np.ndarray:
    values = np.concatenate([im[channel].ravel() for im in images]).astype(np.float64)
    return rng.choice(values, _VALUES, replace=False) if values.size > _VALUES else values


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b))


def image_statistics(real: list[np.ndarray], generated: list[np.ndarray]) -> dict:
    """The numbers of the report (see the module docstring); ``warnings`` lists what looks broken."""
    rng = np.random.default_rng(0)
    channels, warnings = [], []
    finite = all(np.isfinite(g).all() for g in generated)
    if not finite:
        warnings.append("generated images contain NaN or infinite values")
    for c in range(real[0].shape[0]):
        r = _pooled(real, c, rng)
        g = _pooled(generated, c, rng) if finite else np.zeros(1)
        half = len(real) // 2
        baseline = wasserstein(_pooled(real[:half], c, rng), _pooled(real[half:], c, rng)) if half else 0.0
        distance = wasserstein(r, g)
        contrast_real = float(np.mean([im[c].std() for im in real]))
        contrast_gen = float(np.mean([im[c].std() for im in generated]))
        channels.append({"channel": c, "real_mean": float(r.mean()), "real_std": float(r.std()),
                         "generated_mean": float(g.mean()), "generated_std": float(g.std()),
                         "histogram_distance": distance, "histogram_distance_real_halves": baseline,
                         "per_image_std_real": contrast_real, "per_image_std_generated": contrast_gen})
        if distance > max(HISTOGRAM_RATIO * baseline, 0.1):
            warnings.append(f"channel {c}: intensity histogram distance {distance:.3f} is more than "
                            f"{HISTOGRAM_RATIO:g}x that between two halves of the real images ({baseline:.3f})")
        if contrast_gen < FLAT_RATIO * contrast_real:
            warnings.append(f"channel {c}: generated images are nearly flat (per-image std {contrast_gen:.3f} vs "
                            f"{contrast_real:.3f} of the real images)")
    if len(generated) > 1 and finite:
        flat = np.stack([g.ravel() for g in generated])
        spread = float(flat.std(axis=0).mean())
        if spread < 0.05 * max(channels[0]["real_std"], 1e-6):
            warnings.append(f"the generated images are near copies of each other (pixelwise std {spread:.4f})")
    return {"channels": channels, "warnings": warnings}


def _plot(real: list[np.ndarray], generated: list[np.ndarray], out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(np.concatenate([im[0].ravel() for im in real]), [1, 99])
    n = min(GRID_COLUMNS, len(real), len(generated))
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.4), squeeze=False)
    for row, (label, images) in enumerate((("real", real), ("generated", generated))):
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(np.nan_to_num(images[col][0]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label)
    fig.suptitle("real (top) vs generated (bottom), same intensity window")
    fig.tight_layout()
    grid = out / "real_vs_generated.png"
    fig.savefig(grid, dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(lo - (hi - lo) * 0.2, hi + (hi - lo) * 0.2, 80)
    for label, images in (("real", real), ("generated", generated)):
        ax.hist(np.nan_to_num(np.concatenate([im[0].ravel() for im in images])), bins=bins, density=True,
                histtype="step", label=label)
    ax.set_xlabel("normalised intensity (channel 0)")
    ax.legend()
    fig.tight_layout()
    hist = out / "histograms.png"
    fig.savefig(hist, dpi=80)
    plt.close(fig)
    return grid, hist


def write_report(real: list[np.ndarray], generated: list[np.ndarray], real_shapes: list[tuple[int, ...]],
                 out: Path, context: dict) -> dict:
    """Write the report into ``out``; returns its numbers (``warnings`` included)."""
    out.mkdir(parents=True, exist_ok=True)
    stats = image_statistics(real, generated)
    stats["sizes"] = {"real_median": [int(v) for v in np.median(np.array(real_shapes), axis=0)],
                      "real_min": [int(v) for v in np.min(real_shapes, axis=0)],
                      "real_max": [int(v) for v in np.max(real_shapes, axis=0)],
                      "generated": [int(v) for v in generated[0].shape[1:]]}
    stats.update({"n_real": len(real), "n_generated": len(generated), **context})
    grid, hist = _plot(real, generated, out)
    stats["figures"] = [grid.name, hist.name]
    atomic_write_json(out / "report.json", stats)
    lines = [f"# Generated vs real images: {context.get('model', '')}", "",
             f"{len(real)} real training images, {len(generated)} generated (normalised intensities).", "",
             "| channel | real mean ± std | generated mean ± std | histogram distance (W1) | real vs real W1 | "
             "per-image std real / generated |", "| --- | --- | --- | --- | --- | --- |"]
    for ch in stats["channels"]:
        lines.append(f"| {ch['channel']} | {ch['real_mean']:.3f} ± {ch['real_std']:.3f} | "
                     f"{ch['generated_mean']:.3f} ± {ch['generated_std']:.3f} | {ch['histogram_distance']:.3f} | "
                     f"{ch['histogram_distance_real_halves']:.3f} | {ch['per_image_std_real']:.3f} / "
                     f"{ch['per_image_std_generated']:.3f} |")
    sizes = stats["sizes"]
    lines += ["", f"Sizes: real median {sizes['real_median']} (min {sizes['real_min']}, max {sizes['real_max']}), "
              f"generated {sizes['generated']}.", "", f"![grid]({grid.name})", "", f"![histograms]({hist.name})", ""]
    lines += ["**Warnings:**", *[f"- {w}" for w in stats["warnings"]]] if stats["warnings"] else ["No warnings."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return stats
