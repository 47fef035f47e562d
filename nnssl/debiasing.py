"""Class-imbalance debiasing weights: DHC's DistDW and DiffDW (docs/methods/dhc.md, Wang & Li, MICCAI 2023) and
GuidedNet's knowledge-transfer weights for KT-CPS (docs/methods/guidednet.md), plus DHC's class-weighted soft Dice.

Each weighting class keeps a ``(K,)`` state that must be saved with the checkpoint (docs/methods/README.md): use
``state_dict()`` / ``load_state_dict()``. Weights live on the device of the last ``update`` input.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from nnssl.losses.cps import as_label_map
from nnssl.tensors import class_argmax
from nnssl.validation import value_checks_enabled

# the guard constant of the reference implementations (DHC DistDW / DiffDW, GuidedNet KTCPS)
_EPS = 1e-8


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Number of voxels of each class ``k = 0..K-1`` in an integer label tensor of any shape (int64, ``(K,)``)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer torch.Tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    flat = labels.reshape(-1).long()
    if value_checks_enabled() and flat.numel() and bool(((flat < 0) | (flat >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=num_classes)


def _as_counts(class_counts: torch.Tensor | np.ndarray | list, name: str) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2:
        raise ValueError(f"{name} must be a 1-D vector with one count per class (K >= 2), got shape "
                         f"{tuple(counts.shape)}")
    if value_checks_enabled() and (not bool(torch.isfinite(counts).all()) or bool((counts < 0).any())):
        raise ValueError(f"{name} must be finite and >= 0, got {counts.tolist()}")
    return counts


def distribution_aware_weights(class_counts: torch.Tensor) -> torch.Tensor:
    """DHC DistDW weights (docs/methods/dhc.md):

        P_k = (n_max + 1e-8) / (n_k + 1e-8),   w_k = K · log P_k / max_k' log P_k'

    The most frequent class gets 0, the rarest K; the result is invariant to scaling ``n``. A class with
    ``n_k = 0`` gets K. Uniform counts (``max log P = 0``, 0/0 = NaN in the reference) return ``K · ones``:
    with no imbalance every class is equally important, and ``K · ones`` is also DiffDW's neutral start value.
    Computed in float64, returned as float32 on the device of ``class_counts``.
    """
    device = class_counts.device if isinstance(class_counts, torch.Tensor) else torch.device("cpu")
    # float64 where the counts are (no copy to the host), except on MPS, which has no float64
    if isinstance(class_counts, torch.Tensor) and device.type == "mps":
        class_counts = class_counts.detach().cpu()
    counts = _as_counts(class_counts.detach() if isinstance(class_counts, torch.Tensor) else class_counts,
                        "class_counts")
    num_classes = counts.numel()
    log_ratio = torch.log((counts.max() + _EPS) / (counts + _EPS))
    largest = log_ratio.max()
    uniform = torch.full_like(log_ratio, float(num_classes))  # no imbalance (and 0/0 in the reference)
    weights = torch.where(largest > 0, num_classes * log_ratio / largest.clamp_min(torch.finfo(log_ratio.dtype).tiny),
                          uniform)
    return weights.to(device=device, dtype=torch.float32)


def per_class_hard_dice(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                        smooth: float = _EPS) -> torch.Tensor:
    """Batch hard Dice of every class including background (DHC DiffDW's ``SoftDiceLoss(smooth=1e-8,
    do_bg=True)`` on one-hot maps):

        d_k = (2 TP_k + s) / (2 TP_k + FP_k + FN_k + s + 1e-8),   s = 1e-8

    summed over the batch and all voxels. A class absent from both prediction and target gets ``d = 0.5``
    (``s / 2s``); a class in the target but never predicted gets a tiny positive value (kept > 0 because DiffDW
    takes ``log d``). Returns float64 ``(K,)``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the "
                         "same shape")
    predicted_counts = class_histogram(prediction, num_classes).double()
    target_counts = class_histogram(target, num_classes).double()
    true_positive = class_histogram(target[prediction == target], num_classes).double()
    # 2TP + FP + FN = |pred_k| + |target_k|
    return (2 * true_positive + smooth) / (predicted_counts + target_counts + smooth + _EPS)


