"""Class-wise random sampling of pseudo-labelled voxels from per-class statistics: CLD and Basak et al., as DHC's
method zoo runs them (``xmed-lab/DHC code/train_cld.py``, ``code/train_acisis.py``; docs/methods/cld.md,
docs/methods/basak.md). Both turn a per-class score ``s`` (higher = better learnt) into sampling rates, keep each
voxel of predicted class ``c`` with probability ``sr_c`` and average the cross-entropy over all voxels::

    sr_c = ((1 − s_c) / (max_c'(1 − s_c') + 1e-12))^γ                       (DHC cal_sampling_rate)
    M(v) = [u(v) > 1 − sr_ŷ(v)],   u ~ U[0, 1),  ŷ = argmax sg(z)               (DHC cal_sampling_mask)
    L = mean_v  w[t(v)] · CE(z(v), t(v)) · M(v) · a(v)                         (DHC WeightedCrossEntropyLoss)

- CLD (Lin et al., "Calibrating Label Distribution for Class-Imbalanced Barely-Supervised Knee Segmentation",
  MICCAI 2022): ``s`` = per-class mean softmax confidence on the labeled ground truth (:class:`ConfidenceBank`),
  ``γ = 0.5``, ``w = (n_max / n)^(1/3)`` from the labeled histogram (:func:`inverse_frequency_weights`), ``a = 1``.
- Basak et al. ("Addressing Class Imbalance in Semi-supervised Image Segmentation: A Study on Cardiac MRI",
  MICCAI 2022): ``s`` = the fuzzy-rank consensus ``CC`` of three per-class statistics
  (:class:`FuzzyRankSamplingRates`), ``γ = 2.5``, ``w = 1``, ``a = (max_k p_k)^1.5``.

DHC draws one uniform map per class and keeps a voxel of class ``c`` where ``u_c · [ŷ = c] > 1 − sr_c``; a voxel has
one class, so one uniform per voxel gives the same distribution (here). Everything is computed in float32 (softmax
of fp16/bf16 logits from autocast is safe); the maps carry no gradient.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl.losses.cps import _check_logits, as_label_map
from nnssl.losses.masked_ce import masked_cross_entropy
from nnssl.tensors import class_argmax

_GUARD = 1e-12  # DHC's guard in every per-class mean and in the rate normalisation


def sampling_rates(scores: Tensor, gamma: float) -> Tensor:
    """``sr_c = ((1 − s_c) / (max(1 − s) + 1e-12))^γ`` (module doc); in [0, 1], float32 ``(K,)``."""
    if gamma <= 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be a (K,) vector, got shape {tuple(scores.shape)}")
    rest = 1.0 - scores.float()
    return (rest / (rest.max() + _GUARD)).clamp(min=0.0) ** gamma


def class_sampling_map(logits: Tensor, rates: Tensor, noise: Tensor | None = None) -> Tensor:
    """``M(v) = [u(v) > 1 − sr_ŷ(v)]`` with ``ŷ = argmax sg(z)`` (module doc): float32 ``(N, *spatial)`` of 0/1.

    ``noise``: the uniform draws ``u`` (``(N, *spatial)``), e.g. to reproduce DHC's draws; ``None`` draws
    ``torch.rand`` on the logits' device."""
    _check_logits(logits, "logits")
    if rates.shape != (logits.shape[1],):
        raise ValueError(f"rates must have shape ({logits.shape[1]},), got {tuple(rates.shape)}")
    predicted = class_argmax(logits.detach())
    if noise is None:
        noise = torch.rand(predicted.shape, device=logits.device)
    elif noise.shape != predicted.shape:
        raise ValueError(f"noise must have shape {tuple(predicted.shape)}, got {tuple(noise.shape)}")
    threshold = 1.0 - rates.to(device=logits.device, dtype=torch.float32)[predicted]
    return (noise.float() > threshold).float()


