"""Per-epoch SSL diagnostics: a json series and a figure beside nnU-Net's progress.png."""

from __future__ import annotations

import math
import os

from nnssl.io import atomic_write_json


def save_ssl_progress(log: dict[str, list[float]], path: str | os.PathLike) -> None:
    atomic_write_json(path, {k: [None if math.isnan(v) else v for v in vals] for k, vals in log.items()})


def plot_ssl_progress(log: dict[str, list[float]], path: str | os.PathLike) -> None:
    """One panel per quantity (unsupervised loss, its weight, confidence, agreement...), x = epoch."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    keys = sorted(log)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot(range(len(log[key])), log[key], marker="o", markersize=2)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
