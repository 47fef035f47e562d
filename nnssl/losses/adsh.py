"""Adsh, adaptive thresholding (L.-Z. Guo and Y.-F. Li, "Class-Imbalanced Semi-Supervised Learning with Adaptive
Thresholding", ICML 2022: per-class thresholds that keep, for every class, the same fraction of its most confident
predictions as the majority class keeps above a fixed threshold), as DHC's zoo runs it on its CPS base
(``xmed-lab/DHC code/train_adsh.py``, class ``ADSH``; docs/methods/adsh.md).

From a bank of softmax scores ``s`` (``n`` unlabeled output patches) with hard counts ``n_k = #{v: argmax s_v = k}``
and majority class ``M = argmax_k n_k``::

    ρ = (#{v: s_v[M] > 0.9} + 1e-8) / (n_M + 1e-8)
    θ_k = sort_desc(s[k] over every voxel of the bank)[int(ρ · n_k)]          (:func:`adsh_thresholds`)

Each network's per-class mask ``1[p_k > θ_k]`` (``(N, K, *spatial)``) multiplies the **other** network's logits, and
the CPS term is ``mean CE(z_A ⊙ 1[p_B > θ_B], argmax z_B) + mean CE(z_B ⊙ 1[p_A > θ_A], argmax z_A)`` (DHC
``ClassDependent_WeightedCrossEntropyLoss``: the mask zeroes logits of the input, it is not a loss mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnssl.losses.cps import as_label_map
from nnssl.losses.masked_ce import check_logits, check_same_shape
from nnssl.tensors import class_argmax


@torch.no_grad()
def adsh_thresholds(scores: torch.Tensor, thresh_major: float = 0.9) -> torch.Tensor:
    """Per-class thresholds ``θ`` ``(K,)`` from a bank of class probabilities ``scores`` ``(n, K, *spatial)`` (module
    docstring; DHC ``ADSH.get_thresholds``). Counts and ``ρ`` in float32 as DHC computes them; the sorted index is
    clamped to the last voxel (DHC would index past the end when one class holds every voxel and ``ρ = 1``)."""
    check_logits(scores, "scores")
    if not 0.0 <= thresh_major <= 1.0:
        raise ValueError(f"thresh_major must be in [0, 1], got {thresh_major!r}")
    n, num_classes = scores.shape[:2]
    flat = scores.detach().float().reshape(n, num_classes, -1)
    counts = torch.bincount(class_argmax(flat).reshape(-1), minlength=num_classes).float()
    major = int(counts.argmax())
    confident = (flat[:, major] > thresh_major).sum().float()
    rho = (confident + 1e-8) / (counts[major] + 1e-8)
    per_class = flat.transpose(0, 1).reshape(num_classes, -1)
    total = per_class.shape[1]
    index = torch.clamp((rho * counts).long(), max=total - 1)  # descending position int(ρ n_k)
    return torch.stack([per_class[k].kthvalue(total - int(index[k])).values for k in range(num_classes)])


@torch.no_grad()
def class_sampling_mask(logits: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``1[softmax(z)_k > θ_k]`` per voxel and class, float ``(N, K, *spatial)`` (DHC ``ADSH.cal_sampling_mask``)."""
    check_logits(logits)
    if thresholds.shape != (logits.shape[1],):
        raise ValueError(f"thresholds must have shape ({logits.shape[1]},), got {tuple(thresholds.shape)}")
    view = (1, -1) + (1,) * (logits.ndim - 2)
    probs = torch.softmax(logits.detach().float(), dim=1)
    return (probs > thresholds.to(probs.device, torch.float32).view(view)).float()


