"""Per-epoch SSL diagnostics: the confidence statistics of pseudo-labels, a json series and a figure beside
nnU-Net's progress.png."""

from __future__ import annotations

import math
import os

import torch

from nnssl.io import atomic_write_json

# None of MT, CPS, DHC, GuidedNet, SDCL or MGCC thresholds its pseudo-labels (docs/methods/README.md), so the
# fraction of confident voxels is a diagnostic at the threshold FixMatch/UniMatch use (0.95) unless a trainer names its
# own.
DEFAULT_CONFIDENCE_THRESHOLD = 0.95


@torch.no_grad()
def pseudo_label_confidence_stats(logits: torch.Tensor, threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
                                  regions: bool = False) -> torch.Tensor:
    """``[mean_v c_v, mean_v 1[c_v >= τ]]`` with ``c_v = max_k softmax(z)_{k,v}`` the probability of the hard
    pseudo-label at voxel ``v`` (``regions``: ``c = max(σ(z), 1 - σ(z))`` per region channel, averaged over the
    channels as well).

    ``logits`` ``(N, K, *spatial)``; returns a float32 tensor of 2 elements on the logits' device, without a
    graph, so a trainer can stack it with its other logged scalars and copy them to the host once.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (N, K, *spatial), got shape {tuple(logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    z = logits.detach().float()
    if regions:
        p = torch.sigmoid(z)
        confidence = torch.maximum(p, 1 - p)
    else:
        confidence = torch.softmax(z, 1).amax(1)
    return torch.stack((confidence.mean(), (confidence >= threshold).float().mean()))


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
