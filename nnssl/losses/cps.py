"""Cross pseudo supervision and class-weighted cross-entropy (docs/methods/cps.md, guidednet.md
(KT-CPS) and dhc.md).

Logits are ``(N, K, *spatial)`` (2D or 3D). Log-softmax and reductions run in float32, so fp16/bf16 logits from
CUDA autocast are safe. Pseudo-labels are always the argmax of detached logits (no threshold, no sharpening).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnssl.tensors import class_argmax
from nnssl.validation import value_checks_enabled


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, K>=2, *spatial), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point logits, got dtype {logits.dtype}")


def as_label_map(target: torch.Tensor, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    """``target`` as a LongTensor ``(N, *spatial)`` matching ``logits`` ``(N, K, *spatial)``.

    Accepts ``(N, *spatial)`` or nnU-Net's ``(N, 1, *spatial)``, integer or float (nnU-Net stores labels as float).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    expected = (logits.shape[0], *logits.shape[2:])
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(target.shape)}, expected {expected} or "
                         f"{(logits.shape[0], 1, *logits.shape[2:])} to match logits {tuple(logits.shape)}")
    return target.long()


def _check_class_weights(class_weights: torch.Tensor | None, num_classes: int, name: str) -> None:
    if class_weights is None:
        return
    if not isinstance(class_weights, torch.Tensor) or class_weights.shape != (num_classes,):
        shape = tuple(class_weights.shape) if isinstance(class_weights, torch.Tensor) else type(class_weights)
        raise ValueError(f"{name} must be a tensor of shape ({num_classes},), got {shape}")
    if value_checks_enabled() and (not bool(torch.isfinite(class_weights).all()) or bool((class_weights < 0).any())):
        raise ValueError(f"{name} must be finite and >= 0, got {class_weights.tolist()}")


def hard_pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """``ŷ = argmax_k sg(z)_k`` as a LongTensor ``(N, *spatial)`` (notation of docs/methods/README.md;
    argmax z = argmax softmax z)."""
    _check_logits(logits, "logits")
    return class_argmax(logits.detach())


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
                 ignore_mask: torch.Tensor | None) -> torch.Tensor:
    """Unchecked core of :func:`weighted_cross_entropy`; ``target`` is a valid ``(N, *spatial)`` LongTensor."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    if ignore_mask is not None:
        # ignored voxels may carry an out-of-range label (nnU-Net's ignore label); any valid index will do
        target = torch.where(ignore_mask, torch.zeros_like(target), target)
    voxel_ce = -torch.gather(log_probs, 1, target.unsqueeze(1)).squeeze(1)
    if class_weights is None:
        voxel_weights = torch.ones_like(voxel_ce)
    else:
        voxel_weights = class_weights.to(device=logits.device, dtype=torch.float32)[target]
    if ignore_mask is not None:
        voxel_weights = voxel_weights * (~ignore_mask).to(voxel_weights.dtype)
    total_weight = voxel_weights.sum()
    # Σ w[y] = 0 (e.g. DistDW gives the only pseudo-labelled class weight 0) would be 0/0 = NaN in PyTorch.
    # The numerator is then exactly 0 too, so dividing by 1 returns 0 and keeps a graph with zero gradients.
    safe_total = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))
    return (voxel_weights * voxel_ce).sum() / safe_total


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                           ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``CE_w(z, y) = Σ_v w[y_v]·(−log softmax(z_v)[y_v]) / Σ_v w[y_v]`` (docs/methods/README.md notation; equals
    ``nn.CrossEntropyLoss(weight=w)`` with mean reduction), but returns 0 instead of NaN when ``Σ_v w[y_v] = 0``
    (a NaN guard, docs/methods/dhc.md); the result still has a graph, so ``backward()`` works and gives zero gradients.

    ``class_weights``: ``(K,)`` non-negative, ``None`` = all ones (plain mean CE).
    ``ignore_mask``: optional bool ``(N, *spatial)``, True = voxel excluded from numerator and denominator.
    """
    _check_logits(logits, "logits")
    num_classes = logits.shape[1]
    target = as_label_map(target, logits)
    _check_class_weights(class_weights, num_classes, "class_weights")
    if ignore_mask is not None:
        if ignore_mask.shape != target.shape or ignore_mask.dtype != torch.bool:
            raise ValueError(f"ignore_mask must be a bool tensor of shape {tuple(target.shape)}, "
                             f"got {ignore_mask.dtype} {tuple(ignore_mask.shape)}")
        checked = target[~ignore_mask]
    else:
        checked = target
    if value_checks_enabled() and checked.numel() and bool(((checked < 0) | (checked >= num_classes)).any()):
        raise ValueError(f"target labels must be in [0, {num_classes - 1}] (K={num_classes} classes), "
                         f"got values in [{int(checked.min())}, {int(checked.max())}]")
    return _weighted_ce(logits, target, class_weights, ignore_mask)


