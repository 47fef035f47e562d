"""SDCL losses (docs/methods/sdcl.md; ``code/pancreas/losses.py`` of ``pascalcpp/SDCL``, used by all three tasks).

Inputs are the logits of one student on one BCP-mixed batch (N, K, *spatial) with K >= 2 softmax channels, the
mixed per-voxel target t (N, *spatial) (PL on one region, GT on the other, see :mod:`nnssl.mixing`) and the
per-voxel region weight map omega (0.5 on the pseudo-labelled region, 1.0 on the GT region).

- :func:`mixed_region_loss` is BCP's ``mix_loss`` (the base loss of both stages);
- :func:`discrepancy_mask` marks voxels where the two students' argmax differ (no grad);
- :func:`discrepancy_mse_loss` (``mix_mse_loss``) pulls discrepant voxels towards their target;
- :func:`discrepancy_uniform_ce_loss` (``mix_max_kl_loss``) maximises the entropy of discrepant voxels that the
  student gets wrong.

Per student (LA/ACDC weights; Pancreas uses 0.3 / 0.1):
``L = mix(X_l) + mix(X_u) + 0.5 * (L_mse(X_l) + L_mse(X_u)) + 0.05 * (L_kl(X_l) + L_kl(X_u))``.
All arithmetic is float32 with autocast disabled, so bf16/fp16 logits are safe.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl.mixing import MixedBatch
from nnssl.tensors import class_argmax

__all__ = ["mixed_region_loss", "discrepancy_mask", "discrepancy_mse_loss", "discrepancy_uniform_ce_loss"]

DICE_SMOOTH = 1e-5  # official DiceLoss smooth
DENOM_EPS = 1e-16  # official eps in every "sum / (count + 1e-16)"


@contextlib.contextmanager
def _float32_region(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim < 3:
        raise ValueError(f"logits: expected shape (N, K, *spatial), got {getattr(logits, 'shape', type(logits))}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits: need K >= 2 softmax channels (use 2 channels for binary), got K={logits.shape[1]}")


def _target_nsp(target: Tensor, logits: Tensor) -> Tensor:
    n, sp = logits.shape[0], tuple(logits.shape[2:])
    if target.ndim == len(sp) + 2 and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (n, *sp):
        raise ValueError(f"target: expected shape (N, *spatial) = {(n, *sp)}, got {tuple(target.shape)}")
    if target.is_floating_point():
        target = target.round()
    return target.long()


def _voxel_map(x: Tensor, logits: Tensor, name: str) -> Tensor:
    """Broadcast a (N, *spatial), (N, 1, *spatial) or (*spatial) map to float32 (N, *spatial)."""
    n, sp = logits.shape[0], tuple(logits.shape[2:])
    if x.ndim == len(sp) + 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim == len(sp):
        x = x.unsqueeze(0)
    try:
        return x.to(device=logits.device, dtype=torch.float32).expand(n, *sp)
    except RuntimeError as e:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not broadcast to (N, *spatial) = {(n, *sp)}") from e


def _regions(weight_map: Tensor, region_mask: Tensor | None, logits: Tensor) -> Sequence[Tensor]:
    if region_mask is not None:
        m = _voxel_map(region_mask, logits, "region_mask")
        return [m, 1.0 - m]
    return [(weight_map == v).float() for v in torch.unique(weight_map)]


def mixed_region_loss(logits: Tensor, target: Tensor, weight_map: Tensor, region_mask: Tensor | None = None) -> Tensor:
    """BCP ``mix_loss`` (docs/methods/sdcl.md): region-weighted masked Dice + masked CE, divided by 2.

    For each region r (voxel set) with weight ``w_r``:
    ``Dice_r = 1 - mean_{n,k} (2 sum_v m_r p_k t_k + 1e-5) / (sum_v m_r (p_k + t_k) + 1e-5)`` (softmax, one-hot t,
    per sample, all K classes incl. background) and ``CE_r = sum_v m_r CE(v) / (sum_v m_r + 1e-16)``;
    ``L = sum_r w_r (Dice_r + CE_r) / 2``.

    Regions: with ``region_mask`` (the BCP mask M) they are ``M`` and ``1 - M``, exactly as the official code. With
    ``region_mask=None`` they are the level sets of ``weight_map``, which is the same thing whenever the two region
    weights differ (the default 0.5 / 1.0); with equal weights pass ``region_mask`` to keep the two per-region Dice
    terms. ``w_r`` is the mean of ``weight_map`` over region r (constant there in BCP). An empty region adds 0.

    Why not nnU-Net's ``MemoryEfficientSoftDiceLoss``: BCP's Dice is per region (masked), per sample, includes the
    background and uses a different smoothing, so it would not reproduce the reference numbers.

    Args:
        logits: (N, K, *spatial).
        target: (N, *spatial) or (N, 1, *spatial) integer labels in [0, K).
        weight_map: omega, (N, *spatial) or (*spatial).
        region_mask: optional (*spatial) or (N, *spatial) 0/1 mask M.
    """
    _check_logits(logits)
    t = _target_nsp(target, logits)
    n, k = logits.shape[:2]
    with _float32_region(logits.device):
        omega = _voxel_map(weight_map, logits, "weight_map")
        z = logits.float()
        p = torch.softmax(z, dim=1).reshape(n, k, -1)
        onehot = F.one_hot(t.reshape(n, -1), k).permute(0, 2, 1).float()
        ce = F.cross_entropy(z, t, reduction="none").reshape(n, -1)
        total = z.new_zeros(())
        for m in _regions(omega, region_mask, logits):
            m = m.reshape(n, -1)
            m_sum = m.sum()
            w_r = (omega.reshape(n, -1) * m).sum() / m_sum.clamp_min(DENOM_EPS)
            inter = (p * onehot * m.unsqueeze(1)).sum(-1)
            union = ((p + onehot) * m.unsqueeze(1)).sum(-1)
            dice_loss = 1.0 - ((2.0 * inter + DICE_SMOOTH) / (union + DICE_SMOOTH)).mean()
            ce_loss = (ce * m).sum() / (m_sum + DENOM_EPS)
            total = total + w_r * (dice_loss + ce_loss)
        return total / 2.0


@torch.no_grad()
def discrepancy_mask(logits_1: Tensor, logits_2: Tensor) -> Tensor:
    """``D(v) = 1[argmax_k z1(v) != argmax_k z2(v)]`` (docs/methods/sdcl.md; ``get_XOR_region``), bool (N, *spatial),
    no grad."""
    _check_logits(logits_1)
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"logits_2: shape {tuple(logits_2.shape)} != logits_1 shape {tuple(logits_1.shape)}")
    # argmax of the logits equals argmax of the softmax; float32 so bf16 ties do not differ from the reference
    return class_argmax(logits_1.detach().float()) != class_argmax(logits_2.detach().float())


def discrepancy_mse_loss(logits: Tensor, target: Tensor, weight_map: Tensor, disc_mask: Tensor) -> Tensor:
    """SDCL ``L_mse`` (docs/methods/sdcl.md; ``mix_mse_loss``).

    ``e(v) = omega(v) * (1/K) sum_k (p_k(v) - onehot(t(v))_k)^2`` and
    ``L_mse = sum_v D(v) e(v) / (sum_v D(v) + 1e-16)`` (denominator unweighted by omega). Exactly 0 when D is empty.
    """
    _check_logits(logits)
    t = _target_nsp(target, logits)
    k = logits.shape[1]
    with _float32_region(logits.device):
        d = _voxel_map(disc_mask, logits, "disc_mask")
        omega = _voxel_map(weight_map, logits, "weight_map")
        p = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(t, k).movedim(-1, 1).float()
        e = omega * (p - onehot).pow(2).mean(1)
        return (d * e).sum() / (d.sum() + DENOM_EPS)


def discrepancy_uniform_ce_loss(logits: Tensor, target: Tensor, weight_map: Tensor, disc_mask: Tensor) -> Tensor:
    """SDCL ``L_kl`` (docs/methods/sdcl.md; ``mix_max_kl_loss``): entropy maximisation on discrepant, wrong voxels.

    ``W(v) = 1[argmax_k p(v) != t(v)]`` (no grad), ``g(v) = omega(v) W(v) (-(1/K) sum_k log p_k(v))`` and
    ``L_kl = sum_v D(v) g(v) / (sum_v D(v) W(v) + 1e-16)`` (denominator unweighted by omega).
    ``-(1/K) sum_k log p_k`` is the cross-entropy of p against the uniform distribution u, ``= KL(u || p) + log K``
    (official ``KLDivLoss(log p, ones)`` averaged over k), so it is ``>= log K`` with equality iff p is uniform and
    has the same gradient as ``KL(u || p)``. Exactly 0 when D (or D*W) is empty.
    """
    _check_logits(logits)
    t = _target_nsp(target, logits)
    with _float32_region(logits.device):
        d = _voxel_map(disc_mask, logits, "disc_mask")
        omega = _voxel_map(weight_map, logits, "weight_map")
        z = logits.float()
        with torch.no_grad():
            wrong = (class_argmax(z) != t).float()
        ce_uniform = -torch.log_softmax(z, dim=1).mean(1)
        g = omega * wrong * ce_uniform
        return (d * g).sum() / ((d * wrong).sum() + DENOM_EPS)


# ------------------------------------------------------------------ one student's stage-2 loss, the stage schedule
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


class SDCLStages:
    """Which of SDCL's two stages the trainer is in (1: BCP pre-training on labeled mixes, 2: self-training) and the
    epoch stage 2 starts, as one checkpointable state (registered once; ``--c`` restores it). The start epoch is
    fixed by the run that began: a resumed run keeps it even if its schedule would give another one."""

    def __init__(self, self_training_start_epoch: int, report: Callable[[str], None] = print):
        self.stage = 1
        self.self_training_start_epoch = int(self_training_start_epoch)
        self._report = report

    @classmethod
    def for_schedule(cls, num_epochs: int, fraction: float, explicit: int | None = None,
                     report: Callable[[str], None] = print) -> "SDCLStages":
        """Stage 2 starts after :func:`pretrain_epoch_count` epochs of the schedule (the plan is reported)."""
        stages = cls(pretrain_epoch_count(num_epochs, fraction, explicit), report)
        report(f"SDCL: BCP pre-training for epochs [0, {stages.self_training_start_epoch}), self-training afterwards "
               f"(of {num_epochs} epochs)")
        return stages

    def begin_self_training_if_due(self, epoch: int) -> bool:
        """Switch to stage 2 when ``epoch`` reached the start epoch; True only at the switch (the caller then sets
        the teacher to student 1)."""
        if self.stage != 1 or epoch < self.self_training_start_epoch:
            return False
        self.stage = 2
        self._report(f"SDCL: stage 2 (self-training) from epoch {epoch}; teacher set to student 1")
        return True

    def state_dict(self) -> dict[str, int]:
        # the key names of the checkpoints written before this state was registered
        return {"sdcl_stage": self.stage, "sdcl_self_training_start_epoch": self.self_training_start_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.stage = int(state["sdcl_stage"])
        saved_start = int(state["sdcl_self_training_start_epoch"])
        if saved_start != self.self_training_start_epoch:
            self._report(f"SDCL: keeping the checkpoint's self-training start epoch {saved_start} "
                         f"(this schedule would give {self.self_training_start_epoch})")
        self.self_training_start_epoch = saved_start
