"""Per-class weights of class-rebalancing CPS: CReST's reverse-rank weights and SimiS's frequency-gap weights, as
DHC's method zoo grafts them on its CPS base (``xmed-lab/DHC code/train_crest.py``, ``code/train_simis.py``;
docs/methods/crest.md, docs/methods/simis.md).

Both keep one weight vector per network (A and B), computed from the class histogram ``n`` of that network's own
hard prediction, and move it by an EMA with momentum ``m`` (0.99)::

    w ← m · w + (1 − m) · rule(n)

- CReST (Wei et al., CVPR 2021, Eq. 1; DHC ``CReST._weight_wbg``): ``μ_k = ((n_k + 1e-8) / (n_max + 1e-8))^(1/3)``
  and the class of the ``l``-th largest ``μ`` gets the ``l``-th smallest ``μ`` (reverse rank; ties keep class
  order, a stable sort as Python's ``sorted(..., reverse=True)``). Counts from the unlabeled half; the initial
  weights are ``rule(n_labeled)``.
- SimiS (Chen et al., "An Embarrassingly Simple Baseline for Imbalanced Semi-Supervised Learning", 2022; DHC
  ``SimiS._weight_wbg``): ``P_k = (n_k + 1e-8) / (Σ n + 1e-8)``, ``rule(n) = K · (max P − P)``. Counts from the
  whole batch; the initial weights are ``m · K + (1 − m) · rule(n_labeled)``. The most frequent class gets 0 from
  every step, so its weight decays as ``m^t`` (exactly 0 in float32 after some 9 000 iterations): the weighted
  CE is then 0/0 on an all-background pseudo-label, which :func:`nnssl.losses.cps.weighted_cross_entropy` returns
  as 0 (DHC: NaN).

The loss both use is :func:`nnssl.losses.cps.cross_pseudo_supervision_loss` with ``w_A`` for network A's term and
``w_B`` for B's, a weighted mean ``Σ w[ŷ] ce / Σ w[ŷ]`` (``nn.CrossEntropyLoss(weight=w)``, DHC ``wce``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from nnssl.losses.cps import hard_pseudo_label

_EPS = 1e-8


def _counts(class_counts: Tensor) -> Tensor:
    counts = torch.as_tensor(class_counts).detach().double()
    if counts.ndim != 1 or counts.numel() < 2 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"class_counts must be a finite, non-negative 1-D vector of K >= 2 counts, got "
                         f"{counts.tolist() if counts.ndim <= 1 else tuple(counts.shape)}")
    return counts


def crest_weights(class_counts: Tensor, alpha: float = 1 / 3) -> Tensor:
    """CReST's reverse-rank weights (module doc): ``w[order[l]] = μ[order[K−1−l]]``, ``order`` = classes by
    descending ``μ = ((n + 1e-8)/(n_max + 1e-8))^α`` (stable). Values in (0, 1]; float32 ``(K,)``."""
    return _crest(_counts(class_counts), alpha)


def _crest(counts: Tensor, alpha: float = 1 / 3) -> Tensor:
    mu = ((counts + _EPS) / (counts.max() + _EPS)) ** alpha
    order = torch.sort(mu, descending=True, stable=True).indices
    weights = torch.empty_like(mu)
    weights[order] = mu[order.flip(0)]
    return weights.float()


def simis_weights(class_counts: Tensor) -> Tensor:
    """SimiS's frequency-gap weights ``K · (max P − P)``, ``P = (n + 1e-8)/(Σ n + 1e-8)`` (module doc); the most
    frequent class gets 0. Float32 ``(K,)``."""
    return _simis(_counts(class_counts))


def _simis(counts: Tensor) -> Tensor:
    share = (counts + _EPS) / (counts.sum() + _EPS)
    return (counts.numel() * (share.max() - share)).float()


class _PairedClassWeights:
    """``(w_A, w_B)``, each an EMA of ``batch_rule`` of its own network's hard prediction (module doc); registered
    trainer state (``state_dict`` / ``load_state_dict``). ``initialise`` sets both from the labeled histogram."""

    def __init__(self, num_classes: int, momentum: float = 0.99):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"{type(self).__name__} num_classes must be an integer >= 2, got {num_classes!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__} momentum must be in [0, 1], got {momentum!r}")
        self.num_classes, self.momentum = int(num_classes), float(momentum)
        self.weights: Tensor | None = None  # (2, K): row 0 network A, row 1 network B

    def batch_rule(self, counts: Tensor) -> Tensor:
        """The weights of one histogram ``(K,)`` (float64, on any device; unchecked)."""
        raise NotImplementedError

    def initial_weights(self, labeled_counts: Tensor) -> Tensor:
        return self.batch_rule(_counts(labeled_counts))

    @property
    def initialised(self) -> bool:
        return self.weights is not None

    def initialise(self, labeled_counts: Tensor) -> None:
        if _counts(labeled_counts).numel() != self.num_classes:
            raise ValueError(f"labeled_counts must have {self.num_classes} entries, got {len(labeled_counts)}")
        self.weights = self.initial_weights(labeled_counts).repeat(2, 1)

    def update(self, logits_a: Tensor, logits_b: Tensor) -> tuple[Tensor, Tensor]:
        """One EMA step of each network's weights from the histogram of its own ``argmax`` (the rows the method
        counts: CReST the unlabeled half, SimiS the whole batch); returns ``(w_A, w_B)`` on the logits' device."""
        if self.weights is None:
            raise RuntimeError(f"{type(self).__name__}.update before initialise(labeled class counts)")
        current = []
        for logits in (logits_a, logits_b):
            if logits.shape[1] != self.num_classes:
                raise ValueError(f"logits must have {self.num_classes} classes, got shape {tuple(logits.shape)}")
            # argmax is always in [0, K): bincount on the device, no host synchronisation
            counts = torch.bincount(hard_pseudo_label(logits).reshape(-1), minlength=self.num_classes)
            current.append(self.batch_rule(counts.double()))
        self.weights = self.momentum * self.weights.to(logits_a.device) + (1.0 - self.momentum) * torch.stack(current)
        return self.weights[0], self.weights[1]

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        if weights is not None and tuple(weights.shape) != (2, self.num_classes):
            raise ValueError(f"{type(self).__name__}: saved weights have shape {tuple(weights.shape)}, expected "
                             f"(2, {self.num_classes})")
        self.weights = None if weights is None else torch.as_tensor(weights).float().clone()


class CReSTWeights(_PairedClassWeights):
    """CReST's reverse-rank weights of networks A and B (:func:`crest_weights`, module doc)."""

    def batch_rule(self, counts: Tensor) -> Tensor:
        return _crest(counts)


class SimiSWeights(_PairedClassWeights):
    """SimiS's frequency-gap weights of networks A and B (:func:`simis_weights`); start ``m·K + (1−m)·rule``."""

    def batch_rule(self, counts: Tensor) -> Tensor:
        return _simis(counts)

    def initial_weights(self, labeled_counts: Tensor) -> Tensor:
        return self.momentum * self.num_classes + (1.0 - self.momentum) * simis_weights(labeled_counts)
