"""Weak-to-strong Mean Teacher (nnssl's combination of FixMatch, Mean Teacher and DHC's class weights) and one
ablation variant per component (docs/methods/weak_strong.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from nnssl.debiasing import DistributionAwareWeighting
from nnssl.losses.weak_strong import balanced_voxel_weights, weak_pseudo_labels, weak_to_strong_loss
from nnssl.strong_views import cutmix, intensity_strong_view
from nnssl.tensors import as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.class_statistics import fold_labeled_class_counts
from nnssl.training.passes import TEACHER_PASSES, NetworkPass
from nnssl.training.step import SSLTerms


class nnUNetTrainerWeakStrongMT(nnUNetTrainerSSLBase):
    """Pseudo-labels of an EMA teacher on the weak view supervise the student on a strong view (FixMatch, Sohn et al.,
    NeurIPS 2020, Eq. 2-4; teacher: Tarvainen & Valpola 2017; class weights: DHC DistDW, Wang & Li 2023, Eq. 3)::

        ŷ, m = argmax q, 1[max q ≥ 0.95],  q = softmax(teacher(x_u))              weak view: nnU-Net's patch
        x_s  = CutMix(strong(x_u)),  (ŷ, m, ω) mixed with the same box           strong view: same geometry
        L = DC+CE(z_l, y) + w(t) · mean_v m_v (1 + w_DistDW[ŷ_v]) CE(student(x_s)_v, ŷ_v),   w(t) = 1 · sigmoid ramp
        θ_t ← 0.99 θ_t + 0.01 θ_s after every step

    Inference uses the student. Components (one ablation variant each): the EMA teacher (``_noTeacher``: the
    student's own detached prediction on the weak view, plain FixMatch), the strong intensity view
    (``_noStrongIntensity``), CutMix (``_noCutMix``), the threshold (``_noThreshold``: τ = 0), the class weights
    (``_noClassBalance``). Logged: the common keys (``fraction_above_threshold`` = the kept fraction m) and
    ``ws_class_weight_max``.
    """

    teacher_ema_decay = 0.99
    unsupervised_weight = 1.0  # FixMatch's λ_u
    confidence_threshold = 0.95  # FixMatch's τ; also the threshold the common log counts
    pseudo_labels_from_teacher: bool = True
    strong_intensity: bool = True
    cutmix_probability: float = 0.5  # UniMatch
    class_balance: bool = True
    class_balance_momentum: float = 0.99  # DHC DistDW
    log_prefix = "ws"
    network_passes = TEACHER_PASSES
    supports_regions = False
    unsupported_reason = "hard pseudo-labels need mutually exclusive (softmax) classes"

    def build_extra_networks(self) -> None:
        self.class_weighting = None
        if self.class_balance:
            counts = fold_labeled_class_counts(self)
            self.class_weighting = self.register_state(
                "class_balance", DistributionAwareWeighting(counts, momentum=self.class_balance_momentum))

    def weak_logits(self, unlabeled: Tensor) -> Tensor:
        with torch.no_grad():
            if self.pseudo_labels_from_teacher:
                self.teacher.eval()
                return as_list(self.teacher(unlabeled))[0]
            return as_list(self.network(unlabeled))[0].detach()

    def ssl_terms(self, data: Tensor, target, unlabeled: Tensor) -> SSLTerms:
        n_l = data.shape[0]
        weak_logits = self.weak_logits(unlabeled)
        pseudo, kept = weak_pseudo_labels(weak_logits, self.confidence_threshold)
        weights = kept * balanced_voxel_weights(pseudo, self.class_weighting)
        strong = intensity_strong_view(unlabeled) if self.strong_intensity else unlabeled
        strong, (pseudo, weights), _ = cutmix(strong, (pseudo, weights), p=self.cutmix_probability)
        outputs = as_list(self.network(torch.cat((data, strong))))
        extras = {} if self.class_weighting is None else {"class_weight_max": self.class_weighting.weights.max()}
        return SSLTerms(self.supervised_loss(outputs, target, n_l),
                        weak_to_strong_loss(outputs[0][n_l:], pseudo, weights),
                        pseudo_label_logits=(weak_logits,), extras=extras)


class nnUNetTrainerWeakStrongMT_noTeacher(nnUNetTrainerWeakStrongMT):
    """Plain FixMatch: pseudo-labels from the student's own (detached) prediction on the weak view, no EMA teacher."""

    teacher_ema_decay = None
    pseudo_labels_from_teacher = False
    network_passes = (NetworkPass("both", True), NetworkPass("unlabeled", False, note="the weak view, no grad"))


class nnUNetTrainerWeakStrongMT_noStrongIntensity(nnUNetTrainerWeakStrongMT):
    """No intensity jitter, noise or blur: the student sees the weak view (CutMix still applies)."""

    strong_intensity = False


class nnUNetTrainerWeakStrongMT_noCutMix(nnUNetTrainerWeakStrongMT):
    cutmix_probability = 0.0


class nnUNetTrainerWeakStrongMT_noThreshold(nnUNetTrainerWeakStrongMT):
    """Every voxel's pseudo-label counts (τ = 0)."""

    confidence_threshold = 0.0


class nnUNetTrainerWeakStrongMT_noClassBalance(nnUNetTrainerWeakStrongMT):
    class_balance = False


class nnUNetTrainerWeakStrongMT_unlabeledBatch2x(nnUNetTrainerWeakStrongMT):
    """Twice as many unlabeled as labeled patches per step (e.g. 2 + 4): issue #16's "unlabeled batch" suspect, the
    papers' 2 + 2 to 4 + 4 and FixMatch's larger unlabeled share (mu = 7 on images)."""

    unlabeled_batch_factor = 2
