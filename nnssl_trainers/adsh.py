import torch
from torch import nn

from nnssl.losses.adsh import AdaptiveThresholds, adsh_cps_loss, class_sampling_mask
from nnssl.preprocessing.unlabeled import completed_cases, unlabeled_folder
from nnssl.training.dhc_zoo import DHCZooTrainerBase
from nnssl.training.passes import PAIR_PASSES


class nnUNetTrainerAdsh(DHCZooTrainerBase):
    """Adsh, adaptive thresholding (Guo & Li, "Class-Imbalanced Semi-Supervised Learning with Adaptive Thresholding",
    ICML 2022) on DHC's CPS base, as ``xmed-lab/DHC code/train_adsh.py`` runs it (docs/methods/adsh.md)::

        θ_X: every few steps from a bank of network X's unlabeled softmax scores (n_k hard counts, M the majority
             class): ρ = #{p_M > 0.9} / n_M,  θ_k = sort_desc(p_k over the bank)[int(ρ n_k)];  θ starts at 0
        M_X = 1[softmax(z_X)_k > θ_X,k]                                    per voxel and class, whole batch
        L_u = mean CE(z_A ⊙ M_B, argmax z_B) + mean CE(z_B ⊙ M_A, argmax z_A)   (masked logits set to 0)
        L = DC+CE(z_l^A, y) + DC+CE(z_l^B, y) + λ(e) L_u,   λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    The bank holds ``adsh_bank_size`` unlabeled patches (None: DHC's ``len(unlabeled cases) // 4``, at least 1 and at
    most ``adsh_max_bank_size`` = 16 to bound memory): while it fills, the current thresholds are used; the step after
    it is full recomputes them from the bank alone and empties it. Network A is ``self.network`` (inference), B the
    declared second network (xavier-normal, as the script). Banks and thresholds of both networks are one registered
    state (``extra_state['adsh']``), restored by ``--c``. ``adsh_thresh_major``: 0.9 (the script's value).
    """

    log_prefix = "adsh"
    network_passes = PAIR_PASSES
    adsh_thresh_major: float = 0.9
    adsh_bank_size: int | None = None
    adsh_max_bank_size: int = 16

    def bank_size(self) -> int:
        if self.adsh_bank_size is not None:
            return self.adsh_bank_size
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        return min(max(1, len(completed_cases(folder)) // 4), self.adsh_max_bank_size)

    def build_extra_networks(self) -> None:
        num_classes, size = self.label_manager.num_segmentation_heads, self.bank_size()
        patch = self.configuration_manager.patch_size
        banks = nn.ModuleDict({name: AdaptiveThresholds(num_classes, size, patch, self.adsh_thresh_major)
                               for name in ("a", "b")})
        self.adaptive_thresholds = self.register_state("adsh", banks.to(self.device))
        self.print_to_log_file(f"Adsh: score bank of {size} unlabeled patches per network")

    def unsupervised_terms(self, logits_a: torch.Tensor, logits_b: torch.Tensor, n_labeled: int):
        thresholds_a = self.adaptive_thresholds["a"].step(logits_a[n_labeled:])
        thresholds_b = self.adaptive_thresholds["b"].step(logits_b[n_labeled:])
        mask_a, mask_b = class_sampling_mask(logits_a, thresholds_a), class_sampling_mask(logits_b, thresholds_b)
        loss = adsh_cps_loss(logits_a, logits_b, mask_a, mask_b)
        return loss, (logits_a[n_labeled:], logits_b[n_labeled:]), {
            "threshold_mean_a": thresholds_a.mean(), "threshold_mean_b": thresholds_b.mean(),
            "kept_logits_a": mask_a[n_labeled:].mean(), "kept_logits_b": mask_b[n_labeled:].mean()}