def sampled_cross_entropy(logits: Tensor, target: Tensor, sample_map: Tensor,
                          class_weights: Tensor | None = None) -> Tensor:
    """``mean_v w[t(v)] · CE(z(v), t(v)) · M(v)`` over every voxel of every sample (module doc; DHC
    ``WeightedCrossEntropyLoss``: ``nn.CrossEntropyLoss(weight=w, reduction='none')`` times the map, then
    ``mean``, not normalised by the weights or the map). ``sample_map`` is detached; ``class_weights`` ``(K,)``
    finite and >= 0 or ``None``."""
    _check_logits(logits, "logits")
    target = as_label_map(target, logits)
    if sample_map.shape != target.shape:
        raise ValueError(f"sample_map must have shape {tuple(target.shape)}, got {tuple(sample_map.shape)}")
    voxel_weights = sample_map.detach().float()
    if class_weights is not None:
        # shape only: a finiteness check here would synchronise with the host every step; CLD's weights come
        # from inverse_frequency_weights, finite by construction
        if class_weights.shape != (logits.shape[1],):
            raise ValueError(f"class_weights must be a ({logits.shape[1]},) vector, got {tuple(class_weights.shape)}")
        voxel_weights = voxel_weights * class_weights.to(device=logits.device, dtype=torch.float32)[target]
    return masked_cross_entropy(logits, target, voxel_weights, check_labels=False)  # argmax pseudo-labels


def inverse_frequency_weights(class_counts: Tensor, power: float = 1 / 3) -> Tensor:
    """CLD's class weights ``w_k = (n_max / max(n_k, 1))^power`` (DHC ``Synapse_AMOS_cld.weight``: ``n_max / n_k``,
    infinite for a class absent from the labeled cases; here such a class counts as one voxel, so the weight stays
    finite). Float32 ``(K,)``."""
    counts = torch.as_tensor(class_counts).detach().double()
    if counts.ndim != 1 or counts.numel() < 2 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"class_counts must be a finite, non-negative (K >= 2,) vector, got {counts.tolist()}")
    if counts.max() <= 0:
        raise ValueError("class_counts are all zero: no labeled voxels")
    return ((counts.max() / counts.clamp(min=1.0)) ** power).float()


