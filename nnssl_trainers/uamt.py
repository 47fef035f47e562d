import torch

from nnssl.ema import update_ema_
from nnssl.losses.uamt import UncertaintyAwareConsistency, uncertainty_threshold
from nnssl.tensors import as_list, unwrap
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.dhc_zoo import DHCEpochRamp
from nnssl.training.passes import NetworkPass
from nnssl.training.step import SSLTerms


class nnUNetTrainerUAMT(DHCEpochRamp, nnUNetTrainerSSLBase):
    """UA-MT, uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019) as DHC's method zoo runs it
    (``xmed-lab/DHC code/train_uamt.py``, launched ``-r -w 0.1``; docs/methods/uamt.md)::

        L = DC+CE(f_s(x_l), y) + λ(e) · Σ[U < τ(e)] (p_s(x_u) - p_t(x_u + ξ))² / (2 Σ[U < τ(e)] + 1e-16)
        U = -Σ_c p̄ log(p̄ + 1e-6),  p̄ = mean of 8 teacher softmaxes of x_u + ξ_t,  ξ = clamp(N(0, 0.1²), ±0.2)
        τ(e) = (0.75 + 0.25 · sigmoid_rampup(e, E)) · ln 2,   λ(e) = 0.1 · sigmoid_rampup(max(e - 1, 0), E)
        θ_t ← α θ_t + (1 - α) θ_s after every step,  α = min(1 - 1/(e + 1), 0.99)   (e = epoch, as DHC)

    Student: ``self.network`` (nnU-Net's DC+CE with deep supervision on the labeled patches, the consistency on the
    full-resolution output of the unlabeled patches); teacher: the declared EMA copy, run in eval mode. DHC steps the
    EMA with the epoch index, so the teacher copies the student during all of epoch 0 and its decay reaches 0.99 at
    epoch 99. Inference uses the **student**. Deviations from ``train_uamt.py`` and why: docs/methods/uamt.md.
    """

    teacher_ema_decay = 0.99
    unsupervised_weight = 0.1
    rampup_epochs: int | None = None  # None: num_epochs (DHC: max_epoch), for λ and τ
    mc_passes: int = 8
    noise_std: float = 0.1
    noise_clip: float = 0.2
    log_prefix = "uamt"
    # the student on the whole batch; the teacher on the noisy unlabeled patches, then mc_passes / 2 forwards of
    # them repeated twice (UncertaintyAwareConsistency, batch_repeat 2)
    network_passes = (NetworkPass("both", True), NetworkPass("unlabeled", False, "teacher"),
                      *(NetworkPass("unlabeled", False, "teacher", batch_factor=2),) * 4)
    supports_regions = False
    unsupported_reason = "the teacher's entropy needs mutually exclusive softmax classes"

    def build_extra_networks(self) -> None:
        self.consistency = UncertaintyAwareConsistency(self.mc_passes, noise_std=self.noise_std,
                                                       noise_clip=self.noise_clip)

    def ramp_length(self) -> int:
        return self.num_epochs if self.rampup_epochs is None else self.rampup_epochs

    def after_optimizer_step(self) -> None:
        """DHC ``update_ema_variables(model, ema_model, 0.99, epoch_num)``: the EMA's step counter is the epoch."""
        update_ema_(unwrap(self.teacher), unwrap(self.network), self.teacher_ema_decay, self.current_epoch)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs = as_list(self.network(torch.cat((data, unlabeled))))
        supervised = self.supervised_loss(outputs, target, n_l)
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(self.consistency.noisy(unlabeled))
            uncertainty = self.consistency.uncertainty(self.teacher, unlabeled)
        threshold = uncertainty_threshold(self.current_epoch, self.ramp_length())
        loss, certain = self.consistency(outputs[0][n_l:], teacher_logits, uncertainty, threshold)
        return SSLTerms(supervised, loss, pseudo_label_logits=(teacher_logits,),
                        extras={"threshold": threshold, "certain_fraction": certain,
                                "mean_uncertainty": uncertainty.mean()})
