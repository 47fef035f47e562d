"""Learning curves and the convergence check of the benchmark presets (nnssl.benchmark.curves)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnssl.benchmark.curves import (
    MIN_GAP,
    PLATEAU_TOLERANCE,
    convergence_check,
    convergence_text,
    last_quarter_change,
    plot_curves,
    read_curve,
)


def _curve(ema):
    return {"mean_fg_dice": list(ema), "ema_fg_dice": list(ema)}


def test_last_quarter_change_compares_windowed_means():
    # 8 epochs, window 2: mean of epochs 7-8 against the mean of epochs 5-6 (ending where the last quarter starts)
    rising_then_flat = [0.1, 0.3, 0.5, 0.7, 0.80, 0.85, 0.86, 0.864]
    assert last_quarter_change(rising_then_flat) == pytest.approx((0.86 + 0.864) / 2 - (0.80 + 0.85) / 2)
    assert last_quarter_change([0.5, 0.5, 0.5, 0.5]) == 0
    assert math.isnan(last_quarter_change([0.5]))
    # noise around a plateau averages out; a steady rise does not
    noisy_plateau = [0.2, 0.5, 0.7] + [0.88, 0.9] * 8
    assert last_quarter_change(noisy_plateau) < 0.01
    assert last_quarter_change(list(np.linspace(0.2, 0.9, 20))) > 0.1


def test_convergence_needs_a_plateau_and_a_gap():
    full = _curve([0.2, 0.6, 0.85, 0.88, 0.885, 0.884, 0.886, 0.885])
    check = convergence_check(_curve([0.1, 0.4, 0.6, 0.62, 0.63, 0.63, 0.62, 0.63]), full)
    assert check["plateaued"] and check["gap_large_enough"]
    assert check["final_gap"] == pytest.approx((0.886 + 0.885) / 2 - (0.62 + 0.63) / 2)
    still_rising = convergence_check(_curve([0.1] * 5), _curve([0.2, 0.4, 0.6, 0.7, 0.8]))
    assert still_rising["plateaued"] is False and still_rising["full_last_quarter_change"] > PLATEAU_TOLERANCE
    no_gap = convergence_check(_curve([0.8] * 4), _curve([0.85] * 4))
    assert no_gap["gap_large_enough"] is False and no_gap["final_gap"] < MIN_GAP
    assert "NOT plateaued" in convergence_text(still_rising) and "LESS than" in convergence_text(no_gap)
    assert convergence_check(None, full)["plateaued"] is None
    assert "n/a" in convergence_text(convergence_check(None, full))


def test_curve_is_read_from_nnunet_checkpoint_logging_and_plotted(tmp_path):
    logging = {"mean_fg_dice": [0.1, 0.5], "ema_fg_dice": [0.1, 0.14], "train_losses": [1.0, 0.5]}
    torch.save({"logging": logging}, tmp_path / "checkpoint_latest.pth")
    assert read_curve(tmp_path) == {"mean_fg_dice": [0.1, 0.5], "ema_fg_dice": [0.1, 0.14]}
    assert read_curve(tmp_path / "missing") is None
    out = tmp_path / "curves.png"
    plot_curves({"labeled-only": read_curve(tmp_path), "full": _curve([0.3, 0.6])}, 50, out, "title")
    assert out.stat().st_size > 1000
