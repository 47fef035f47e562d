"""Ramp-up schedules for the weight of unsupervised loss terms (docs/methods/README.md, "Ramp-up").

All reference repositories (SSL4MIS, GuidedNet, MGCC, DHC) use the same sigmoid-shaped ramp of Laine & Aila
(arXiv 1610.02242). They differ only in the unit of time: SSL4MIS/GuidedNet/MGCC use ``iteration // 150``
with a length of 200 (full weight after 30 000 iterations); DHC uses the epoch with length = max_epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RampUnit = Literal["iteration", "epoch"]
RampShape = Literal["sigmoid", "linear"]


def _check_length(rampup_length: float) -> None:
    if not math.isfinite(rampup_length) or rampup_length < 0:
        raise ValueError(f"rampup_length must be a finite number >= 0, got {rampup_length!r}")


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Sigmoid-shaped ramp ``r(t) = exp(-5 (1 - clip(t, 0, L)/L)^2)``, ``r = 1`` when ``L == 0`` (Laine & Aila;
    docs/methods/README.md).

    ``r(0) = e^-5 ≈ 0.006738`` and ``r(t) = 1`` for ``t >= L``.
    """
    _check_length(rampup_length)
    if rampup_length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(rampup_length))
    phase = 1.0 - t / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(current: float, rampup_length: float) -> float:
    """Linear ramp ``r(t) = clip(t, 0, L) / L``, ``r = 1`` when ``L == 0`` (SSL4MIS ``linear_rampup``)."""
    _check_length(rampup_length)
    if rampup_length == 0:
        return 1.0
    return min(max(float(current), 0.0), float(rampup_length)) / rampup_length


@dataclass(frozen=True)
class ConsistencyWeight:
    """``λ(t) = max_weight · ramp(t, rampup_length)`` with ``t`` in iterations (``iteration // iter_divisor``)
    or epochs.

    Examples: SSL4MIS Mean Teacher / CPS and GuidedNet: ``ConsistencyWeight(0.1, 200, "iteration")``;
    DHC: ``ConsistencyWeight(0.1, max_epoch, "epoch", delay=1)`` (its weight is recomputed at the end of each
    epoch, so epoch ``e`` trains with ``r(e - 1)``); MGCC: ``ConsistencyWeight(7.0, 200, "iteration")``. ``delay``
    shifts the ramp: ``t -> max(t - delay, 0)``.
    """

    max_weight: float
    rampup_length: float
    unit: RampUnit = "iteration"
    iter_divisor: int = 150
    shape: RampShape = "sigmoid"
    delay: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_weight):
            raise ValueError(f"ConsistencyWeight.max_weight must be finite, got {self.max_weight!r}")
        _check_length(self.rampup_length)
        if self.unit not in ("iteration", "epoch"):
            raise ValueError(f"ConsistencyWeight.unit must be 'iteration' or 'epoch', got {self.unit!r}")
        if self.shape not in ("sigmoid", "linear"):
            raise ValueError(f"ConsistencyWeight.shape must be 'sigmoid' or 'linear', got {self.shape!r}")
        if int(self.iter_divisor) != self.iter_divisor or self.iter_divisor < 1:
            raise ValueError(f"ConsistencyWeight.iter_divisor must be an integer >= 1, got {self.iter_divisor!r}")
        if int(self.delay) != self.delay or self.delay < 0:
            raise ValueError(f"ConsistencyWeight.delay must be an integer >= 0, got {self.delay!r}")

    def ramp_time(self, iteration: int, epoch: int) -> float:
        """The ``t`` fed to the ramp: ``iteration // iter_divisor`` (integer division, as SSL4MIS) or ``epoch``,
        minus ``delay`` (never below 0)."""
        t = int(iteration) // int(self.iter_divisor) if self.unit == "iteration" else int(epoch)
        return float(max(t - int(self.delay), 0))

    def __call__(self, iteration: int, epoch: int) -> float:
        ramp = sigmoid_rampup if self.shape == "sigmoid" else linear_rampup
        return self.max_weight * ramp(self.ramp_time(iteration, epoch), self.rampup_length)
