import torch

from nnssl.losses.consistency import gaussian_input_noise, softmax_mse_consistency
from nnssl.tensors import as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.passes import TEACHER_PASSES, NetworkPass
from nnssl.training.step import SSLTerms


class nnUNetTrainerMeanTeacher(nnUNetTrainerSSLBase):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, Eq. 1 and Sec. 3) as SSL4MIS ``train_mean_teacher_3D.py``
    runs it (docs/methods/mean_teacher.md)::

        L = DC+CE(f_s(x_l), y) + w(t) · mean((softmax f_s(x_u) - softmax f_t(x_u + ξ))²)
        θ_t ← α_t θ_t + (1 - α_t) θ_s,   α_t = min(1 - 1/(t+1), 0.99)    (parameters only)
        ξ = clamp(N(0, 0.1²), -0.2, 0.2),   w(t) = 0.1 · sigmoid_rampup(t, L)

    Student: ``self.network`` (nnU-Net's Dice+CE with deep supervision on the labeled patches); teacher: the
    declared EMA copy. Inference (``nnUNetv2_predict -tr nnUNetTrainerMeanTeacher``) uses the **student**
    (``network_weights``), as SSL4MIS evaluates it; the teacher is in the checkpoint under ``nnssl_state``.

    Deviations forced by nnU-Net: optimiser, poly lr, patch and batch size and augmentation are nnU-Net's (SSL4MIS:
    SGD 0.01, 96^3, 2+2); the consistency uses the full-resolution output only; the ramp is SSL4MIS's 30 000
    iterations (``iter // 150`` with L=200) but at most 40 % of the schedule. ``consistency_on_labeled = True``
    (variant ``nnUNetTrainerMeanTeacher_consistencyAll``) applies the consistency to labeled patches too.
    """

    teacher_ema_decay = 0.99
    unsupervised_weight = 0.1
    noise_std: float = 0.1
    noise_clip: float = 0.2
    consistency_on_labeled: bool = False
    log_prefix = "mt"
    network_passes = TEACHER_PASSES

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs = as_list(self.network(torch.cat((data, unlabeled))))
        supervised = self.supervised_loss(outputs, target, n_l)
        consistency_input = torch.cat((data, unlabeled)) if self.consistency_on_labeled else unlabeled
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(gaussian_input_noise(consistency_input, self.noise_std, self.noise_clip))
        student_logits = outputs[0] if self.consistency_on_labeled else outputs[0][n_l:]
        return SSLTerms(supervised, softmax_mse_consistency(student_logits, teacher_logits),
                        pseudo_label_logits=(teacher_logits,))


class nnUNetTrainerMeanTeacher_consistencyAll(nnUNetTrainerMeanTeacher):
    consistency_on_labeled = True
    network_passes = (NetworkPass("both", True), NetworkPass("both", False, "teacher"))


class nnUNetTrainerMeanTeacher_unsupWeight0p2(nnUNetTrainerMeanTeacher):
    """Mean Teacher at twice the paper's consistency weight (0.2): nnU-Net's supervised Dice+CE (weights 1 + 1) is
    about twice SSL4MIS's 0.5 (CE + Dice), so 0.2 restores the paper's ratio of the two terms (issue-16 ablation,
    docs/methods/mean_teacher.md)."""

    unsupervised_weight = 0.2
