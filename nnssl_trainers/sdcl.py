"""SDCL (Song & Wang, MICCAI 2024) on BCP bidirectional copy-paste as nnU-Net v2 trainers (docs/methods/sdcl.md).

The trainer :class:`nnUNetTrainerSDCL` documents the method, its defaults and every deviation. The module-level
functions are the pieces its ``train_step`` is made of (second-student architecture, batch pairing, copy-paste
with deep-supervision targets, per-student loss), kept outside the class so that they can be tested alone.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import Tensor, nn

from nnssl.ema import update_ema_
from nnssl.losses.sdcl import (
    discrepancy_mask,
    discrepancy_mse_loss,
    discrepancy_uniform_ce_loss,
    mixed_region_loss,
)
from nnssl.mixing import bcp_mask, bcp_mix, bcp_mix_targets, bcp_region_weights, bidirectional_copy_paste
from nnssl_trainers.base import nnUNetTrainerSSLBase, unwrap

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net ResEnc-M/L blocks per encoder stage (the list is truncated / extended with its last value)
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6)
# update_ema_ warms the decay up as min(1 - 1/(step+1), decay); SDCL/BCP use the constant decay from the first
# step, which this step value reaches for any decay below 1 - 1e-9
CONSTANT_DECAY_STEP = 10**9


# ---------------------------------------------------------------------------------------------------- networks
def _per_stage(values: Sequence[int] | int, n_stages: int, name: str) -> list[int]:
    values = [int(values)] * n_stages if isinstance(values, int) else [int(v) for v in values]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name}: expected positive integers, got {values}")
    return (values + [values[-1]] * n_stages)[:n_stages]


def second_student_architecture(arch_class_name: str, arch_kwargs: dict,
                                blocks_per_stage: Sequence[int] | int = 1,
                                convs_per_stage: Sequence[int] | int = 2) -> tuple[str, dict]:
    """Class name and kwargs of student 2: the other one of (plain, residual-encoder) U-Net with the plans' stages.

    Stages, features, kernel sizes, strides, decoder, norm, nonlinearity and dropout are the plans'. A plain U-Net
    becomes a ``ResidualEncoderUNet`` with ``blocks_per_stage`` residual blocks per encoder stage (1 = the depth of
    nnU-Net's two-conv plain stage; ``RESENC_M_BLOCKS`` = nnU-Net ResEnc-M); a residual one becomes a
    ``PlainConvUNet`` with ``convs_per_stage`` convolutions per stage. Sequences are truncated / extended with their
    last value to ``n_stages``.
    """
    if "n_stages" not in arch_kwargs:
        raise ValueError(f"arch_kwargs: no 'n_stages' in the plans' architecture kwargs ({sorted(arch_kwargs)})")
    n_stages = int(arch_kwargs["n_stages"])
    kwargs = dict(arch_kwargs)
    short_name = arch_class_name.rsplit(".", 1)[-1]
    if short_name == "PlainConvUNet":
        kwargs.pop("n_conv_per_stage", None)
        kwargs.pop("nonlin_first", None)
        kwargs["n_blocks_per_stage"] = _per_stage(blocks_per_stage, n_stages, "blocks_per_stage")
        return RESIDUAL_UNET, kwargs
    if short_name == "ResidualEncoderUNet":
        for key in ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"):
            kwargs.pop(key, None)
        kwargs["n_conv_per_stage"] = _per_stage(convs_per_stage, n_stages, "convs_per_stage")
        return PLAIN_UNET, kwargs
    raise ValueError(f"SDCL needs a second student of a different architecture, but the plans' network "
                     f"{arch_class_name!r} is neither PlainConvUNet nor ResidualEncoderUNet")


def build_second_student(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                         num_input_channels: int, num_output_channels: int, deep_supervision: bool,
                         blocks_per_stage: Sequence[int] | int = 1, convs_per_stage: Sequence[int] | int = 2
                         ) -> nn.Module:
    """Student 2 from the plans' architecture entry (see :func:`second_student_architecture`), He-initialised by
    nnU-Net's ``get_network_from_plans``."""
    name, kwargs = second_student_architecture(arch_class_name, arch_kwargs, blocks_per_stage, convs_per_stage)
    req_import = [k for k in arch_kwargs_req_import if k in kwargs]
    return get_network_from_plans(name, kwargs, req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=deep_supervision)


@torch.no_grad()
def update_teacher_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``θ_T ← decay · θ_T + (1 − decay) · θ_S`` with a constant decay (BCP/SDCL ``update_ema_variables``)."""
    update_ema_(teacher, student, decay, CONSTANT_DECAY_STEP)


# ---------------------------------------------------------------------------------------------------- mixing
def rolled_pairs(n_mixes: int, batch_size: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(a, b)`` of the samples a batch contributes to ``n_mixes`` copy-paste pairs.

    ``a[i] = i mod B`` and ``b[i] = (i − 1) mod B``: the batch paired with itself rolled by one, so every sample is
    used as a and as b, ``a[i] ≠ b[i]`` whenever ``B > 1``, and ``B = 1`` pairs the sample with itself.
    """
    if n_mixes < 1 or batch_size < 1:
        raise ValueError(f"rolled_pairs: n_mixes and batch_size must be >= 1, got {n_mixes}, {batch_size}")
    i = torch.arange(n_mixes, device=device)
    return i % batch_size, (i - 1) % batch_size


def label_volume(labels: Tensor, spatial_dims: int, name: str = "labels") -> Tensor:
    """Integer labels (N, *spatial) or (N, 1, *spatial) in nnU-Net's target layout (N, 1, *spatial), long."""
    if labels.ndim == spatial_dims + 1:
        labels = labels.unsqueeze(1)
    if labels.ndim != spatial_dims + 2 or labels.shape[1] != 1:
        raise ValueError(f"{name}: expected (N, 1, *spatial) or (N, *spatial) with {spatial_dims} spatial dims, "
                         f"got shape {tuple(labels.shape)}")
    return (labels.round() if labels.is_floating_point() else labels).long()


def downsample_nearest(x: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """(N, C, *spatial) or (*spatial) resized with nearest-exact interpolation (nnU-Net's deep-supervision label
    downsampling, ``DownsampleSegForDSTransform``); the dtype is kept."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if tuple(x.shape[-len(spatial_shape):]) == spatial_shape:
        return x
    batched = x if x.ndim == len(spatial_shape) + 2 else x[None, None]
    out = F.interpolate(batched.float(), spatial_shape, mode="nearest-exact").to(x.dtype)
    return out if x.ndim == len(spatial_shape) + 2 else out[0, 0]


class MixedBatch(NamedTuple):
    """One copy-pasted batch: the image and, per deep-supervision output, target, region weight ω and mask M."""

    images: Tensor  # (n, C, *spatial)
    targets: list[Tensor]  # per output (n, 1, *spatial_i), long
    weights: list[Tensor]  # per output (n, *spatial_i), float32
    masks: list[Tensor]  # per output (*spatial_i): M (1 = region of the "a" sample)


def labeled_copy_paste(images: Tensor, targets: Sequence[Tensor], mask: Tensor, pairs: tuple[Tensor, Tensor]
                       ) -> MixedBatch:
    """Stage-1 mix (docs/methods/sdcl.md): ``X = L_a ⊙ M + L_b ⊙ (1 − M)``, ``Y_i = GT_a,i ⊙ M_i + GT_b,i ⊙ (1 − M_i)``
    for every deep-supervision target ``i`` (``M_i`` = M downsampled like the labels); weights are 1."""
    a, b = pairs
    out_targets, out_weights, out_masks = [], [], []
    for target in targets:
        gt = label_volume(target, mask.ndim, "targets")
        m = downsample_nearest(mask, gt.shape[2:])
        out_targets.append(bcp_mix_targets(gt[a], gt[b], m))
        out_weights.append(bcp_region_weights(m, 1.0, 1.0, len(a)))
        out_masks.append(m)
    return MixedBatch(bcp_mix(images[a], images[b], mask), out_targets, out_weights, out_masks)


def bidirectional_copy_paste_ds(labeled: Tensor, labeled_targets: Sequence[Tensor], unlabeled: Tensor,
                                pseudo_labels: Tensor, mask: Tensor, labeled_pairs: tuple[Tensor, Tensor],
                                unlabeled_pairs: tuple[Tensor, Tensor], labeled_weight: float = 1.0,
                                unlabeled_weight: float = 0.5) -> tuple[MixedBatch, MixedBatch]:
    """Stage-2 BCP mixes (docs/methods/sdcl.md) ``(X_l, X_u)`` with targets and weights for every deep-supervision
    output.

    Full resolution is :func:`nnssl.mixing.bidirectional_copy_paste`; for the lower outputs the pseudo-labels and M
    are downsampled with nearest-exact interpolation (as nnU-Net downsamples labels) and mixed with nnU-Net's
    downsampled ground truth, which equals downsampling the full-resolution mixed target.

    Args:
        labeled: (N_l, C, *spatial); labeled_targets: nnU-Net's targets, full resolution first, (N_l, 1, *sp_i).
        unlabeled: (N_u, C, *spatial); pseudo_labels: (N_u, *spatial) or (N_u, 1, *spatial).
        mask: (*spatial) from :func:`nnssl.mixing.bcp_mask`.
        labeled_pairs / unlabeled_pairs: ``(a, b)`` index tensors of equal length n (:func:`rolled_pairs`).
    """
    la, lb = labeled_pairs
    ua, ub = unlabeled_pairs
    if len(la) != len(ua):
        raise ValueError(f"unlabeled_pairs: {len(ua)} pairs but labeled_pairs has {len(la)}")
    gts = [label_volume(t, mask.ndim, "labeled_targets") for t in labeled_targets]
    pl = label_volume(pseudo_labels, mask.ndim, "pseudo_labels")
    if pl.shape[2:] != gts[0].shape[2:]:
        raise ValueError(f"pseudo_labels: spatial shape {tuple(pl.shape[2:])} != labeled_targets[0] "
                         f"{tuple(gts[0].shape[2:])}")
    full = bidirectional_copy_paste(labeled[la], labeled[lb], unlabeled[ua], unlabeled[ub], gts[0][la], gts[0][lb],
                                    pl[ua], pl[ub], mask, labeled_weight, unlabeled_weight)
    mixed_l = MixedBatch(full.x_l, [full.y_l], [full.weight_l], [mask])
    mixed_u = MixedBatch(full.x_u, [full.y_u], [full.weight_u], [mask])
    n = len(la)
    for gt in gts[1:]:
        shape = gt.shape[2:]
        m = downsample_nearest(mask, shape)
        pl_i = downsample_nearest(pl, shape)
        mixed_l.targets.append(bcp_mix_targets(pl_i[ua], gt[lb], m))
        mixed_l.weights.append(bcp_region_weights(m, unlabeled_weight, labeled_weight, n))
        mixed_l.masks.append(m)
        mixed_u.targets.append(bcp_mix_targets(gt[la], pl_i[ub], m))
        mixed_u.weights.append(bcp_region_weights(m, labeled_weight, unlabeled_weight, n))
        mixed_u.masks.append(m)
    return mixed_l, mixed_u


# ---------------------------------------------------------------------------------------------------- losses
@torch.no_grad()
def teacher_pseudo_labels(logits: Tensor, keep_largest_component: bool = False) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels ``argmax_k softmax(z)_k`` (N, *spatial) and the mean max-probability (confidence).

    With ``keep_largest_component`` each foreground class keeps only its largest connected component per sample
    (official LA/Pancreas filter; MONAI ``KeepLargestConnectedComponent``), removed voxels become background.
    """
    probs = torch.softmax(logits.detach().float(), 1)
    confidence, labels = probs.max(1)
    if keep_largest_component:
        from monai.transforms import KeepLargestConnectedComponent

        filt = KeepLargestConnectedComponent(applied_labels=list(range(1, logits.shape[1])), is_onehot=False,
                                             independent=True)
        labels = torch.stack([torch.as_tensor(filt(lab[None]))[0] for lab in labels]).to(labels)
    return labels, confidence.mean()


def deep_supervised_mix_loss(outputs: Sequence[Tensor], mixed: MixedBatch, ds_weights: Sequence[float]) -> Tensor:
    """``Σ_i w_i · mix(z_i, Y_i, ω_i, M_i)`` over the deep-supervision outputs (BCP ``mix_loss``, docs/methods/sdcl.md)
    with nnU-Net's weights ``w_i`` (outputs with weight 0 are skipped)."""
    if len(outputs) != len(mixed.targets) or len(ds_weights) < len(outputs):
        raise ValueError(f"outputs: {len(outputs)} deep-supervision outputs for {len(mixed.targets)} targets and "
                         f"{len(ds_weights)} weights")
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for z, y, w, m, weight in zip(outputs, mixed.targets, mixed.weights, mixed.masks, ds_weights):
        if weight != 0:
            total = total + weight * mixed_region_loss(z, y, w, region_mask=m)
    return total


class SDCLStudentLoss(NamedTuple):
    total: Tensor
    mix: Tensor
    mse: Tensor
    kl: Tensor


def sdcl_student_loss(outputs: Sequence[Tensor], mixes: Sequence[MixedBatch], disc: Tensor,
                      ds_weights: Sequence[float], mse_weight: float, kl_weight: float) -> SDCLStudentLoss:
    """One student's stage-2 loss (docs/methods/sdcl.md):
    ``L = Σ_X mix(X) + λ_mse Σ_X L_mse(X) + λ_kl Σ_X L_kl(X)`` over the mixes X ∈ ``mixes`` (X_l, X_u).

    Args:
        outputs: the student's deep-supervision logits on ``cat(mix.images for mix in mixes)`` (full resolution
            first); the correction losses use ``outputs[0]``.
        disc: D (n_total, *spatial) from :func:`nnssl.losses.sdcl.discrepancy_mask` on the full-resolution logits
            of the two students.
    """
    mix = mse = kl = outputs[0].new_zeros((), dtype=torch.float32)
    start = 0
    for mixed in mixes:
        part = slice(start, start + mixed.images.shape[0])
        start = part.stop
        mix = mix + deep_supervised_mix_loss([o[part] for o in outputs], mixed, ds_weights)
        mse = mse + discrepancy_mse_loss(outputs[0][part], mixed.targets[0], mixed.weights[0], disc[part])
        kl = kl + discrepancy_uniform_ce_loss(outputs[0][part], mixed.targets[0], mixed.weights[0], disc[part])
    if start != outputs[0].shape[0]:
        raise ValueError(f"outputs: batch {outputs[0].shape[0]} != {start} mixed images")
    return SDCLStudentLoss(mix + mse_weight * mse + kl_weight * kl, mix, mse, kl)


def pretrain_epoch_count(num_epochs: int, fraction: float, explicit: int | None = None) -> int:
    """Epochs of stage 1: ``explicit`` if given, else ``round(fraction · num_epochs)`` kept in ``[1, num_epochs − 1]``
    for ``0 < fraction < 1`` (both stages run whenever ``num_epochs ≥ 2``); 0 / ``num_epochs`` for 0 / 1."""
    if explicit is not None:
        if explicit < 0:
            raise ValueError(f"pretrain_epochs: must be >= 0, got {explicit}")
        return int(explicit)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pretrain_fraction: must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return 0
    if fraction == 1.0:
        return num_epochs
    return max(min(round(fraction * num_epochs), num_epochs - 1), min(1, num_epochs - 1))


def _as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------------- trainers
class nnUNetTrainerSDCL(nnUNetTrainerSSLBase):
    """SDCL (Song & Wang, MICCAI 2024) on BCP bidirectional copy-paste, as nnU-Net v2 trainers (docs/methods/sdcl.md).

    Networks (docs/methods/sdcl.md)
        student 1  ``self.network``: nnU-Net's architecture from the plans (``PlainConvUNet`` by default). It is what
                   ``checkpoint['network_weights']`` holds, what nnU-Net validates and what ``nnUNetv2_predict -tr
                   nnUNetTrainerSDCL`` uses.
        student 2  a trainable extra network (``extra_networks['student2']``) of a *different* architecture with the
                   same stages, features, kernel sizes, strides and decoder (:func:`second_student_architecture`):
                   a ``ResidualEncoderUNet`` when the plans hold a plain U-Net (one residual block per stage by default,
                   i.e. the plain encoder's depth plus skip connections, as the paper pairs VNet with ResVNet), or a
                   ``PlainConvUNet`` when the plans already hold a residual-encoder U-Net (nnU-Net ResEnc presets).
        teacher    a non-trainable EMA copy of student 1 (``extra_networks['teacher']``), ``θ_T ← 0.99 θ_T + 0.01 θ_1``
                   after every stage-2 step with a constant decay (BCP ``update_ema_variables``: no warm-up), parameters
                   only; it is set to student 1 when stage 2 begins (official: loaded from student 1's pre-train
                   checkpoint).

    Stages (one trainer, switched at an epoch; both stages live in the same checkpoints, ``--c`` resumes either)
        stage 1 (epochs ``[0, pretrain_epochs)``, BCP pre-training on labelled patches only): ``X = L_a ⊙ M + L_b ⊙
            (1 − M)``, ``Y = GT_a ⊙ M + GT_b ⊙ (1 − M)``; each student is trained on nnU-Net's Dice+CE of the mixed
            label with deep supervision.
        stage 2 (self-training, docs/methods/sdcl.md): teacher pseudo-labels ``PL = argmax softmax(teacher(U))``;
            ``X_l = U_a ⊙ M + L_b ⊙ (1 − M)``, ``X_u = L_a ⊙ M + U_b ⊙ (1 − M)`` with targets ``Y_l = PL_a | GT_b`` and
            ``Y_u = GT_a | PL_b`` and region weights ω = 0.5 on pseudo-labelled and 1.0 on ground-truth voxels;
            ``D = 1[argmax z¹ ≠ argmax z²]`` (shared by both students); per student s:
            ``L_s = mix(X_l) + mix(X_u) + λ_mse (L_mse(X_l) + L_mse(X_u)) + λ_kl (L_kl(X_l) + L_kl(X_u))``
            with λ_mse = 0.5, λ_kl = 0.05 (LA, ACDC; ``nnUNetTrainerSDCL_pancreas``: 0.3 / 0.1). ``mix`` is BCP's
            region-weighted (Dice + CE) / 2 (:func:`nnssl.losses.sdcl.mixed_region_loss`), ``L_mse`` / ``L_kl`` are
            :func:`~nnssl.losses.sdcl.discrepancy_mse_loss` / :func:`~nnssl.losses.sdcl.discrepancy_uniform_ce_loss`.
            One backward of ``L_1 + L_2`` (each student's parameters only receive their own loss, D is detached), then
            the EMA update of the teacher.

    ``pretrain_epochs`` (class attribute, ``None`` by default) fixes the switch epoch; otherwise it is
    ``round(pretrain_fraction · num_epochs)`` with ``pretrain_fraction = 0.2`` (official LA 80 of 355 epochs,
    ACDC 100 of 500, Pancreas 101 of 422, at the same iterations per epoch in both stages), kept in
    ``[1, num_epochs − 1]`` so that short schedules run both stages. The switch epoch is saved in the checkpoint and
    kept on ``--c`` even if the schedule changes. ``pretrain_fraction = 0`` starts self-training at once, ``1`` runs
    stage 1 only.

    Logged per epoch (``ssl_progress.json``): ``stage``, ``loss_mix`` (mean over the two students), ``loss_mse``,
    ``loss_kl`` (student 1, unweighted), ``discrepancy_fraction`` (fraction of voxels in D), ``teacher_confidence``
    (mean max softmax of the teacher on the unlabelled patches). Stage 1 logs ``loss_mix`` and ``discrepancy_fraction``.

    Deviations from the official code and why
    - Optimiser and schedule: nnU-Net's SGD (momentum 0.99, nesterov) with poly lr over the whole run, shared by both
      stages, for both students, so SDCL is compared with the supervised nnU-Net baseline under the same recipe. The
      official Adam lr 1e-3 constant is ``nnUNetTrainerSDCL_adam``. Stage 2 continues stage 1's optimiser state, as
      the official code (it reloads the optimiser with the pre-train weights).
    - Pre-training stops at a fixed epoch and stage 2 starts from the last stage-1 weights: the official code keeps
      the best pre-train checkpoint chosen on the test set, which nnU-Net's protocol cannot do.
    - Stage-1 loss is nnU-Net's Dice+CE with deep supervision (the official ``(CE + Dice incl. background) / 2`` has no
      region weights, so nnU-Net's own supervised loss is the natural counterpart).
    - Deep supervision: the mixed targets and the mask M are downsampled to every deep-supervision output with
      nearest-exact interpolation, which is what nnU-Net does to labels, so mixing the downsampled targets equals
      downsampling the mixed target; ``mix`` is summed over the outputs with nnU-Net's deep-supervision weights.
      The SDCL correction losses and D use the full-resolution output only (docs/methods/README.md).
    - Batch composition: nnU-Net draws one labelled batch (N_l) and one unlabelled batch (N_u) instead of four loaders
      a/b. The "b" samples are the batch rolled by one (``b[i] = a[i − 1]``, :func:`rolled_pairs`), so any batch size
      works (odd, 1: then a sample is mixed with itself) and every drawn patch is used as both a and b; ``n = max(N_l,
      N_u)`` mixes are built, the shorter batch is repeated cyclically. X_l and X_u go through each student in one
      forward (nnU-Net's instance norm is per sample, so this equals two forwards).
    - Pseudo-labels: argmax of the teacher's softmax (multi-class nnU-Net, as ACDC). For two classes this equals the
      official LA/Pancreas ``p_1 ≥ 0.5``; their largest-connected-component filter is optional
      (``pseudo_label_largest_component``, variant ``nnUNetTrainerSDCL_lcc``: per sample and foreground class, MONAI's
      ``KeepLargestConnectedComponent``; it costs a host round-trip on CUDA). The teacher runs in train mode as the
      official code (identical to eval mode with nnU-Net's instance norm).
    - The box of M is 2/3 of the patch along every axis (LA/ACDC ratio), one box per iteration for the whole batch.
    - Validation/inference use student 1 only; the official code also evaluates student 2 and the students' mean and
      keeps the best one on the test set.
    - Plans with regions or an ignore label are refused: SDCL's losses are softmax / fully-labelled.
    - Both stages are one trainer rather than a separate pre-training trainer whose checkpoint is passed with
      ``-pretrained_weights``: nnU-Net's loader copies only ``self.network`` and skips its segmentation
      heads, so student 2 and the teacher could not be initialised that way. ``-pretrained_weights`` still
      works as in nnU-Net (student 1 only, before stage 1).
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

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.stage = 1
        self.self_training_start_epoch: int | None = None

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            return
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError(f"{self.__class__.__name__}: dataset {self.plans_manager.dataset_name} uses "
                             f"{'regions' if self.label_manager.has_regions else 'an ignore label'}; SDCL's "
                             f"copy-paste targets and losses need plain softmax classes with every voxel labelled")
        super().initialize()
        self.self_training_start_epoch = pretrain_epoch_count(self.num_epochs, self.pretrain_fraction,
                                                              self.pretrain_epochs)
        self.print_to_log_file(f"SDCL: BCP pre-training for epochs [0, {self.self_training_start_epoch}), "
                               f"self-training afterwards (of {self.num_epochs} epochs)")

    def build_extra_networks(self) -> None:
        cm = self.configuration_manager
        student2 = build_second_student(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                        cm.network_arch_init_kwargs_req_import, self.num_input_channels,
                                        self.label_manager.num_segmentation_heads, self.enable_deep_supervision,
                                        self.student2_blocks_per_stage, self.student2_convs_per_stage)
        self.register_extra_network("student2", student2.to(self.device), trainable=True)
        teacher = copy.deepcopy(unwrap(self.network))
        teacher.decoder.deep_supervision = False  # pseudo-labels come from the full-resolution output only
        self.register_extra_network("teacher", teacher, trainable=False)

    @property
    def student2(self) -> nn.Module:
        return self.extra_networks["student2"]

    @property
    def teacher(self) -> nn.Module:
        return self.extra_networks["teacher"]

    def deep_supervision_weights(self) -> tuple[float, ...]:
        return tuple(float(w) for w in getattr(self.loss, "weight_factors", None) or (1.0,))

    # ------------------------------------------------------------------ stages
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.stage == 1 and self.current_epoch >= self.self_training_start_epoch:
            self.start_self_training()

    def start_self_training(self) -> None:
        """Stage 2 begins: the teacher becomes a copy of student 1 (official: student 1's pre-train weights)."""
        unwrap(self.teacher).load_state_dict(unwrap(self.network).state_dict())
        self.stage = 2
        self.print_to_log_file(f"SDCL: stage 2 (self-training) from epoch {self.current_epoch}; teacher set to "
                               f"student 1")

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        data, target, unlabeled = self.to_device(batch)
        targets = _as_list(target)
        out = self.pretrain_step(data, targets) if self.stage == 1 else self.self_training_step(data, targets,
                                                                                                 unlabeled)
        self.global_iteration += 1
        out["stage"] = float(self.stage)
        return out

    def _forward_students(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return _as_list(self.network(images)), _as_list(self.student2(images))

    def pretrain_step(self, data: Tensor, targets: list[Tensor]) -> dict:
        mask = bcp_mask(data.shape[2:], self.mask_ratio, device=self.device)
        mixed = labeled_copy_paste(data, targets, mask, rolled_pairs(data.shape[0], data.shape[0], self.device))
        supervision = mixed.targets if self.enable_deep_supervision else mixed.targets[0]
        self.zero_grad()
        with self.autocast():
            out1, out2 = self._forward_students(mixed.images)
            loss1 = self.loss(out1 if self.enable_deep_supervision else out1[0], supervision)
            loss2 = self.loss(out2 if self.enable_deep_supervision else out2[0], supervision)
            loss = loss1 + loss2
        self.backward_and_step(loss)
        disc = discrepancy_mask(out1[0], out2[0])
        # one host sync for all logged scalars
        total, disc_fraction = torch.stack((loss.detach().float(), disc.float().mean())).tolist()
        return {"loss": np.float32(total), "loss_mix": total / 2, "discrepancy_fraction": disc_fraction}

    def self_training_mix(self, data: Tensor, targets: list[Tensor], unlabeled: Tensor, pseudo_labels: Tensor
                          ) -> tuple[MixedBatch, MixedBatch]:
        n = max(data.shape[0], unlabeled.shape[0])
        mask = bcp_mask(data.shape[2:], self.mask_ratio, device=self.device)
        return bidirectional_copy_paste_ds(data, targets, unlabeled, pseudo_labels, mask,
                                           rolled_pairs(n, data.shape[0], self.device),
                                           rolled_pairs(n, unlabeled.shape[0], self.device),
                                           self.labeled_region_weight, self.unlabeled_region_weight)

    def self_training_step(self, data: Tensor, targets: list[Tensor], unlabeled: Tensor) -> dict:
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(unlabeled)
        pseudo_labels, confidence = teacher_pseudo_labels(teacher_logits, self.pseudo_label_largest_component)
        mixed_l, mixed_u = self.self_training_mix(data, targets, unlabeled, pseudo_labels)
        ds_weights = self.deep_supervision_weights() if self.enable_deep_supervision else (1.0,)
        self.zero_grad()
        with self.autocast():
            out1, out2 = self._forward_students(torch.cat((mixed_l.images, mixed_u.images)))
            disc = discrepancy_mask(out1[0], out2[0])
            loss1 = sdcl_student_loss(out1, (mixed_l, mixed_u), disc, ds_weights, self.mse_weight, self.kl_weight)
            loss2 = sdcl_student_loss(out2, (mixed_l, mixed_u), disc, ds_weights, self.mse_weight, self.kl_weight)
            loss = loss1.total + loss2.total
        self.backward_and_step(loss)
        update_teacher_(self.teacher, self.network, self.ema_decay)
        logged = torch.stack((loss.detach().float(), (loss1.mix.detach() + loss2.mix.detach()) / 2,
                              loss1.mse.detach(), loss1.kl.detach(), disc.float().mean(), confidence,
                              self.confidence_stats(teacher_logits)[1])).tolist()
        return {"loss": np.float32(logged[0]), **dict(zip(("loss_mix", "loss_mse", "loss_kl", "discrepancy_fraction",
                                                          "teacher_confidence", "fraction_above_threshold"),
                                                         logged[1:]))}

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        state = super().ssl_state_dict()
        state["sdcl_stage"] = self.stage
        state["sdcl_self_training_start_epoch"] = self.self_training_start_epoch
        return state

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        if "sdcl_stage" not in state:
            raise RuntimeError("checkpoint has no SDCL stage: it was not written by an SDCL trainer")
        self.stage = int(state["sdcl_stage"])
        saved_start = int(state["sdcl_self_training_start_epoch"])
        if saved_start != self.self_training_start_epoch:
            self.print_to_log_file(f"SDCL: keeping the checkpoint's self-training start epoch {saved_start} "
                                   f"(this schedule would give {self.self_training_start_epoch})")
        self.self_training_start_epoch = saved_start


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


class nnUNetTrainerSDCL_adam(nnUNetTrainerSDCL):
    """SDCL with the official optimiser: Adam (default betas, no weight decay), constant lr 1e-3, for both students
    and both stages (a poly schedule with exponent 0 keeps nnU-Net's per-epoch scheduler calls)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.uses_nnunet_optimizer = False

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)
