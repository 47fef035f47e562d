"""Strong views of an unlabeled batch for weak-to-strong consistency (FixMatch, Sohn et al., NeurIPS 2020, Sec. 3.2;
UniMatch, Yang et al., CVPR 2023, Sec. 3.1), made on the device from the batch nnU-Net's loader already augmented.

The weak view is the patch as nnU-Net's data pipeline delivers it (its spatial and intensity augmentation included);
the strong view adds perturbations that keep every voxel where it is, so the pseudo-label of the weak view is the
target of the strong view voxel by voxel without inverting any warp:

- intensity jitter (UniMatch's colour jitter, for one-channel medical images: contrast around the sample's mean and a
  brightness shift, both in units of the sample's standard deviation), with probability ``p_jitter``;
- Gaussian noise, with probability ``p_noise``;
- Gaussian blur of a random sigma (UniMatch: sigma in [0.1, 2.0], p = 0.5), with probability ``p_blur``;
- CutMix between samples of the batch (:func:`cutmix`), applied to the strong images and their targets together.

Every random draw of the intensity perturbations is per sample and made on the batch's device, so none of this reads
a value back to the host (one synchronisation per training step stays the logging one). nnU-Net's own transforms
(batchgeneratorsv2) run per sample in the CPU workers; this is done here instead because the strong view must be
made from the SAME augmented patch as the weak one, after the loader.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl.mixing import rolled_pairs


def _per_sample_uniform(n: int, low: float, high: float, like: Tensor, ndim: int) -> Tensor:
    """U(low, high) of shape (n, 1, 1, ...) broadcasting against a (n, C, *spatial) tensor."""
    return low + (high - low) * torch.rand((n,) + (1,) * (ndim - 1), device=like.device, dtype=torch.float32)


def _per_sample_coin(n: int, p: float, like: Tensor, ndim: int) -> Tensor:
    return torch.rand((n,) + (1,) * (ndim - 1), device=like.device) < p


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, *spatial) with one sigma (in voxels) per sample (``sigma``: (N,) float);
    kernel radius ``ceil(3 max_sigma)``, zero-padded borders renormalised (the blurred image keeps its brightness at
    the border). Float32 inside."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma.float().clamp_min(1e-3)[:, None]) ** 2)  # (N, k)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, k)
    out = x.float().reshape(1, n * c, *spatial)
    norm = torch.ones_like(out)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    for axis in range(len(spatial)):
        shape = [n * c, 1] + [1] * len(spatial)
        shape[2 + axis] = kernels.shape[1]
        padding = [0] * len(spatial)
        padding[axis] = radius
        weight = kernels.reshape(shape)
        out = conv(out, weight, padding=padding, groups=n * c)
        norm = conv(norm, weight, padding=padding, groups=n * c)
    return (out / norm).reshape(x.shape).to(x.dtype)


def intensity_strong_view(x: Tensor, contrast: tuple[float, float] = (0.6, 1.4),
                          brightness: tuple[float, float] = (-0.3, 0.3), p_jitter: float = 0.8,
                          noise_std: tuple[float, float] = (0.0, 0.15), p_noise: float = 0.5,
                          blur_sigma: tuple[float, float] = (0.1, 2.0), p_blur: float = 0.5) -> Tensor:
    """The strong intensity view of a batch (N, C, *spatial): per sample, with the probabilities given,
    ``x ← (x − μ)·c + μ + b·σ`` (jitter), ``x ← x + N(0, (s·σ)²)`` (noise), ``x ← blur(x, sigma)``; μ, σ the sample's
    mean and standard deviation over channels and voxels. Shapes and dtype kept; no gradient (an input transform)."""
    for name, (low, high) in (("contrast", contrast), ("brightness", brightness), ("noise_std", noise_std),
                              ("blur_sigma", blur_sigma)):
        if not low <= high:
            raise ValueError(f"{name}: expected (low, high) with low <= high, got {(low, high)}")
    for name, p in (("p_jitter", p_jitter), ("p_noise", p_noise), ("p_blur", p_blur)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {p}")
    if x.ndim < 3:
        raise ValueError(f"x: expected (N, C, *spatial), got shape {tuple(x.shape)}")
    with torch.no_grad():
        n, nd = x.shape[0], x.ndim
        out = x.float()
        dims = tuple(range(1, nd))
        mean, std = out.mean(dims, keepdim=True), out.std(dims, keepdim=True).clamp_min(1e-6)
        jittered = (out - mean) * _per_sample_uniform(n, *contrast, out, nd) + mean \
            + _per_sample_uniform(n, *brightness, out, nd) * std
        out = torch.where(_per_sample_coin(n, p_jitter, out, nd), jittered, out)
        noisy = out + torch.randn_like(out) * _per_sample_uniform(n, *noise_std, out, nd) * std
        out = torch.where(_per_sample_coin(n, p_noise, out, nd), noisy, out)
        if blur_sigma[1] > 0 and p_blur > 0:
            sigma = _per_sample_uniform(n, *blur_sigma, out, 2).reshape(n)
            out = torch.where(_per_sample_coin(n, p_blur, out, nd), gaussian_blur(out, sigma, blur_sigma[1]), out)
        return out.to(x.dtype)


class CutMixBatch(NamedTuple):
    """A CutMix of a batch with itself rolled by one: ``images`` and every tensor of ``targets`` mixed alike."""

    images: Tensor
    targets: tuple[Tensor, ...]
    box_mask: Tensor  # (*spatial) float, 1 where a sample keeps its own content, 0 in the pasted box


def cutmix(images: Tensor, targets: Sequence[Tensor], box_ratio: tuple[float, float] = (0.3, 0.7), p: float = 0.5,
           rng: random.Random | None = None) -> CutMixBatch:
    """CutMix (Yun et al., ICCV 2019) of sample ``i`` with sample ``i − 1`` (:func:`nnssl.mixing.rolled_pairs`), as
    UniMatch mixes its strong views: with probability ``p`` one box (side ``r · size`` per dim, ``r ~ U(box_ratio)``,
    :func:`nnssl.mixing.bcp_mask`'s box, start uniform) of sample ``i − 1`` is pasted into sample ``i``; the
    per-voxel ``targets`` ((N, *spatial) or (N, 1, *spatial): pseudo-labels, masks, weights) are mixed with the same
    box. The coin and the box come from Python's ``random`` (``rng``; the benchmark seeds it), so no tensor is read
    back to the host. With one sample or no paste the inputs are returned (box mask all ones)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    if not 0.0 <= box_ratio[0] <= box_ratio[1] <= 1.0:
        raise ValueError(f"box_ratio: expected 0 <= low <= high <= 1, got {box_ratio}")
    spatial = images.shape[2:]
    keep_all = torch.ones(tuple(spatial), device=images.device)
    rng = rng or random
    if images.shape[0] < 2 or rng.random() >= p:
        return CutMixBatch(images, tuple(targets), keep_all)
    ratio = rng.uniform(*box_ratio)
    box = []
    for size in spatial:
        length = int(size * ratio)
        start = rng.randint(0, size - length)  # inclusive: the box may touch either border
        box.append(slice(start, start + length))
    mask = keep_all.clone()
    mask[tuple(box)] = 0.0  # 1 outside the box, 0 inside
    a, b = rolled_pairs(images.shape[0], images.shape[0], images.device)

    def mix(t: Tensor) -> Tensor:
        m = mask.reshape((1,) * (t.ndim - len(spatial)) + tuple(spatial))
        return torch.where(m > 0, t[a], t[b])

    return CutMixBatch(mix(images), tuple(mix(t) for t in targets), mask)
