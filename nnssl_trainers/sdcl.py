"""SDCL (Song & Wang, MICCAI 2024) on BCP bidirectional copy-paste as nnU-Net v2 trainers (docs/methods/sdcl.md)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nnssl.ema import make_ema_teacher, update_teacher_
from nnssl.losses.sdcl import SDCLStages, discrepancy_mask, sdcl_student_loss, teacher_pseudo_labels
from nnssl.mixing import random_bidirectional_copy_paste_ds, random_labeled_copy_paste
from nnssl.networks.second_student import RESENC_M_BLOCKS, build_second_student
from nnssl.tensors import as_list, unwrap
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.optimizers import ConstantLRAdam
from nnssl.training.passes import NetworkPass
from nnssl.training.step import SSLTerms


class nnUNetTrainerSDCL(nnUNetTrainerSSLBase):
    """SDCL, students discrepancy-informed correction learning (Song & Wang, MICCAI 2024, Eq. 1-6), on BCP's
    bidirectional copy-paste (docs/methods/sdcl.md).

    Networks: student 1 ``self.network`` (the plans' U-Net, used for inference), student 2 ``network2`` of the other
    architecture with the same stages (plain <-> residual encoder, :mod:`nnssl.networks.second_student`), and an
    EMA ``teacher`` of student 1 (constant decay 0.99, after every stage-2 step). One trainer, two stages switched
    at epoch ``round(0.2 · num_epochs)`` (``pretrain_fraction``, ``pretrain_epochs``; saved in the checkpoint):

        stage 1 (BCP pre-training, labeled only): X = L_a ⊙ M + L_b ⊙ (1 − M), each student on DC+CE of the mixed label
        stage 2: PL = argmax teacher(U);  X_l = U_a ⊙ M + L_b ⊙ (1 − M),  X_u = L_a ⊙ M + U_b ⊙ (1 − M)
                 D = 1[argmax z¹ ≠ argmax z²];  per student s:
                 L_s = mix(X_l) + mix(X_u) + λ_mse Σ_X L_mse(X) + λ_kl Σ_X L_kl(X),   λ_mse 0.5, λ_kl 0.05

    ``mix`` is BCP's region-weighted (Dice + CE) / 2 (ω = 0.5 on pseudo-labelled, 1 on ground-truth voxels) over
    nnU-Net's deep-supervision outputs; the corrections use the full-resolution output. One backward of L_1 + L_2.

    Logged: the common keys (``loss_unsupervised`` = both students' corrections, the λ inside), ``sdcl_stage``,
    ``sdcl_loss_mse`` / ``sdcl_loss_kl`` (student 1). Deviations from the official code: docs/methods/sdcl.md.
    """

    ema_decay: float = 0.99
    mse_weight: float = 0.5
    kl_weight: float = 0.05
    labeled_region_weight: float = 1.0
    unlabeled_region_weight: float = 0.5
    mask_ratio: float = 2 / 3
    pretrain_fraction: float = 0.2
    pretrain_epochs: int | None = None
    pseudo_label_largest_component: bool = False
    student2_blocks_per_stage: Sequence[int] | int = 1
    student2_convs_per_stage: Sequence[int] | int = 2

    log_prefix = "sdcl"
    # stage 2 (self-training; nnssl_speed measures mid-schedule): both students on the two mixes (2 max(N_l, N_u)
    # rows: the whole batch when N_l = N_u), the teacher on the unlabeled patches
    network_passes = (NetworkPass("both", True), NetworkPass("both", True, "network2"),
                      NetworkPass("unlabeled", False, "teacher"))
    legacy_network_names = {"student2": "network2"}
    legacy_state_groups = {"sdcl": ("sdcl_stage", "sdcl_self_training_start_epoch")}
    supports_regions = False
    supports_ignore_label = False
    unsupported_reason = "SDCL's copy-paste targets and losses need plain softmax classes with every voxel labelled"

    def initialize(self):
        if self.was_initialized:
            return
        super().initialize()
        self.stages = self.register_state("sdcl", SDCLStages.for_schedule(
            self.num_epochs, self.pretrain_fraction, self.pretrain_epochs, self.print_to_log_file))

    def build_extra_networks(self) -> None:
        cm = self.configuration_manager
        student2 = build_second_student(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                        cm.network_arch_init_kwargs_req_import, self.num_input_channels,
                                        self.label_manager.num_segmentation_heads, self.enable_deep_supervision,
                                        self.student2_blocks_per_stage, self.student2_convs_per_stage)
        self.register_extra_network("network2", student2.to(self.device), trainable=True)
        teacher = make_ema_teacher(self.network)
        teacher.decoder.deep_supervision = False  # pseudo-labels come from the full-resolution output only
        self.register_extra_network("teacher", teacher, trainable=False)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.stages.begin_self_training_if_due(self.current_epoch):
            # the teacher becomes a copy of student 1 (official: student 1's pre-train weights)
            unwrap(self.teacher).load_state_dict(unwrap(self.network).state_dict())

    def current_unsupervised_weight(self) -> float:
        return 0.0 if self.stages.stage == 1 else 1.0  # the λ of SDCL's corrections are inside its loss

    def ssl_terms(self, data: Tensor, target, unlabeled: Tensor) -> SSLTerms:
        if self.stages.stage == 1:
            return self.pretrain_terms(data, as_list(target))
        return self.self_training_terms(data, as_list(target), unlabeled)

    def pretrain_terms(self, data: Tensor, targets: list[Tensor]) -> SSLTerms:
        mixed = random_labeled_copy_paste(data, targets, self.mask_ratio)
        supervision, n = (mixed.targets if self.enable_deep_supervision else mixed.targets[0]), data.shape[0]
        out1, out2 = as_list(self.network(mixed.images)), as_list(self.network2(mixed.images))
        loss = self.supervised_loss(out1, supervision, n) + self.supervised_loss(out2, supervision, n)
        with torch.no_grad():
            agreement = 1 - discrepancy_mask(out1[0], out2[0]).float().mean()
        return SSLTerms(loss, torch.zeros_like(loss.detach()), agreement=agreement, loss=loss, extras={"stage": 1.0})

    def self_training_terms(self, data: Tensor, targets: list[Tensor], unlabeled: Tensor) -> SSLTerms:
        with torch.no_grad():
            teacher_logits = self.teacher(unlabeled)
        pseudo_labels, _ = teacher_pseudo_labels(teacher_logits, self.pseudo_label_largest_component)
        mixed_l, mixed_u = random_bidirectional_copy_paste_ds(data, targets, unlabeled, pseudo_labels, self.mask_ratio,
                                                              self.labeled_region_weight, self.unlabeled_region_weight)
        images = torch.cat((mixed_l.images, mixed_u.images))
        out1, out2 = as_list(self.network(images)), as_list(self.network2(images))
        disc = discrepancy_mask(out1[0], out2[0])
        loss1, loss2 = (sdcl_student_loss(out, (mixed_l, mixed_u), disc, self.deep_supervision_weights(),
                                          self.mse_weight, self.kl_weight) for out in (out1, out2))
        loss = loss1.total + loss2.total
        with torch.no_grad():
            return SSLTerms(loss1.mix + loss2.mix, loss - loss1.mix - loss2.mix, pseudo_label_logits=(teacher_logits,),
                            agreement=1 - disc.float().mean(), loss=loss,
                            extras={"loss_mse": loss1.mse, "loss_kl": loss1.kl, "stage": 2.0})

    def after_optimizer_step(self) -> None:
        if self.stages.stage == 2:  # BCP/SDCL: constant decay, no warm-up
            update_teacher_(self.teacher, self.network, self.ema_decay)


class nnUNetTrainerSDCL_pancreas(nnUNetTrainerSDCL):
    """SDCL with the Pancreas-CT correction weights (``Pancreas_train.py``): λ_mse = 0.3, λ_kl = 0.1."""

    mse_weight = 0.3
    kl_weight = 0.1


class nnUNetTrainerSDCL_lcc(nnUNetTrainerSDCL):
    """SDCL with the official LA/Pancreas pseudo-label filter: largest connected component per foreground class."""

    pseudo_label_largest_component = True


class nnUNetTrainerSDCL_resencM(nnUNetTrainerSDCL):
    """SDCL whose residual student 2 has nnU-Net ResEnc-M's blocks per stage (1, 3, 4, 6, 6, ...)."""

    student2_blocks_per_stage = RESENC_M_BLOCKS


class nnUNetTrainerSDCL_adam(ConstantLRAdam, nnUNetTrainerSDCL):
    """SDCL with the official optimiser: Adam (default betas, no weight decay), constant lr 1e-3, for both students
    and both stages."""