def _per_class_sums(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``Σ_v values(v) [labels(v) = c]`` for every class ``c``: float64 ``(K,)``."""
    return torch.zeros(num_classes, dtype=torch.float64, device=values.device).index_add_(
        0, labels.reshape(-1), values.reshape(-1).double())


class ConfidenceBank:
    """CLD's per-class confidence (DHC ``ConfidenceBank``): the mean softmax probability of the true class over the
    labeled voxels of each class, accumulated over ``update_every`` calls (8), then

        s ← s_new (first update),   s ← m·s + (1 − m)·s_new (later; m = 0.999),   s_new = Σ p_c [y = c] / (n_c + 1e-12)

    Before the first update ``s`` is ``initial`` or ``torch.rand(K)`` from the global RNG (DHC; its second bank
    starts from a copy of the first). A class absent during an update window gets ``s_new = 0``."""

    def __init__(self, num_classes: int, momentum: float = 0.999, update_every: int = 8,
                 initial: Tensor | None = None):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"ConfidenceBank num_classes must be an integer >= 2, got {num_classes!r}")
        if not 0.0 <= momentum <= 1.0 or int(update_every) != update_every or update_every < 1:
            raise ValueError(f"ConfidenceBank needs momentum in [0, 1] and update_every >= 1, got {momentum!r}, "
                             f"{update_every!r}")
        self.num_classes, self.momentum, self.update_every = int(num_classes), float(momentum), int(update_every)
        confidences = torch.rand(self.num_classes) if initial is None else torch.as_tensor(initial).detach()
        if confidences.shape != (self.num_classes,):
            raise ValueError(f"initial must have shape ({self.num_classes},), got {tuple(confidences.shape)}")
        self.confidences = confidences.float().clone()
        self.sums = torch.zeros(self.num_classes, dtype=torch.float64)
        self.counts = torch.zeros(self.num_classes, dtype=torch.float64)
        self.records = 0

    def record(self, logits: Tensor, target: Tensor) -> Tensor:
        """Add one labeled batch (logits ``(N, K, *sp)``, labels ``(N[, 1], *sp)``); returns the confidences."""
        _check_logits(logits, "logits")
        labels = as_label_map(target, logits)
        probs = F.softmax(logits.detach().float(), dim=1)
        true_class = torch.gather(probs, 1, labels.unsqueeze(1)).squeeze(1)
        self.sums = self.sums.to(logits.device) + _per_class_sums(true_class, labels, self.num_classes)
        self.counts = self.counts.to(logits.device) + _per_class_sums(torch.ones_like(true_class), labels,
                                                                      self.num_classes)
        self.records += 1
        if self.records % self.update_every == 0:
            new = (self.sums / (self.counts + _GUARD)).float()
            first = self.records <= self.update_every
            self.confidences = new if first else self.momentum * self.confidences.to(new.device) + (
                1.0 - self.momentum) * new
            self.sums, self.counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        return self.confidences

    def state_dict(self) -> dict[str, Any]:
        return {"confidences": self.confidences.cpu().clone(), "sums": self.sums.cpu().clone(),
                "counts": self.counts.cpu().clone(), "records": self.records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.confidences = torch.as_tensor(state["confidences"]).float().clone()
        self.sums = torch.as_tensor(state["sums"]).double().clone()
        self.counts = torch.as_tensor(state["counts"]).double().clone()
        self.records = int(state["records"])


def gompertz_rank(scores: Tensor) -> Tensor:
    """Basak's fuzzy rank ``R = 1 − exp(−exp(−2 x))`` (a Gompertz function; DHC ``fuzzy_rank``)."""
    return 1.0 - torch.exp(-torch.exp(-2.0 * scores))


class FuzzyRankSamplingRates:
    """Basak et al.'s class sampling rates (DHC ``ConfidenceArray``), updated every ``update_every`` records (DHC:
    the iterations of an epoch). Per labeled batch, for each class ``c`` over its ground-truth voxels ``V_c``::

        e_c += Σ_{V_c} p_c · Σ_k log(p_k + 1e-12) / (|V_c| + 1e-12)     (DHC's "entropy" term, as written there)
        f_c += Σ_{V_c} p_c / (|V_c| + 1e-12);   v_c += Σ_{V_c} (max_k p_k − p_c) / (|V_c| + 1e-12)

    and at the update, with the 3 × K matrix ``X = softmax_K([e; f; v] / records)``::

        R = 1 − exp(−exp(−2 X));  keep = R within the min(top_m, K) smallest of its row (ties kept)
        FR = Σ_rows where(keep, R, 0.632);   CCF = 1 − Σ_rows where(keep, X, 0) / 3
        CC ← m·CC + (1 − m)·(CCF·FR / max(CCF·FR)),   sr = ((1 − CC)/(max(1 − CC) + 1e-12))^2.5

    ``CC`` starts at 0 and ``sr`` at 1 (every voxel sampled until the first update). Two deviations from DHC, where
    its code breaks (docs/methods/basak.md): DHC selects the ranks with ``np.partition(a, k)`` for ``k < 12``,
    which raises for ``K < 12`` (here: all K ranks are kept when ``K <= top_m``, what the loop does for ``K >= 12``);
    and DHC multiplies each statistic by a ``(B, 1, ...)`` ground-truth mask against ``(B, ...)`` scores, which
    pairs every sample's mask with every sample's scores (``B²`` terms; the same for ``B = 1``); here each
    sample's mask meets its own scores.
    """

    def __init__(self, num_classes: int, update_every: int, momentum: float = 0.99, top_m: int = 12,
                 gamma: float = 2.5, penalty_rank: float = 0.632, penalty_score: float = 0.0):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"FuzzyRankSamplingRates num_classes must be an integer >= 2, got {num_classes!r}")
        if int(update_every) != update_every or update_every < 1 or int(top_m) != top_m or top_m < 1:
            raise ValueError(f"update_every and top_m must be integers >= 1, got {update_every!r}, {top_m!r}")
        if not 0.0 <= momentum <= 1.0 or gamma <= 0:
            raise ValueError(f"momentum must be in [0, 1] and gamma > 0, got {momentum!r}, {gamma!r}")
        self.num_classes, self.update_every, self.momentum = int(num_classes), int(update_every), float(momentum)
        self.top_m, self.gamma = int(top_m), float(gamma)
        self.penalty_rank, self.penalty_score = float(penalty_rank), float(penalty_score)
        self.statistics = torch.zeros(3, self.num_classes, dtype=torch.float64)  # rows: e, f, v
        self.records = 0
        self.consensus = torch.zeros(self.num_classes)
        self.rates = torch.ones(self.num_classes)

    def record(self, logits: Tensor, target: Tensor) -> Tensor:
        """Add one labeled batch; at every ``update_every``-th call update ``CC`` and the rates. Returns the
        rates ``(K,)`` to sample with (after this call's update, as DHC)."""
        _check_logits(logits, "logits")
        labels = as_label_map(target, logits)
        probs = F.softmax(logits.detach().float(), dim=1)
        true_class = torch.gather(probs, 1, labels.unsqueeze(1)).squeeze(1)
        terms = (true_class * torch.log(probs + _GUARD).sum(1), true_class, probs.amax(1) - true_class)
        voxels = _per_class_sums(torch.ones_like(true_class), labels, self.num_classes) + _GUARD
        batch = torch.stack([_per_class_sums(t, labels, self.num_classes) / voxels for t in terms])
        self.statistics = self.statistics.to(logits.device) + batch
        self.records += 1
        if self.records % self.update_every == 0:
            self._update()
        return self.rates

    def _update(self) -> None:
        scores = torch.softmax(self.statistics / self.records, dim=1)
        ranks = gompertz_rank(scores)
        kth = torch.sort(ranks, dim=1).values[:, min(self.top_m, self.num_classes) - 1:][:, :1]
        keep = ranks <= kth
        fuzzy_rank = torch.where(keep, ranks, torch.full_like(ranks, self.penalty_rank)).sum(0)
        kept_scores = torch.where(keep, scores, torch.full_like(scores, self.penalty_score))
        current = (1.0 - kept_scores.sum(0) / scores.shape[0]) * fuzzy_rank
        current = (current / current.max()).float()
        self.consensus = self.momentum * self.consensus.to(current.device) + (1.0 - self.momentum) * current
        self.rates = sampling_rates(self.consensus, self.gamma)
        self.statistics = torch.zeros_like(self.statistics)
        self.records = 0

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": self.statistics.cpu().clone(), "records": self.records,
                "consensus": self.consensus.cpu().clone(), "rates": self.rates.cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.statistics = torch.as_tensor(state["statistics"]).double().clone()
        self.records = int(state["records"])
        self.consensus = torch.as_tensor(state["consensus"]).float().clone()
        self.rates = torch.as_tensor(state["rates"]).float().clone()


