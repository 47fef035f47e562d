"""Per-epoch per-class weights (DHC DiffDW / DistDW, GuidedNet KT-CPS...): a json series and a figure beside
nnU-Net's progress.png.

A log is ``{weighting name: [[w_0, ..., w_{K-1}] for each epoch]}``; epochs without a value hold NaNs.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import torch

from nnssl.io import atomic_write_json

ClassWeightLog = dict[str, list[list[float]]]


def record_epoch(log: ClassWeightLog, name: str, epoch: int, weights: Sequence[float]) -> None:
    """Store ``weights`` as epoch ``epoch`` of series ``name``: later epochs (left over from before a resume)
    are dropped, missing earlier epochs are NaN-filled."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    series = log.setdefault(name, [])
    del series[epoch:]
    series.extend([[math.nan] * len(weights)] * (epoch - len(series)))
    series.append([float(w) for w in weights])


def save_class_weights(log: ClassWeightLog, class_names: Sequence[str], path: str | os.PathLike) -> None:
    atomic_write_json(path, {
        "class_names": list(class_names),
        "weights": {name: [[None if math.isnan(w) else w for w in epoch] for epoch in series]
                    for name, series in log.items()},
    })


def plot_class_weights(log: ClassWeightLog, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """One panel per weighting, one line per class, x = epoch."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    names = sorted(log)
    if not names:
        raise ValueError("plot_class_weights: the log is empty")
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes.flat, names):
        series = log[name]
        for k, class_name in enumerate(class_names):
            ax.plot(range(len(series)), [epoch[k] for epoch in series], marker="o", markersize=2,
                    label=f"{k} {class_name}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("class weight")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class EpochClassWeights:
    """The per-class weights of every step, summed on their device (no host copy per step), recorded as their epoch
    mean in a :data:`ClassWeightLog` and saved as ``<stem>.json`` / ``<stem>.png``."""

    def __init__(self) -> None:
        self.log: ClassWeightLog = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def start_epoch(self) -> None:
        self._sums, self._steps = {}, 0

    def add(self, weights: Mapping[str, torch.Tensor]) -> None:
        for name, value in weights.items():
            total = self._sums.get(name)
            self._sums[name] = value.detach().float() if total is None else total + value.detach()
        self._steps += 1

    def end_epoch(self, epoch: int) -> dict[str, list[float]]:
        """Record (and return) the epoch means; nothing when no step was added."""
        means = {name: (total / self._steps).cpu().tolist() for name, total in self._sums.items()} \
            if self._steps else {}
        for name, mean in means.items():
            record_epoch(self.log, name, epoch, mean)
        return means

    def save(self, folder: str | os.PathLike, stem: str, class_names: Sequence[str]) -> None:
        if self.log:
            save_class_weights(self.log, class_names, os.path.join(folder, f"{stem}.json"))
            plot_class_weights(self.log, class_names, os.path.join(folder, f"{stem}.png"))
