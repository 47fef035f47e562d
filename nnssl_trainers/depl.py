import torch
from torch import nn

from nnssl.losses.depl import DebiasedPseudoLabels
from nnssl.losses.masked_ce import masked_cps_loss
from nnssl.training.dhc_zoo import DHCZooTrainerBase
from nnssl.training.passes import PAIR_PASSES


class nnUNetTrainerDePL(DHCZooTrainerBase):
    """DePL, debiased pseudo-labels (Wang, Wu, Lian & Yu, "Debiased Learning from Naturally Imbalanced
    Pseudo-Labels", CVPR 2022) on DHC's CPS base, as ``xmed-lab/DHC code/train_depl.py`` runs it
    (docs/methods/depl.md)::

        q̃_X = softmax(sg(z_X) − log q̂_X),  ŷ_X = argmax q̃_X,  m_X = [max q̃_X ≥ 0.9]      X ∈ {A, B}, whole batch
        L_u = mean(CE(z_A, ŷ_B)·m_B) + mean(CE(z_B, ŷ_A)·m_A)          mean over all voxels of [x_l; x_u]
        q̂_X ← 0.99 q̂_X + 0.01 · mean_{x_u} softmax(z_X)                 after the pseudo-labels (per voxel)
        L = DC+CE(z_l^A, y) + DC+CE(z_l^B, y) + λ(e) L_u,   λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    Network A is ``self.network`` (nnU-Net's kaiming init; inference uses A), B the declared second network
    re-initialised xavier-normal as the script does; ``q̂`` has one output patch's shape ``(1, K, *patch)``, starts at
    ``1/K`` and both priors are one registered state (``extra_state['depl']``), restored by ``--c``.
    Defaults: τ = 1 (``depl_tau``), threshold 0.9 (``depl_threshold``), momentum 0.99 (``depl_momentum``).
    """

    log_prefix = "depl"
    network_passes = PAIR_PASSES
    depl_tau: float = 1.0
    depl_threshold: float = 0.9
    depl_momentum: float = 0.99
    confidence_threshold = 0.9

    def build_extra_networks(self) -> None:
        num_classes = self.label_manager.num_segmentation_heads
        patch = self.configuration_manager.patch_size
        priors = nn.ModuleDict({name: DebiasedPseudoLabels(num_classes, patch, self.depl_momentum, self.depl_tau,
                                                           self.depl_threshold) for name in ("a", "b")})
        self.debiasing = self.register_state("depl", priors.to(self.device))

    def unsupervised_terms(self, logits_a: torch.Tensor, logits_b: torch.Tensor, n_labeled: int):
        prior_a, prior_b = self.debiasing["a"], self.debiasing["b"]
        target_a, mask_a = prior_a.pseudo_labels(logits_a)  # q̂ from before this step's update, as DHC
        target_b, mask_b = prior_b.pseudo_labels(logits_b)
        debiased = (prior_a.debiased_logits(logits_a[n_labeled:]), prior_b.debiased_logits(logits_b[n_labeled:]))
        prior_a.update(logits_a[n_labeled:])
        prior_b.update(logits_b[n_labeled:])
        loss = masked_cps_loss(logits_a, logits_b, target_a, target_b, mask_a, mask_b)
        return loss, debiased, {
            "mask_fraction_a": mask_a[n_labeled:].mean(), "mask_fraction_b": mask_b[n_labeled:].mean()}
