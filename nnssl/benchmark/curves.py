"""Learning curves of benchmark rows, and the convergence check of a preset's schedule.

A curve is nnU-Net's own per-epoch validation Dice, read from the ``logging`` dict of a fold's checkpoint:
``mean_fg_dice`` (Dice over the epoch's validation patches, foreground classes averaged) and ``ema_fg_dice`` (its
exponential moving average, weight 0.9 on the past, which nnU-Net also uses to pick ``checkpoint_best``). On the
synthetic presets fold 0 validates on the ``val`` cases (imagesVal), which are neither training nor test cases,
so a schedule is chosen without looking at the test set.

A preset's schedule is long enough when the fully supervised reference has plateaued and labeled-only is clearly
below it. With E epochs, w = max(2, ceil(E / 8)) and ``mean_w(d, at)`` the mean per-epoch Dice of the w epochs
ending at epoch ``at``:

    plateau = |mean_w(full, E) - mean_w(full, ceil(3E/4))|  < PLATEAU_TOLERANCE   (the change over the last quarter)
    gap     = mean_w(full, E) - mean_w(labeled_only, E)     >= MIN_GAP

Windowed means of the per-epoch values rather than nnU-Net's EMA: the EMA lags ~10 epochs behind, so on a short
schedule it is still rising when the network has long converged, and a window of w epochs averages the
epoch-to-epoch noise of a small validation set just as well.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PLATEAU_TOLERANCE = 0.01  # 1 Dice point
MIN_GAP = 0.08  # 8 Dice points between the two references, so that there is something to close
CURVE_KEYS = ("mean_fg_dice", "ema_fg_dice")


def read_curve(fold_dir: str | os.PathLike) -> dict[str, list[float]] | None:
    """``{mean_fg_dice, ema_fg_dice}`` per epoch from the fold's final (else latest) checkpoint; None without one."""
    import torch

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = Path(fold_dir) / name
        if path.is_file():
            logging = torch.load(path, map_location="cpu", weights_only=False).get("logging", {})
            return {k: [float(v) for v in logging.get(k, [])] for k in CURVE_KEYS}
    return None


def window(n_epochs: int) -> int:
    """The number of epochs averaged at each end of the last quarter: max(2, ceil(E / 8))."""
    return max(2, math.ceil(n_epochs / 8))


def final_value(values: Sequence[float]) -> float:
    """Mean of the last ``window(E)`` per-epoch values."""
    return float(np.mean(values[-window(len(values)):])) if len(values) else math.nan


def last_quarter_change(values: Sequence[float]) -> float:
    """``|mean_w(E) - mean_w(ceil(3E/4))|``: how much the curve moved over the last quarter of the epochs."""
    n = len(values)
    w = window(n)
    quarter = math.ceil(0.75 * n)
    if n < 2 or quarter < w:
        return math.nan
    return abs(final_value(values) - float(np.mean(values[quarter - w:quarter])))


def convergence_check(labeled_only: Mapping[str, Sequence[float]] | None,
                      full: Mapping[str, Sequence[float]] | None) -> dict[str, float | bool | None]:
    """The two criteria of the module docstring on the per-epoch curves (None where a curve is missing)."""
    if not labeled_only or not full or not labeled_only.get("mean_fg_dice") or not full.get("mean_fg_dice"):
        return {"full_last_quarter_change": None, "final_gap": None, "plateaued": None, "gap_large_enough": None}
    change = last_quarter_change(full["mean_fg_dice"])
    gap = final_value(full["mean_fg_dice"]) - final_value(labeled_only["mean_fg_dice"])
    return {"full_last_quarter_change": change, "final_gap": gap, "plateaued": bool(change < PLATEAU_TOLERANCE),
            "gap_large_enough": bool(gap >= MIN_GAP), "window": window(len(full["mean_fg_dice"]))}


def convergence_text(check: Mapping[str, float | bool | None]) -> str:
    """One line for benchmark.md."""
    if check.get("final_gap") is None:
        return "convergence: n/a (needs both references trained on a fold that validates, e.g. fold 0 with 'val')"
    return (f"convergence (validation Dice, mean of the last {check.get('window', 'w')} epochs): the fully supervised "
            f"reference moved "
            f"{check['full_last_quarter_change']:.3f} over the last quarter of the schedule "
            f"({'plateaued' if check['plateaued'] else 'NOT plateaued'}: < {PLATEAU_TOLERANCE}); it ends "
            f"{check['final_gap']:+.3f} above labeled-only ({'enough' if check['gap_large_enough'] else 'LESS than'} "
            f"the {MIN_GAP} needed)")


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], iterations_per_epoch: int,
                path: str | os.PathLike, title: str) -> None:
    """Validation Dice (thin: per epoch, thick: trailing mean over ``window(E)`` epochs, the quantity the convergence
    check compares; not nnU-Net's lagging EMA) against training iterations, one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, curve) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        values = np.asarray(curve["mean_fg_dice"], dtype=float)
        x = (np.arange(len(values)) + 1) * iterations_per_epoch
        w = window(len(values))
        smooth = np.array([values[max(0, i - w + 1):i + 1].mean() for i in range(len(values))])
        ax.plot(x, values, color=colour, alpha=0.3, linewidth=0.8)
        ax.plot(x, smooth, color=colour, linewidth=2, label=label)
    ax.set_xlabel("training iterations")
    ax.set_ylabel("validation Dice (foreground mean)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
