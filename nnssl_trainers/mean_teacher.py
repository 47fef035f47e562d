import torch

from nnssl.ema import make_ema_teacher, update_ema_
from nnssl.losses.consistency import gaussian_input_noise, softmax_mse_consistency
from nnssl.ramps import sigmoid_rampup
from nnssl_trainers.base import nnUNetTrainerSSLBase, unwrap


class nnUNetTrainerMeanTeacher(nnUNetTrainerSSLBase):
    """Mean Teacher (Tarvainen & Valpola 2017) as SSL4MIS ``train_mean_teacher_3D.py`` runs it
    (docs/methods/mean_teacher.md).

    Student: ``self.network``, trained with nnU-Net's Dice+CE (deep supervision) on the labeled patches plus
    ``w(t) * mean((softmax(student(x_u)) - softmax(teacher(x_u + noise)))^2)`` on the unlabeled patches.
    Teacher: an EMA copy of the student, ``alpha_t = min(1 - 1/(t+1), 0.99)``, parameters only; noise is
    ``clamp(N(0, 0.1^2), -0.2, 0.2)`` on the teacher's input. ``w(t) = 0.1 * sigmoid_rampup(t, L)``.

    Inference (``nnUNetv2_predict -tr nnUNetTrainerMeanTeacher``) uses the **student** (``network_weights``),
    as SSL4MIS evaluates it; the teacher is kept in the checkpoint under ``nnssl_state``.

    Deviations forced by nnU-Net: optimiser, poly lr, patch size, batch size and augmentation are nnU-Net's
    (SSL4MIS: SGD 0.01, 96^3, 2+2); the consistency is applied to the full-resolution output only (no method
    uses deep supervision for its SSL term); the ramp length is 30 000 iterations as in SSL4MIS
    (``iter // 150`` with L=200) but at most 40 % of the schedule, so short schedules reach the full weight.
    Set ``consistency_on_labeled = True`` (variant ``nnUNetTrainerMeanTeacher_consistencyAll``) to apply the
    consistency to labeled patches too.
    """

    ema_decay: float = 0.99
    consistency_weight: float = 0.1
    noise_std: float = 0.1
    noise_clip: float = 0.2
    consistency_on_labeled: bool = False

    def build_extra_networks(self) -> None:
        teacher = make_ema_teacher(unwrap(self.network))
        unwrap_teacher = unwrap(teacher)
        unwrap_teacher.decoder.deep_supervision = False  # the teacher's full-resolution output is all we need
        self.register_extra_network("teacher", teacher, trainable=False)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.extra_networks["teacher"]

    def pseudo_label_network(self) -> torch.nn.Module:
        return self.teacher

    def current_consistency_weight(self) -> float:
        return self.consistency_weight * sigmoid_rampup(self.global_iteration, self.rampup_length())

    def train_step(self, batch: dict) -> dict:
        data, target, unlabeled = self.to_device(batch)
        n_l = data.shape[0]
        self.zero_grad()
        weight = self.current_consistency_weight()
        with self.autocast():
            outputs = self.network(torch.cat((data, unlabeled)))
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            supervised = self.loss([o[:n_l] for o in outputs] if self.enable_deep_supervision else outputs[0][:n_l],
                                   target)
            consistency_input = torch.cat((data, unlabeled)) if self.consistency_on_labeled else unlabeled
            with torch.no_grad():
                self.teacher.eval()
                teacher_logits = self.teacher(gaussian_input_noise(consistency_input, self.noise_std,
                                                                   self.noise_clip))
            student_logits = outputs[0] if self.consistency_on_labeled else outputs[0][n_l:]
            consistency = softmax_mse_consistency(student_logits, teacher_logits)
            loss = supervised + weight * consistency
        self.backward_and_step(loss)
        update_ema_(unwrap(self.teacher), unwrap(self.network), self.ema_decay, self.global_iteration)
        self.global_iteration += 1
        logged = torch.cat((torch.stack((supervised.detach().float(), consistency.detach().float())),
                            self.confidence_stats(teacher_logits))).cpu().tolist()
        return {"loss": loss.detach().cpu().numpy(), "loss_supervised": logged[0], "loss_consistency": logged[1],
                "consistency_weight": weight, "teacher_confidence": logged[2], "fraction_above_threshold": logged[3]}


class nnUNetTrainerMeanTeacher_consistencyAll(nnUNetTrainerMeanTeacher):
    consistency_on_labeled = True