class CLDStatistics:
    """CLD's per-class state as one registered object: the fixed class weights ``(n_max/n)^(1/3)`` of the labeled
    histogram (:func:`inverse_frequency_weights`, set by ``initialise``) and one :class:`ConfidenceBank` per network
    (B starts from a copy of A's random confidences, DHC ``confs_B = ConfidenceBank(confs=confs_A.get_confs())``)."""

    def __init__(self, num_classes: int, momentum: float = 0.999, update_every: int = 8, gamma: float = 0.5):
        if gamma <= 0:
            raise ValueError(f"CLDStatistics gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.bank_a = ConfidenceBank(num_classes, momentum, update_every)
        self.bank_b = ConfidenceBank(num_classes, momentum, update_every, initial=self.bank_a.confidences)
        self.class_weights: Tensor | None = None

    @property
    def initialised(self) -> bool:
        return self.class_weights is not None

    def initialise(self, labeled_counts: Tensor) -> None:
        weights = inverse_frequency_weights(labeled_counts)
        if weights.shape != (self.bank_a.num_classes,):
            raise ValueError(f"labeled_counts must have {self.bank_a.num_classes} entries, got {tuple(weights.shape)}")
        self.class_weights = weights

    def record(self, logits_a: Tensor, logits_b: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Record both networks' labeled logits; returns their sampling rates ``(sr_A, sr_B)`` (γ = 0.5)."""
        return (sampling_rates(self.bank_a.record(logits_a, target), self.gamma),
                sampling_rates(self.bank_b.record(logits_b, target), self.gamma))

    def state_dict(self) -> dict[str, Any]:
        weights = self.class_weights
        return {"class_weights": None if weights is None else weights.cpu().clone(),
                "bank_a": self.bank_a.state_dict(), "bank_b": self.bank_b.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["class_weights"]
        self.class_weights = None if weights is None else torch.as_tensor(weights).float().clone()
        self.bank_a.load_state_dict(state["bank_a"])
        self.bank_b.load_state_dict(state["bank_b"])
