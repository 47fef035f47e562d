"""Uncertainty rectified pyramid consistency (URPC; Luo et al., "Efficient Semi-supervised Gross Target Volume of
Nasopharyngeal Carcinoma Segmentation via Uncertainty Rectified Pyramid Consistency", MICCAI 2021: its uncertainty
rectified consistency equations), as DHC's method zoo runs it (``xmed-lab/DHC code/train_urpc.py``;
docs/methods/urpc.md)::

    p_i = softmax(z_i),  z_i the i-th pyramid output upsampled to full resolution,  i = 1..S
    P = (1/S) Σ_i p_i                                     not detached: gradients flow through P too
    v_i = Σ_c P_c (log P_c - log p_i,c)                   per voxel, KL(P ‖ p_i)
    L_i = mean((P - p_i)² · e^(-v_i)) / (mean(e^(-v_i)) + 1e-8) + mean(v_i)
    L_urpc = (1/S) Σ_i L_i

Means over every element (``(P - p_i)²`` over batch, classes and voxels; ``v_i`` over batch and voxels). Computed
in float32 from log-softmaxes (DHC takes ``log(softmax)``, equal wherever it is finite).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_logits(outputs: Sequence[Tensor], size: Sequence[int] | None = None) -> list[Tensor]:
    """Every output resized to ``size`` (default: the first output's spatial size) by (bi/tri)linear
    interpolation, ``align_corners=False`` (DHC's ``nn.Upsample(mode='trilinear')`` of its pyramid logits)."""
    if len(outputs) == 0:
        raise ValueError("upsample_logits needs at least one output")
    size = tuple(outputs[0].shape[2:]) if size is None else tuple(size)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(len(size))
    if mode is None:
        raise ValueError(f"outputs must have 1 to 3 spatial axes, got size {size}")
    return [z if tuple(z.shape[2:]) == size else F.interpolate(z, size=size, mode=mode, align_corners=False)
            for z in outputs]


def urpc_consistency(pyramid_logits: Sequence[Tensor]) -> Tensor:
    """``L_urpc`` of the module doc for full-resolution logits ``(N, K, *spatial)`` of ``S >= 2`` pyramid levels
    (DHC: the four deep-supervision heads of ``unet_3D_ds`` on the unlabeled half). Returns a float32 scalar."""
    if len(pyramid_logits) < 2:
        raise ValueError(f"URPC needs at least two pyramid outputs, got {len(pyramid_logits)}")
    shape = pyramid_logits[0].shape
    if any(z.shape != shape for z in pyramid_logits) or len(shape) < 3:
        raise ValueError(f"pyramid logits must share one shape (N, K, *spatial); got "
                         f"{[tuple(z.shape) for z in pyramid_logits]}")
    # all levels at once on a stacked (S, N, K, *spatial) tensor: the same arithmetic as one level at a time, in a
    # fixed number of operations instead of ~8 per level (what made URPC's step 1.23x nnU-Net's tax on the CPU preset)
    log_p = F.log_softmax(torch.stack(pyramid_logits).float(), dim=2)
    p = log_p.exp()
    mean = p.mean(0)
    variance = (torch.xlogy(mean, mean) - mean * log_p).sum(2, keepdim=True)  # (S, N, 1, ...): KL(P || p_i)
    exp_variance = torch.exp(-variance)
    rectified = ((mean - p) ** 2 * exp_variance).flatten(1).mean(1) / (exp_variance.flatten(1).mean(1) + 1e-8)
    return (rectified + variance.flatten(1).mean(1)).mean()
