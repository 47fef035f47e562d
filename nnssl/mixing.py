"""Bidirectional copy-paste (BCP) mixing used by SDCL (docs/methods/sdcl.md; ``context_mask`` of BCP/SDCL).

One random box per iteration, shared by the whole batch: the mask ``M`` is 1 outside the box and 0 inside it.
Mixing is ``a * M + b * (1 - M)``: ``a`` fills the outside, ``b`` is pasted into the box.

SDCL/BCP mixes (docs/methods/sdcl.md), with L = labelled, U = unlabelled, GT = labels, PL = teacher pseudo-labels:

- ``X_l = U_a * M + L_b * (1 - M)``, target ``Y_l = PL_a`` on M and ``GT_b`` on 1 - M;
- ``X_u = L_a * M + U_b * (1 - M)``, target ``Y_u = GT_a`` on M and ``PL_b`` on 1 - M.

so the unlabelled content of ``X_l`` sits on ``M`` and that of ``X_u`` on ``1 - M`` (complementary regions).
Region weights ``omega``: ``unlabeled_weight`` (0.5) on the pseudo-labelled region, ``labeled_weight`` (1.0) on the
ground-truth region.

Shapes: images (N, C, *spatial), labels (N, *spatial) or (N, 1, *spatial), masks (*spatial); 2D and 3D work.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BCPBatch", "bcp_mask", "bcp_mix", "bcp_mix_targets", "bcp_region_weights", "bidirectional_copy_paste"]


def bcp_mask(
    spatial_shape: Sequence[int],
    ratio: float = 2 / 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random box mask (docs/methods/sdcl.md): float32 of ``spatial_shape``, 1 outside and 0 inside one box.

    The box has ``int(size * ratio)`` voxels along each dim (as the official ``context_mask``). Its start is
    uniform in ``[0, size - box]`` inclusive. Deviation: the official code draws the start from
    ``randint(0, size - box)`` (exclusive upper bound, hard-coded to LA's 112x112x80), which never touches the far
    border and fails when the box fills the dim; this version works for any shape.

    Args:
        spatial_shape: (H, W) or (D, H, W) (any number of dims >= 1).
        ratio: box size / image size per dim, in [0, 1].
        generator: optional CPU ``torch.Generator`` for reproducible boxes.
        device: where to create the mask.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) == 0 or any(s < 1 for s in spatial_shape):
        raise ValueError(f"spatial_shape: expected >= 1 positive sizes, got {spatial_shape}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: must be in [0, 1], got {ratio}")
    mask = torch.ones(spatial_shape, dtype=torch.float32, device=device)
    box = []
    for size in spatial_shape:
        length = int(size * ratio)
        start = int(torch.randint(0, size - length + 1, (1,), generator=generator))
        box.append(slice(start, start + length))
    mask[tuple(box)] = 0.0
    return mask


def _mask_for(mask: Tensor, like: Tensor, name: str) -> Tensor:
    """View a spatial mask so it broadcasts against ``like`` ((N, C, *spatial) or (N, *spatial))."""
    nsp = mask.ndim
    if like.ndim < nsp + 1 or tuple(like.shape[-nsp:]) != tuple(mask.shape):
        raise ValueError(
            f"{name}: shape {tuple(like.shape)} does not end with the mask's spatial shape {tuple(mask.shape)}"
        )
    return mask.reshape((1,) * (like.ndim - nsp) + tuple(mask.shape)).to(device=like.device)


def bcp_mix(img_a: Tensor, img_b: Tensor, mask: Tensor) -> Tensor:
    """``img_a * M + img_b * (1 - M)`` (docs/methods/sdcl.md): ``img_a`` outside the box, ``img_b`` pasted inside.

    Exact selection (``torch.where``), not arithmetic, so the result equals the source voxels bit for bit
    (``a*1 + b*0`` would turn ``inf``/``nan`` in the other image into ``nan``).

    Args:
        img_a, img_b: (N, C, *spatial), same shape.
        mask: (*spatial) from :func:`bcp_mask`.
    """
    if img_a.shape != img_b.shape:
        raise ValueError(f"img_b: shape {tuple(img_b.shape)} != img_a shape {tuple(img_a.shape)}")
    m = _mask_for(mask, img_a, "img_a")
    return torch.where(m > 0.5, img_a, img_b.to(img_a.dtype))


def bcp_mix_targets(target_a: Tensor, target_b: Tensor, mask: Tensor) -> Tensor:
    """Label version of :func:`bcp_mix`: ``target_a`` where M = 1, ``target_b`` where M = 0; dtype is kept.

    Works for hard labels (N, *spatial) / (N, 1, *spatial) and for soft targets (N, K, *spatial).
    """
    if target_a.shape != target_b.shape:
        raise ValueError(f"target_b: shape {tuple(target_b.shape)} != target_a shape {tuple(target_a.shape)}")
    m = _mask_for(mask, target_a, "target_a")
    return torch.where(m > 0.5, target_a, target_b.to(target_a.dtype))


def bcp_region_weights(mask: Tensor, weight_inside_m: float, weight_outside_m: float, batch_size: int) -> Tensor:
    """Per-voxel region weight map (N, *spatial): ``weight_inside_m`` where M = 1, ``weight_outside_m`` where M = 0.

    Returned as an expanded view (no per-sample copy), float32.
    """
    w = torch.where(
        mask > 0.5,
        torch.tensor(float(weight_inside_m), device=mask.device),
        torch.tensor(float(weight_outside_m), device=mask.device),
    )
    return w.unsqueeze(0).expand(batch_size, *mask.shape)


class BCPBatch(NamedTuple):
    """Output of :func:`bidirectional_copy_paste`; unpacks as ``x_l, x_u, y_l, y_u, weight_l, weight_u``."""

    x_l: Tensor  # U_a on M, L_b on 1 - M
    x_u: Tensor  # L_a on M, U_b on 1 - M
    y_l: Tensor  # PL_a on M, GT_b on 1 - M
    y_u: Tensor  # GT_a on M, PL_b on 1 - M
    weight_l: Tensor  # (N, *spatial): unlabeled_weight on M, labeled_weight on 1 - M
    weight_u: Tensor  # (N, *spatial): labeled_weight on M, unlabeled_weight on 1 - M


def bidirectional_copy_paste(
    lab_a: Tensor,
    lab_b: Tensor,
    unl_a: Tensor,
    unl_b: Tensor,
    gt_a: Tensor,
    gt_b: Tensor,
    pl_a: Tensor,
    pl_b: Tensor,
    mask: Tensor,
    labeled_weight: float = 1.0,
    unlabeled_weight: float = 0.5,
) -> BCPBatch:
    """Both BCP mixes of SDCL stage 2 (docs/methods/sdcl.md; ``LA_train.py`` self-train step).

    ``X_l = U_a * M + L_b * (1 - M)``, ``X_u = L_a * M + U_b * (1 - M)``;
    ``Y_l = PL_a`` on M, ``GT_b`` on 1 - M; ``Y_u = GT_a`` on M, ``PL_b`` on 1 - M;
    ``omega_l = unlabeled_weight`` on M, ``labeled_weight`` on 1 - M; ``omega_u`` the other way round
    (official ``mix_loss(..., u_weight=0.5, unlab=True)`` for X_l and ``unlab=False`` for X_u).

    Args:
        lab_a, lab_b: labelled images (N, C, *spatial); unl_a, unl_b: unlabelled images, same shape.
        gt_a, gt_b: labels of lab_a / lab_b; pl_a, pl_b: pseudo-labels of unl_a / unl_b; all (N, *spatial)
            (or (N, 1, *spatial)), same shape and dtype.
        mask: (*spatial) from :func:`bcp_mask`, shared by the batch.
    """
    images = {"lab_a": lab_a, "lab_b": lab_b, "unl_a": unl_a, "unl_b": unl_b}
    for name, t in images.items():
        if t.shape != lab_a.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != lab_a shape {tuple(lab_a.shape)}")
    labels = {"gt_a": gt_a, "gt_b": gt_b, "pl_a": pl_a, "pl_b": pl_b}
    for name, t in labels.items():
        if t.shape != gt_a.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != gt_a shape {tuple(gt_a.shape)}")
        if t.shape[0] != lab_a.shape[0]:
            raise ValueError(f"{name}: batch size {t.shape[0]} != image batch size {lab_a.shape[0]}")
    n = lab_a.shape[0]
    return BCPBatch(
        x_l=bcp_mix(unl_a, lab_b, mask),
        x_u=bcp_mix(lab_a, unl_b, mask),
        y_l=bcp_mix_targets(pl_a, gt_b.to(pl_a.dtype), mask),
        y_u=bcp_mix_targets(gt_a, pl_b.to(gt_a.dtype), mask),
        weight_l=bcp_region_weights(mask, unlabeled_weight, labeled_weight, n).to(lab_a.device),
        weight_u=bcp_region_weights(mask, labeled_weight, unlabeled_weight, n).to(lab_a.device),
    )


# ------------------------------------------------------------------ BCP mixes with nnU-Net's deep-supervision targets
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

    Full resolution is :func:`bidirectional_copy_paste`; for the lower outputs the pseudo-labels and M
    are downsampled with nearest-exact interpolation (as nnU-Net downsamples labels) and mixed with nnU-Net's
    downsampled ground truth, which equals downsampling the full-resolution mixed target.

    Args:
        labeled: (N_l, C, *spatial); labeled_targets: nnU-Net's targets, full resolution first, (N_l, 1, *sp_i).
        unlabeled: (N_u, C, *spatial); pseudo_labels: (N_u, *spatial) or (N_u, 1, *spatial).
        mask: (*spatial) from :func:`bcp_mask`.
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


def random_labeled_copy_paste(images: Tensor, targets: Sequence[Tensor], mask_ratio: float) -> MixedBatch:
    """SDCL's stage-1 mix of a step: :func:`labeled_copy_paste` with a fresh :func:`bcp_mask` box and every sample
    paired with the next one (:func:`rolled_pairs`)."""
    mask = bcp_mask(images.shape[2:], mask_ratio, device=images.device)
    return labeled_copy_paste(images, targets, mask, rolled_pairs(images.shape[0], images.shape[0], images.device))


def random_bidirectional_copy_paste_ds(labeled: Tensor, labeled_targets: Sequence[Tensor], unlabeled: Tensor,
                                       pseudo_labels: Tensor, mask_ratio: float, labeled_weight: float,
                                       unlabeled_weight: float) -> tuple[MixedBatch, MixedBatch]:
    """BCP's two mixes of a self-training step: :func:`bidirectional_copy_paste_ds` with a fresh :func:`bcp_mask`
    box and ``max(N_l, N_u)`` rolled pairs of each sub-batch."""
    n = max(labeled.shape[0], unlabeled.shape[0])
    mask = bcp_mask(labeled.shape[2:], mask_ratio, device=labeled.device)
    return bidirectional_copy_paste_ds(labeled, labeled_targets, unlabeled, pseudo_labels, mask,
                                       rolled_pairs(n, labeled.shape[0], labeled.device),
                                       rolled_pairs(n, unlabeled.shape[0], labeled.device),
                                       labeled_weight, unlabeled_weight)
