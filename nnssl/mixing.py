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
