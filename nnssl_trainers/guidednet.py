"""GuidedNet (Zhao et al., ACM MM 2024) as nnU-Net v2 trainers: labeled-feature guidance ("3D-CGMM") + KT-CPS
(docs/methods/guidednet.md). The loss terms are in :mod:`nnssl.losses.guidednet` and :mod:`nnssl.gmm`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from nnssl.debiasing import KnowledgeTransferWeighting
from nnssl.gmm import DiagonalGaussianMixture
from nnssl.losses.cps import hard_pseudo_label
from nnssl.losses.guidednet import (
    assemble_guidednet_loss,
    gmm_rectified_pseudo_labels,
    kt_cps_class_weights,
    kt_cps_loss,
    pair_guidance_terms,
)
from nnssl.networks.feature_tap import DecoderFeatureTap, decoder_feature_channels
from nnssl.tensors import argmax_agreement, as_list, class_argmax
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.class_statistics import fold_labeled_class_counts
from nnssl.training.passes import PAIR_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerGuidedNet(nnUNetTrainerSSLBase):
    """GuidedNet: labeled data guide unlabeled data (Zhao et al., ACM MM 2024, Eq. 1-12), as its official code
    (``train_guidedNet_flare.py``, ``utils/tools.py``) computes it (docs/methods/guidednet.md).

    Two networks (``self.network``, He init, used for inference; the declared ``network2``, xavier init), each
    exposing its last decoder feature map ``f`` (:class:`~nnssl.networks.feature_tap.DecoderFeatureTap`). On
    ``[x_l; x_u]``, per network m: labeled class prototypes ``mu_k``, kernel maps ``r_k = exp(-d(f, mu_k)^2)``, GMM
    soft-target losses on labeled and unlabeled voxels and prototype repulsion (``G^m``, :mod:`nnssl.losses.guidednet`,
    :mod:`nnssl.gmm`); ``C`` the cross-network consistency of the labeled kernel maps; KT-CPS with crossed DistDW
    weights of the correctly predicted labeled voxels (EMA 0.99, registered state ``kt_cps``)::

        L = Σ_m [L_sup^m + λ (G^m + w(t) C)] + w(t) L_ktcps,   λ = 0.3,  w(t) = 0.1 · sigmoid_rampup(t, L)

    Logged: the common keys (``loss_unsupervised`` = ``2 λ C + L_ktcps``, the part ``w(t)`` multiplies) and
    ``guidednet_*`` extras. Every deviation from the official code and why: docs/methods/guidednet.md.
    """

    second_network = "xavier"
    guidance_weight: float = 0.3  # lambda ("lanmuda") of the README commands
    unsupervised_weight = 0.1  # "consistency" of the README commands; weight of KT-CPS and C after the ramp
    log_prefix = "guidednet"
    network_passes = PAIR_PASSES
    legacy_state_names = ("kt_cps",)  # nnssl 0.1 checkpoints
    supports_regions = False
    unsupported_reason = "the method needs softmax class probabilities"
    kt_momentum: float = 0.99
    kt_class_weighting: bool = True  # False: every KT-CPS class weight 1 (the _uniformKTCPS ablation)
    prototype_batch_mean: bool = True
    max_voxels_for_maps: int = 2 ** 17  # voxels per patch for kernel maps / GMM losses (131 072 ~ 51^3)

    def build_extra_networks(self) -> None:
        self.feature_taps = (DecoderFeatureTap(self.network), DecoderFeatureTap(self.network2))
        self.num_classes = self.label_manager.num_segmentation_heads
        counts = fold_labeled_class_counts(self)
        self.print_to_log_file(f"KT-CPS initial class histogram (labeled training cases): {counts.tolist()}")
        self.kt_weighting = self.register_state("kt_cps", KnowledgeTransferWeighting(counts, momentum=self.kt_momentum))
        self.build_statistics()

    def build_statistics(self) -> None:
        """Hook for variants that keep more state (the fitted GMM)."""

    def unlabeled_pseudo_labels(self, logits: Sequence[Tensor], features: Sequence[Tensor], labels: Tensor,
                                n_labeled: int) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """Hook: pseudo-labels (N_u, *sp) that replace ``argmax z_u^m`` in KT-CPS (None: keep the argmax), plus
        scalars to log. Gets both nets' full-batch logits and features (labeled first) and the labels."""
        return [None for _ in logits], {}

    def ssl_terms(self, data: Tensor, target, unlabeled: Tensor) -> SSLTerms:
        labels = target[0] if isinstance(target, list) else target  # (N_l, 1, *sp), full resolution
        n_l = data.shape[0]
        inputs = torch.cat((data, unlabeled))
        outputs, features = [], []
        for net, tap in zip((self.network, self.network2), self.feature_taps):
            with tap.capture():
                outputs.append(as_list(net(inputs)))
            features.append(tap.take())
        logits = [out[0] for out in outputs]  # full resolution (N_l + N_u, K, *sp)
        supervised = [self.supervised_loss(out, target, n_l) for out in outputs]

        guidance, kernel_consistency = pair_guidance_terms(logits, features, labels, n_l, self.num_classes,
                                                           self.max_voxels_for_maps, self.prototype_batch_mean)
        w_a, w_b = kt_cps_class_weights(self.kt_weighting, logits[0][:n_l], logits[1][:n_l], labels)
        if not self.kt_class_weighting:
            w_a = w_b = torch.ones_like(w_a)
        pseudo_u, extra_logs = self.unlabeled_pseudo_labels(logits, features, labels, n_l)
        pseudo = [None if p_u is None else torch.cat((hard_pseudo_label(z[:n_l]), p_u))
                  for z, p_u in zip(logits, pseudo_u)]
        kt_cps = kt_cps_loss(logits[0], logits[1], w_a, w_b, pseudo[0], pseudo[1])
        # the official nesting (lam inside, w(t) on C and KT-CPS), summed in its order: L_sup + w L_unsup with
        # L_unsup = 2 lam C + L_ktcps is the same value up to float rounding
        loss = assemble_guidednet_loss(supervised, [g.total for g in guidance], kernel_consistency, kt_cps,
                                       self.guidance_weight, self.current_unsupervised_weight())
        logits_u = (logits[0][n_l:], logits[1][n_l:])
        with torch.no_grad():
            return SSLTerms(
                sum(supervised), 2 * self.guidance_weight * kernel_consistency + kt_cps, pseudo_label_logits=logits_u,
                agreement=argmax_agreement(*logits_u), loss=loss,
                extras={"loss_gmm_labeled": (guidance[0].gmm_labeled + guidance[1].gmm_labeled) / 2,
                        "loss_prototype": (guidance[0].prototype + guidance[1].prototype) / 2,
                        "loss_gmm_unlabeled": (guidance[0].gmm_unlabeled + guidance[1].gmm_unlabeled) / 2,
                        "loss_kernel_consistency": kernel_consistency, "loss_ktcps": kt_cps,
                        "kt_weight_min": w_b.min(), "kt_weight_max": w_b.max(), **extra_logs})


