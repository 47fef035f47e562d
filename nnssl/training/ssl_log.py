"""The per-epoch SSL log: the epoch means of the scalars a ``train_step`` returns, kept like nnU-Net's
``nnUNetLogger`` (``log(key, value, epoch)``, ``get_checkpoint`` / ``load_checkpoint``), saved as
``ssl_progress.json`` and drawn as ``ssl_progress.png`` next to nnU-Net's ``progress.png``."""

from __future__ import annotations

import os

import numpy as np
from torch import distributed as dist

from nnssl.diagnostics import plot_ssl_progress, save_ssl_progress


class SSLLogger:
    def __init__(self) -> None:
        self.series: dict[str, list[float]] = {}

    def log(self, key: str, value: float, epoch: int) -> None:
        series = self.series.setdefault(key, [])
        series.extend([float("nan")] * (epoch - len(series)))
        series[epoch:] = [float(value)]

    def log_epoch(self, values: dict[str, float], epoch: int) -> None:
        for key, value in values.items():
            self.log(key, value, epoch)

    @staticmethod
    def epoch_means(train_outputs: list[dict], ddp: bool) -> dict[str, float]:
        """NaN-ignoring epoch mean of every key but ``loss`` (nnU-Net logs that), averaged over ranks under DDP."""
        values = {}
        for key in sorted({k for out in train_outputs for k in out if k != "loss"}):
            vals = [float(out[key]) for out in train_outputs if key in out]
            value = float(np.nanmean(vals)) if vals else float("nan")
            if ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            values[key] = value
        return values

    def save(self, folder: str | os.PathLike) -> None:
        if self.series:
            save_ssl_progress(self.series, os.path.join(folder, "ssl_progress.json"))
            plot_ssl_progress(self.series, os.path.join(folder, "ssl_progress.png"))

    def get_checkpoint(self) -> dict[str, list[float]]:
        return self.series

    def load_checkpoint(self, series: dict[str, list[float]]) -> None:
        self.series = {k: list(v) for k, v in series.items()}
