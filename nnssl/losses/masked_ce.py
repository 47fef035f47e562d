"""Voxel-masked cross-entropy and confident pseudo-labels, as DHC's zoo scripts use them (``xmed-lab/DHC
code/utils/loss.py``: ``WeightedCrossEntropyLoss`` / ``Onehot_WeightedCrossEntropyLoss``).

Logits are ``(N, K, *spatial)`` (2D or 3D); log-softmax and reductions run in float32, so fp16/bf16 logits from
autocast are safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnssl.losses.cps import _check_logits, as_label_map


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """Raise unless ``logits`` is a floating tensor ``(N, K >= 2, *spatial)``."""
    _check_logits(logits, name)


def check_same_shape(logits_a: torch.Tensor, logits_b: torch.Tensor) -> None:
    check_logits(logits_a, "logits_a")
    check_logits(logits_b, "logits_b")
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits_a {tuple(logits_a.shape)} and logits_b {tuple(logits_b.shape)} must match")


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         voxel_weights: torch.Tensor | None = None, check_labels: bool = True) -> torch.Tensor:
    """``mean_v m_v · CE(z_v, y_v)`` over **all** voxels (DHC ``WeightedCrossEntropyLoss``: the mean is not
    normalised by ``Σ m``, so a mask that keeps few voxels also shrinks the loss).

    ``target``: labels ``(N, *spatial)`` or ``(N, 1, *spatial)``; ``voxel_weights``: ``(N, *spatial)`` (a 0/1 mask
    or weights; detached, as DHC detaches its weight map), ``None`` = plain mean CE. ``check_labels=False`` skips
    the label-range check, the one host synchronisation here (for pseudo-labels, an argmax, always in range).
    """
    check_logits(logits)
    target = as_label_map(target, logits)
    if check_labels and target.numel() and bool(((target < 0) | (target >= logits.shape[1])).any()):
        raise ValueError(f"target labels must be in [0, {logits.shape[1] - 1}]")
    if voxel_weights is not None and tuple(voxel_weights.shape) != tuple(target.shape):
        raise ValueError(f"voxel_weights has shape {tuple(voxel_weights.shape)}, expected {tuple(target.shape)}")
    return _masked_ce(logits, target, voxel_weights)


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None) -> torch.Tensor:
    """Unchecked core of :func:`masked_cross_entropy` (no host synchronisation): ``target`` valid ``(N, *spatial)``."""
    voxel_ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if voxel_weights is not None:
        voxel_ce = voxel_ce * voxel_weights.detach().float()
    return voxel_ce.mean()


def masked_cps_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
                    mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """``mean(CE(z_A, t_B)·m_B) + mean(CE(z_B, t_A)·m_A)``: each network learns the other's pseudo-label ``t`` where
    the other's mask ``m`` keeps it (:func:`masked_cross_entropy`; DHC ``train_depl.py`` / ``train_dst.py``)."""
    check_same_shape(logits_a, logits_b)
    expected = (logits_a.shape[0], *logits_a.shape[2:])
    for name, t in (("target_a", target_a), ("target_b", target_b), ("mask_a", mask_a), ("mask_b", mask_b)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected}")
    return _masked_ce(logits_a, target_b, mask_b) + _masked_ce(logits_b, target_a, mask_a)


@torch.no_grad()
def confident_argmax(probabilities: torch.Tensor, threshold: float, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax_k q, [max_k q > τ])`` (``strict``) or ``[max_k q ≥ τ]``, the mask as float: the confident hard
    pseudo-label of class probabilities ``q`` ``(N, K, *spatial)``."""
    confidence, target = probabilities.max(dim=1)
    mask = confidence > threshold if strict else confidence >= threshold
    return target, mask.float()