class nnUNetTrainerGuidedNet_noGuidance(nnUNetTrainerGuidedNet):
    """Ablation: λ = 0, so neither the guidance G nor the kernel consistency C acts; KT-CPS alone."""

    guidance_weight = 0.0


class nnUNetTrainerGuidedNet_uniformKTCPS(nnUNetTrainerGuidedNet):
    """Ablation: KT-CPS with every class weight 1 (plain CPS) instead of DistDW on the correct voxels, which gives
    the most frequent class (background) weight 0, so the official KT-CPS never pulls a voxel towards it."""

    kt_class_weighting = False


class nnUNetTrainerGuidedNet_FittedGMM(nnUNetTrainerGuidedNet):
    """GuidedNet with the paper's "3D-CGMM" read literally: per network a fitted class-conditional Gaussian mixture
    over its decoder features (registered state ``gmm``, EM steps on labeled features every iteration, momentum)
    rectifies the unlabeled KT-CPS pseudo-labels to ``argmax_k p_k g_k^s``; the rest is the base trainer, so a
    comparison isolates the rectification (docs/methods/guidednet.md, "Variant"). Extra logs:
    ``gmm_relabeled_fraction`` (unlabeled voxels whose pseudo-label the GMM changed), ``gmm_fitted_classes``.
    """

    gmm_components: int = 3
    gmm_em_steps: int = 3
    gmm_momentum: float = 0.9
    gmm_voxels_per_class: int = 4096
    gmm_rectify_strength: float = 1.0
    gmm_rectify_rule: str = "product"

    def build_statistics(self) -> None:
        channels = decoder_feature_channels(self.network)
        self.gmms = self.register_state("gmm", nn.ModuleList(
            DiagonalGaussianMixture(self.num_classes, channels, self.gmm_components) for _ in range(2)).to(self.device))

    def unlabeled_pseudo_labels(self, logits, features, labels, n_labeled):
        hard, changed = [], []
        for gmm, z, f in zip(self.gmms, logits, features):
            gmm.fit_step(f[:n_labeled], labels, n_em_steps=self.gmm_em_steps, momentum=self.gmm_momentum,
                         max_voxels_per_class=self.gmm_voxels_per_class)
            pseudo, _ = gmm_rectified_pseudo_labels(z[n_labeled:], f[n_labeled:], gmm, self.gmm_rectify_strength,
                                                    self.gmm_rectify_rule)
            hard.append(pseudo)
            changed.append((pseudo != class_argmax(z[n_labeled:].detach())).float().mean())
        logs = {"gmm_relabeled_fraction": torch.stack(changed).mean(),
                "gmm_fitted_classes": self.gmms[0].fitted.float().sum()}
        return hard, logs

    def load_ssl_state_dict(self, state: dict) -> None:
        if "gmm" in state:  # written by nnssl 0.1: a list of the two GMMs' state dicts
            gmm = {f"{i}.{k}": v for i, g in enumerate(state["gmm"]) for k, v in g.items()}
            state = {**state, "extra_state": {**state.get("extra_state", {}), "gmm": gmm}}
        super().load_ssl_state_dict(state)
