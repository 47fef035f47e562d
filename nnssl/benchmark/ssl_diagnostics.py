"""What an SSL row did during training, next to what it scored: the trainers' own per-epoch diagnostics
(``ssl_progress.json``, :mod:`nnssl.training.ssl_log`) summarised per trainer, so that a row that does not beat
labeled-only can be read (pseudo-labels that never improve, a weight that never acts, two networks that agree on
everything). Every value is the mean over the last quarter of the epochs of a run, then over seeds; the pseudo-label
Dice is against the withheld labels of the unlabeled cases (a diagnostic only: they never reach training)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# (logged key, column title); the keys every SSL trainer logs under one name (README "Diagnostics")
COLUMNS = (("pseudo_label_dice", "pseudo-label Dice"), ("pseudo_label_confidence", "confidence"),
           ("fraction_above_threshold", "above threshold"), ("agreement", "agreement"),
           ("unsupervised_weight", "w"), ("loss_unsupervised", "L_unsup"), ("weighted_unsupervised", "w·L_unsup"),
           ("loss_supervised", "L_sup"))


def read_ssl_progress(fold_dir: str | os.PathLike) -> dict[str, list[float | None]] | None:
    """The fold's ``ssl_progress.json`` (per-epoch means of the logged keys); None when the trainer logs none."""
    path = Path(fold_dir) / "ssl_progress.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def quarter_mean(values: Sequence[float | None], first: bool = False) -> float:
    """Mean of the finite values in the last (``first``: the first) quarter of the epochs, at least one epoch."""
    n = max(1, math.ceil(len(values) / 4))
    part = values[:n] if first else values[-n:]
    finite = [float(v) for v in part if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def run_summary(progress: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """Last-quarter means of :data:`COLUMNS` (``weighted_unsupervised`` = w · L_unsup epoch by epoch) and the
    first-quarter pseudo-label Dice (``pseudo_label_dice_start``), for one run."""
    series = dict(progress)
    if "unsupervised_weight" in series and "loss_unsupervised" in series:
        series["weighted_unsupervised"] = [None if w is None or u is None else w * u for w, u in
                                           zip(series["unsupervised_weight"], series["loss_unsupervised"])]
    summary = {key: quarter_mean(series[key]) for key, _ in COLUMNS if key in series}
    if "pseudo_label_dice" in series:
        summary["pseudo_label_dice_start"] = quarter_mean(series["pseudo_label_dice"], first=True)
    return summary


def trainer_summaries(runs: Sequence[tuple[str, Mapping[str, Sequence[float | None]] | None]]
                      ) -> dict[str, dict[str, float]]:
    """Per trainer, the mean over its runs (seeds) of :func:`run_summary`; trainers without diagnostics left out."""
    per_trainer: dict[str, list[dict[str, float]]] = {}
    for trainer, progress in runs:
        if progress:
            per_trainer.setdefault(trainer, []).append(run_summary(progress))
    out = {}
    for trainer, summaries in per_trainer.items():
        keys = dict.fromkeys(k for s in summaries for k in s)
        out[trainer] = {k: float(np.nanmean([s.get(k, math.nan) for s in summaries]))
                        if any(math.isfinite(s.get(k, math.nan)) for s in summaries) else math.nan for k in keys}
    return out


def diagnostics_markdown(summaries: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of :func:`trainer_summaries` (empty string without any)."""
    if not summaries:
        return ""

    def cell(value: float | None) -> str:
        return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"

    lines = ["| trainer | pseudo-label Dice (first → last quarter) | "
             + " | ".join(title for key, title in COLUMNS[1:]) + " |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for trainer, s in summaries.items():
        start, end = s.get("pseudo_label_dice_start"), s.get("pseudo_label_dice")
        dice = f"{cell(start)} → {cell(end)}" if end is not None and math.isfinite(end) else "—"
        lines.append(f"| {trainer} | {dice} | " + " | ".join(cell(s.get(key)) for key, _ in COLUMNS[1:]) + " |")
    return "\n".join(lines)
