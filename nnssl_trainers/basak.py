import torch

from nnssl.ema import update_ema_
from nnssl.losses.class_sampling import FuzzyRankSamplingRates, class_sampling_map, sampled_cross_entropy
from nnssl.losses.cps import hard_pseudo_label
from nnssl.tensors import argmax_agreement, as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.dhc_zoo import DHCEpochRamp
from nnssl.training.passes import TEACHER_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerBasak(DHCEpochRamp, nnUNetTrainerSSLBase):
    """Basak et al., class-imbalance-aware sampling for a mean teacher ("Addressing Class Imbalance in
    Semi-supervised Image Segmentation: A Study on Cardiac MRI", MICCAI 2022), as DHC's method zoo runs it
    (``xmed-lab/DHC code/train_acisis.py``; docs/methods/basak.md). Per iteration, on ``x = [x_l; x_u]``::

        statistics of the student's labeled softmax per true class: "entropy", confidence, max-gap
        every epoch: X = softmax_K(statistics / iterations), R = 1 − exp(−exp(−2X)) (top 12 ranks kept),
            CC ← 0.99 CC + 0.01 · CCF·FR / max(CCF·FR),   sr = ((1 − CC)/max(1 − CC))^2.5   (sr = 1 until then)
        M(v) = [u(v) > 1 − sr_{ŷ_s(v)}] · (max_k p_s(v))^1.5,   ŷ_s, p_s: the student's own unlabeled prediction
        L = DC+CE(z_l, y) + λ(e) · mean_v CE(z_u, argmax z_u^teacher) · M
        θ_t ← α θ_t + (1 − α) θ_s,  α = min(1 − 1/(e + 1), 0.99) with e the EPOCH (DHC's step counter)
        λ(e) = 0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)

    One network (``self.network``, predicts) with nnU-Net's DC+CE and deep supervision, and the declared EMA
    teacher on the unlabeled patches (train mode, as DHC). The statistics, ``CC`` and the rates are registered state
    (``extra_state['basak']``). Library: :class:`nnssl.losses.class_sampling.FuzzyRankSamplingRates`. Deviations
    where DHC's code breaks (fewer than 12 classes; masks broadcast across the batch): docs/methods/basak.md.
    """

    teacher_ema_decay = 0.99
    unsupervised_weight = 0.1  # DHC launch config -w 0.1 (the script's default is 1)
    log_prefix = "basak"
    network_passes = TEACHER_PASSES
    supports_regions = False
    supports_ignore_label = False
    unsupported_reason = "per-class statistics and sampling of hard pseudo-labels need plain label classes"
    consensus_momentum: float = 0.99
    top_ranks: int = 12
    sampling_gamma: float = 2.5
    confidence_exponent: float = 1.5

    def build_extra_networks(self) -> None:
        # DHC: ConfidenceArray(update_iter=len(unlabeled_loader)), i.e. one update per epoch
        self.sampling = self.register_state("basak", FuzzyRankSamplingRates(
            self.label_manager.num_segmentation_heads, self.num_iterations_per_epoch, self.consensus_momentum,
            self.top_ranks, self.sampling_gamma))

    def after_optimizer_step(self) -> None:
        """DHC ``update_ema_variables(model, ema_model, 0.99, epoch_num)``: the epoch is the EMA step, so the
        teacher copies the student during epoch 0 and ``α = min(1 − 1/(e + 1), 0.99)`` after."""
        update_ema_(self.teacher, self.network, self.teacher_ema_decay, self.current_epoch)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs = as_list(self.network(torch.cat((data, unlabeled))))
        supervised = self.supervised_loss(outputs, target, n_l)
        student = outputs[0][n_l:]
        with torch.no_grad():
            teacher = self.teacher(unlabeled)
        rates = self.sampling.record(outputs[0][:n_l], target[0] if isinstance(target, list) else target)
        confidence = torch.softmax(student.detach().float(), dim=1).amax(1) ** self.confidence_exponent
        sample_map = class_sampling_map(student, rates) * confidence
        loss = sampled_cross_entropy(student, hard_pseudo_label(teacher), sample_map)
        return SSLTerms(supervised, loss, pseudo_label_logits=(teacher,), agreement=argmax_agreement(student, teacher),
                        extras={"sampled_fraction": (sample_map > 0).float().mean()})