class DistributionAwareWeighting:
    """DHC DistDW (docs/methods/dhc.md): ``w ← m·w + (1−m)·distribution_aware_weights(hist(ŷ_u))`` with m = 0.99.

    Initialised from the voxel histogram of the labelled training labels (DHC: full volumes, before cropping).
    ``update`` takes model B's hard pseudo-labels of the unlabelled sub-batch and returns the new weights.
    """

    def __init__(self, initial_class_counts: torch.Tensor | np.ndarray | list, momentum: float = 0.99):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__} momentum must be in [0, 1], got {momentum!r}")
        counts = _as_counts(initial_class_counts, "initial_class_counts")
        self.num_classes = counts.numel()
        self.momentum = float(momentum)
        self.weights = distribution_aware_weights(counts)

    def update(self, pseudo_label: torch.Tensor) -> torch.Tensor:
        """EMA step from the class histogram of ``pseudo_label`` (any shape, values in [0, K)); returns a copy."""
        return self._ema_step(class_histogram(pseudo_label, self.num_classes), pseudo_label.device)

    def _ema_step(self, counts: torch.Tensor, device: torch.device) -> torch.Tensor:
        current = distribution_aware_weights(counts).to(device)
        self.weights = self.momentum * self.weights.to(current.device) + (1.0 - self.momentum) * current
        return self.weights.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = _load_vector(state, "weights", self.num_classes, type(self).__name__).float()


