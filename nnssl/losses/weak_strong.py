"""Weak-to-strong pseudo-label loss (FixMatch, Sohn et al., NeurIPS 2020, Eq. 2 and 4) for dense segmentation, with
DHC's distribution-aware class weights (Wang & Li, MICCAI 2023, Eq. 3) as an optional per-voxel factor.

    ŷ_v = argmax_k q_v,   m_v = 1[max_k q_v ≥ τ],   q = softmax(z_weak)          (no gradient)
    L_u = mean_v  m_v · ω[ŷ_v] · CE(z_strong,v, ŷ_v)                              (mean over ALL voxels)

FixMatch's mean runs over every unlabeled sample, kept or not (its Eq. 4 divides by μB, not by Σ m), so a strict
threshold also makes the term small early on; the same holds here per voxel. ``ω = 1`` without class weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnssl.debiasing import DistributionAwareWeighting
from nnssl.losses.masked_ce import check_logits, confident_argmax, masked_cross_entropy


def weak_pseudo_labels(weak_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """``(ŷ, m)`` of the weak view's logits (N, K, *spatial): the argmax (long, (N, *spatial)) and the float mask
    ``max softmax ≥ threshold`` (``threshold = 0`` keeps every voxel). No gradient."""
    check_logits(weak_logits, "weak_logits")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: must be in [0, 1], got {threshold}")
    with torch.no_grad():
        return confident_argmax(torch.softmax(weak_logits.detach().float(), 1), threshold, strict=False)


def balanced_voxel_weights(pseudo_labels: Tensor, weighting: DistributionAwareWeighting | None) -> Tensor:
    """``1 + w_DistDW[ŷ_v]`` per voxel after one EMA step of ``weighting`` on ``pseudo_labels`` (DHC's DistDW, whose
    weights are 0 for the most frequent class and K for the rarest); ones without ``weighting``. The 1 keeps the
    most frequent class (background) in the loss: DHC's own weights drop it, which DHC can afford because its other
    network trains on DiffDW weights; a single student here would never see unlabeled background."""
    if weighting is None:
        return torch.ones(pseudo_labels.shape, device=pseudo_labels.device)
    return 1.0 + weighting.update(pseudo_labels)[pseudo_labels]


def weak_to_strong_loss(strong_logits: Tensor, pseudo_labels: Tensor, voxel_weights: Tensor) -> Tensor:
    """``mean_v voxel_weights_v · CE(strong_logits_v, pseudo_labels_v)`` over all voxels (module docstring);
    ``voxel_weights`` = mask × class weight, detached. Zero when every weight is zero; gradient only into
    ``strong_logits``."""
    return masked_cross_entropy(strong_logits, pseudo_labels, voxel_weights.detach(), check_labels=False)