def cross_pseudo_supervision_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                                  class_weights_a: torch.Tensor | None = None,
                                  class_weights_b: torch.Tensor | None = None,
                                  ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_cps = CE_{w_a}(z_a, ŷ_b) + CE_{w_b}(z_b, ŷ_a)`` with ``ŷ = argmax sg(z)`` (docs/methods/cps.md;
    weighted variants: docs/methods/dhc.md and the KT-CPS of docs/methods/guidednet.md).

    ``class_weights_a`` weights the loss of network a (the term whose prediction is ``z_a``), indexed by the
    pseudo-label class. DHC passes each net its own weights (a: DiffDW, b: DistDW); GuidedNet KT-CPS passes them
    crossed (``class_weights_a = w_B``, ``class_weights_b = w_A``). The pseudo-labels are detached, so network b
    receives gradient only from ``CE(z_b, ŷ_a)``. Call with the unlabelled sub-batch (SSL4MIS) or the whole batch
    (DHC, GuidedNet).
    """
    _check_logits(logits_a, "logits_a")
    _check_logits(logits_b, "logits_b")
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits_a {tuple(logits_a.shape)} and logits_b {tuple(logits_b.shape)} must have the "
                         "same shape")
    num_classes = logits_a.shape[1]
    _check_class_weights(class_weights_a, num_classes, "class_weights_a")
    _check_class_weights(class_weights_b, num_classes, "class_weights_b")
    expected = (logits_a.shape[0], *logits_a.shape[2:])
    if ignore_mask is not None and (tuple(ignore_mask.shape) != expected or ignore_mask.dtype != torch.bool):
        raise ValueError(f"ignore_mask must be a bool tensor of shape {expected}, "
                         f"got {ignore_mask.dtype} {tuple(ignore_mask.shape)}")
    pseudo_a = hard_pseudo_label(logits_a)
    pseudo_b = hard_pseudo_label(logits_b)
    return (_weighted_ce(logits_a, pseudo_b, class_weights_a, ignore_mask)
            + _weighted_ce(logits_b, pseudo_a, class_weights_b, ignore_mask))


def cps_loss_on_batch(logits_1: torch.Tensor, logits_2: torch.Tensor, n_labeled: int,
                      whole_batch: bool = False) -> torch.Tensor:
    """The CPS term of one step on the full-resolution logits of the batch ``[labeled; unlabeled]``:
    :func:`cross_pseudo_supervision_loss` over the unlabeled samples ``[n_labeled:]`` (SSL4MIS) or, with
    ``whole_batch``, over every sample (DHC ``train_cps.py``)."""
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"logits_1 {tuple(logits_1.shape)} and logits_2 {tuple(logits_2.shape)} must match")
    if not 0 <= n_labeled < logits_1.shape[0]:
        raise ValueError(f"n_labeled={n_labeled} must leave at least one unlabeled sample in a batch of "
                         f"{logits_1.shape[0]}")
    start = 0 if whole_batch else n_labeled
    return cross_pseudo_supervision_loss(logits_1[start:], logits_2[start:])