class KnowledgeTransferWeighting(DistributionAwareWeighting):
    """GuidedNet KT-CPS weights (docs/methods/guidednet.md): DistDW on the histogram of *correctly* predicted labelled
    voxels; wrongly predicted voxels are counted as background (class 0). EMA momentum 0.99.

    GuidedNet keeps ONE shared state for both networks and updates it sequentially (net 1, then net 2):
    ``w_A = update(z_l^1, y)`` and ``w_B = update(z_l^2, y)``, then ``CE_{w_B}(z^1, ŷ^2) + CE_{w_A}(z^2, ŷ^1)``.
    """

    def update(self, logits_labeled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """EMA step from ``hist(where(argmax z_l == y, y, 0))``; ``target`` ``(N, *sp)`` or ``(N, 1, *sp)``."""
        _check_num_classes(logits_labeled, self.num_classes, type(self).__name__)
        labels = as_label_map(target, logits_labeled)
        prediction = class_argmax(logits_labeled.detach())
        correct_labels = torch.where(prediction == labels, labels, torch.zeros_like(labels))
        return self._ema_step(class_histogram(correct_labels, self.num_classes), logits_labeled.device)


class DifficultyAwareWeighting:
    """DHC DiffDW (docs/methods/dhc.md), β = (accumulate_iters − 1)/accumulate_iters (0.98 for 50).

    Per call, with ``d`` = :func:`per_class_hard_dice` of argmax(z_l^A) vs y (all K classes)::

        Δ = d − last;  learn^cur = max(Δ,0)·log(d/last);  unlearn^cur = min(Δ,0)·log(d/last)  (both >= 0)
        last ← d;  learn ← β·learn + (1−β)·learn^cur;  unlearn ← β·unlearn + (1−β)·unlearn^cur
        diff = ((unlearn + 1e-8)/(learn + 1e-8))^exponent;  dice_weight ← β·dice_weight + (1−β)(1 − d)
        w = K · diff·dice_weight / max(diff·dice_weight)

    Start state: last = 1e-8, learn = unlearn = 0, dice_weight = 1, weights = K·ones. State is float64.
    If every ``diff·dice_weight`` is 0 (dice_weight underflow after thousands of perfect iterations) the
    weights fall back to ``K·ones`` instead of NaN.
    """

    def __init__(self, num_classes: int, accumulate_iters: int = 50, exponent: float = 1 / 5):
        if num_classes < 2:
            raise ValueError(f"DifficultyAwareWeighting num_classes must be >= 2, got {num_classes}")
        if accumulate_iters < 1:
            raise ValueError(f"DifficultyAwareWeighting accumulate_iters must be >= 1, got {accumulate_iters}")
        self.num_classes = int(num_classes)
        self.accumulate_iters = int(accumulate_iters)
        self.beta = (self.accumulate_iters - 1) / self.accumulate_iters
        self.exponent = float(exponent)
        k = self.num_classes
        self.last_dice = torch.full((k,), _EPS, dtype=torch.float64)
        self.cls_learn = torch.zeros(k, dtype=torch.float64)
        self.cls_unlearn = torch.zeros(k, dtype=torch.float64)
        self.dice_weight = torch.ones(k, dtype=torch.float64)
        self.weights = torch.full((k,), float(k), dtype=torch.float32)

    def _ema(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return self.beta * old.to(new.device) + (1.0 - self.beta) * new

    def update_from_dice(self, dice: torch.Tensor) -> torch.Tensor:
        """One DiffDW step from a given per-class Dice vector ``d`` (``(K,)``, values in (0, 1]); returns weights."""
        dice = torch.as_tensor(dice).detach().double()
        if dice.shape != (self.num_classes,):
            raise ValueError(f"dice must have shape ({self.num_classes},), got {tuple(dice.shape)}")
        if value_checks_enabled() and not bool(((dice > 0) & (dice <= 1)).all()):
            raise ValueError(f"dice values must be in (0, 1] (log d is taken), got {dice.tolist()}")
        last = self.last_dice.to(dice.device)
        delta = dice - last
        log_ratio = torch.log(dice / last)
        current_learn = torch.clamp(delta, min=0) * log_ratio
        current_unlearn = torch.clamp(delta, max=0) * log_ratio
        self.last_dice = dice
        self.cls_learn = self._ema(self.cls_learn, current_learn)
        self.cls_unlearn = self._ema(self.cls_unlearn, current_unlearn)
        difficulty = ((self.cls_unlearn + _EPS) / (self.cls_learn + _EPS)) ** self.exponent
        self.dice_weight = self._ema(self.dice_weight, 1.0 - dice)
        raw = difficulty * self.dice_weight
        largest = raw.max()
        weights = torch.where(largest > 0, self.num_classes * raw / largest.clamp_min(torch.finfo(raw.dtype).tiny),
                              torch.full_like(raw, float(self.num_classes)))
        self.weights = weights.float()
        return self.weights.clone()

    def update(self, logits_labeled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One DiffDW step from model A's labelled logits ``(N, K, *sp)`` and labels ``(N[, 1], *sp)``."""
        _check_num_classes(logits_labeled, self.num_classes, type(self).__name__)
        labels = as_label_map(target, logits_labeled)
        prediction = class_argmax(logits_labeled.detach())
        return self.update_from_dice(per_class_hard_dice(prediction, labels, self.num_classes))

    _STATE_KEYS = ("last_dice", "cls_learn", "cls_unlearn", "dice_weight", "weights")

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key).detach().cpu().clone() for key in self._STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        name = type(self).__name__
        loaded = {key: _load_vector(state, key, self.num_classes, name) for key in self._STATE_KEYS}
        for key, value in loaded.items():
            setattr(self, key, value.float() if key == "weights" else value.double())


def weighted_soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
                            do_bg: bool = False, batch_dice: bool = True, smooth: float = 1.0) -> torch.Tensor:
    """DHC's class-weighted soft Dice (docs/methods/dhc.md; nnU-Net-v1 ``SoftDiceLoss`` with a weight)::

        p = softmax(z);  dc_k = (2 TP_k + smooth) / (2 TP_k + FP_k + FN_k + smooth + 1e-8)
        loss = −mean_k (w_k · dc_k)      over k ≥ 1 unless do_bg (negative Dice, not 1 − Dice)

    TP/FP/FN are sums over batch and voxels (``batch_dice``) or over voxels per sample (then the mean also runs
    over samples). ``target``: labels ``(N, *sp)`` / ``(N, 1, *sp)`` or a one-hot/soft map of the logits' shape.
    ``class_weights``: ``(K,)`` indexed by class (``w_0`` is unused without ``do_bg``); ``None`` = ones.
    Computed in float32.
    """
    if logits.ndim < 3 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating point (N, K>=2, *spatial), got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if target.shape == logits.shape:
        target_onehot = target.to(device=logits.device, dtype=torch.float32)
    else:
        labels = as_label_map(target, logits)
        class_histogram(labels, num_classes)  # range check with a clear error
        target_onehot = torch.movedim(F.one_hot(labels, num_classes), -1, 1).float()
    if class_weights is not None and (not isinstance(class_weights, torch.Tensor)
                                      or class_weights.shape != (num_classes,)):
        raise ValueError(f"class_weights must be a tensor of shape ({num_classes},)")
    probs = F.softmax(logits.float(), dim=1)
    axes = [0, *range(2, logits.ndim)] if batch_dice else list(range(2, logits.ndim))
    true_positive = (probs * target_onehot).sum(dim=axes)
    false_positive = (probs * (1 - target_onehot)).sum(dim=axes)
    false_negative = ((1 - probs) * target_onehot).sum(dim=axes)
    dice = (2 * true_positive + smooth) / (2 * true_positive + false_positive + false_negative + smooth + _EPS)
    if class_weights is not None:
        dice = dice * class_weights.to(device=dice.device, dtype=torch.float32)
    if not do_bg:
        dice = dice[..., 1:]
    return -dice.mean()


def _check_num_classes(logits: torch.Tensor, num_classes: int, owner: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim < 3 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{owner}.update: logits must have shape (N, {num_classes}, *spatial), got {shape}")


def _load_vector(state: Mapping[str, Any], key: str, num_classes: int, owner: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"{owner}.load_state_dict: missing key {key!r} (found {sorted(state)})")
    value = torch.as_tensor(state[key]).detach().clone()
    if value.shape != (num_classes,):
        raise ValueError(f"{owner}.load_state_dict: {key!r} has shape {tuple(value.shape)}, expected ({num_classes},)")
    return value