def masked_logit_cross_entropy(logits: torch.Tensor, target: torch.Tensor, logit_mask: torch.Tensor) -> torch.Tensor:
    """``mean_v CE(z_v ⊙ M_v, y_v)``: the CE of logits whose masked classes are set to 0 (not removed), mean over
    every voxel (DHC ``ClassDependent_WeightedCrossEntropyLoss``). ``logit_mask`` ``(N, K, *spatial)`` is detached;
    gradients reach only the kept logits."""
    check_logits(logits)
    target = as_label_map(target, logits)
    if logit_mask.shape != logits.shape:
        raise ValueError(f"logit_mask must have the logits' shape {tuple(logits.shape)}, got {tuple(logit_mask.shape)}")
    return F.cross_entropy(logits.float() * logit_mask.detach().float(), target)


def adsh_cps_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, mask_a: torch.Tensor,
                  mask_b: torch.Tensor) -> torch.Tensor:
    """``CE(z_A ⊙ M_B, argmax z_B) + CE(z_B ⊙ M_A, argmax z_A)`` with ``M_X = 1[p_X > θ_X]`` (DHC ``train_adsh.py``:
    each network's own mask gates the logits of the network its pseudo-labels supervise)."""
    check_same_shape(logits_a, logits_b)
    pseudo_a, pseudo_b = class_argmax(logits_a.detach()), class_argmax(logits_b.detach())
    return masked_logit_cross_entropy(logits_a, pseudo_b, mask_b) + masked_logit_cross_entropy(logits_b, pseudo_a,
                                                                                                mask_a)


class AdaptiveThresholds(nn.Module):
    """One network's score bank and thresholds (DHC ``ADSH``), as buffers, so ``state_dict`` / ``load_state_dict``
    carry them (register it as trainer state so ``--c`` restores them).

    :meth:`step` per iteration with the unlabeled logits: while the bank of ``bank_size`` patches is not full, their
    softmax is stored (as many rows as fit) and the current thresholds are returned; on the step after it is full,
    the thresholds are recomputed from the bank alone (that step's logits are not stored) and the bank starts over.
    Thresholds start at 0 (every class kept).
    """

    def __init__(self, num_classes: int, bank_size: int, spatial_shape: Sequence[int], thresh_major: float = 0.9):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if int(bank_size) != bank_size or bank_size < 1:
            raise ValueError(f"bank_size must be an integer >= 1, got {bank_size!r}")
        spatial = tuple(int(s) for s in spatial_shape)
        if not spatial or any(s < 1 for s in spatial):
            raise ValueError(f"spatial_shape must be positive sizes, got {tuple(spatial_shape)}")
        if not 0.0 <= thresh_major <= 1.0:
            raise ValueError(f"thresh_major must be in [0, 1], got {thresh_major!r}")
        self.num_classes, self.bank_size, self.thresh_major = int(num_classes), int(bank_size), float(thresh_major)
        self.register_buffer("scores", torch.zeros(self.bank_size, self.num_classes, *spatial))
        self.register_buffer("thresholds", torch.zeros(self.num_classes))
        self.filled = 0  # rows of the bank stored since the last recompute (a host int: no synchronisation per step)

    def get_extra_state(self) -> dict:
        return {"filled": self.filled}

    def set_extra_state(self, state: dict) -> None:
        self.filled = int(state["filled"])

    @torch.no_grad()
    def step(self, logits_unlabeled: torch.Tensor) -> torch.Tensor:
        """Store or recompute (class docstring); returns a copy of the thresholds ``(K,)`` to use at this step."""
        check_logits(logits_unlabeled)
        if tuple(logits_unlabeled.shape[1:]) != tuple(self.scores.shape[1:]):
            raise ValueError(f"logits {tuple(logits_unlabeled.shape)} do not match the bank {tuple(self.scores.shape)}")
        if self.filled < self.bank_size:
            rows = min(self.bank_size - self.filled, logits_unlabeled.shape[0])
            self.scores[self.filled:self.filled + rows] = torch.softmax(logits_unlabeled[:rows].detach().float(), 1)
            self.filled += rows
        else:
            self.thresholds.copy_(adsh_thresholds(self.scores, self.thresh_major))
            self.filled = 0
        return self.thresholds.clone()
