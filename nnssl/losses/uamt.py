"""Uncertainty-aware Mean Teacher (UA-MT) consistency (Yu et al., "Uncertainty-aware Self-ensembling Model for
Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019: its Monte-Carlo uncertainty and uncertainty-aware
consistency equations), as DHC's method zoo runs it (``xmed-lab/DHC code/train_uamt.py``; docs/methods/uamt.md)::

    p̄ = (1/T) Σ_t softmax(f_teacher(x_u + ξ_t)),   ξ_t = clamp(N(0, 0.1²), -0.2, 0.2),  T = 8
    U = -Σ_c p̄_c log(p̄_c + 1e-6)                                      per voxel
    τ(e) = (0.75 + 0.25 · sigmoid_rampup(e, E)) · ln 2                   ln 2 for any class count (DHC)
    L_u = Σ [U < τ] (p_student - p_teacher)² / (2 · Σ [U < τ] + 1e-16)   the 2: DHC's class count of LA, kept

The numerator sums over classes and voxels, the denominator counts voxels times ``class_normaliser`` (2 in DHC for
any class count). Softmaxes and sums are computed in float32, so fp16/bf16 logits from autocast are safe.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl.losses.consistency import gaussian_input_noise
from nnssl.ramps import sigmoid_rampup


def uncertainty_threshold(epoch: int, max_epoch: int, max_entropy: float = math.log(2)) -> float:
    """``τ(e) = (0.75 + 0.25 · sigmoid_rampup(e, E)) · max_entropy`` (DHC ``train_uamt.py``: ``max_entropy = ln 2``
    whatever the number of classes; UA-MT's paper for two classes)."""
    if max_entropy <= 0:
        raise ValueError(f"max_entropy must be > 0, got {max_entropy!r}")
    return (0.75 + 0.25 * sigmoid_rampup(epoch, max_epoch)) * max_entropy


def predictive_entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """``U = -Σ_c p_c log(p_c + eps)`` over the class axis 1, kept as a size-1 axis: (N, 1, *spatial), float32."""
    probs = probs.float()
    return -(probs * torch.log(probs + eps)).sum(1, keepdim=True)


class UncertaintyAwareConsistency(nn.Module):
    """UA-MT's Monte-Carlo teacher uncertainty and its uncertainty-masked MSE consistency (see the module doc).

    Args:
        passes: ``T``, noisy teacher forwards per sample (DHC: 8).
        batch_repeat: samples of each image per teacher forward (DHC runs ``T // 2`` forwards of the batch repeated
            twice); ``passes`` must be a multiple of it. Only memory and speed depend on it.
        noise_std, noise_clip: the teacher input noise ``clamp(N(0, std²), -clip, clip)`` (DHC: 0.1, 0.2).
        class_normaliser: the factor of the mask count in the denominator (DHC: 2 for any class count).
        eps: inside the entropy's logarithm (DHC: 1e-6).
    """

    def __init__(self, passes: int = 8, batch_repeat: int = 2, noise_std: float = 0.1, noise_clip: float = 0.2,
                 class_normaliser: float = 2.0, eps: float = 1e-6):
        super().__init__()
        if int(passes) != passes or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
        if int(batch_repeat) != batch_repeat or batch_repeat < 1 or passes % batch_repeat:
            raise ValueError(f"batch_repeat must be an integer >= 1 dividing passes={passes}, got {batch_repeat!r}")
        if noise_std < 0 or noise_clip < 0:
            raise ValueError(f"noise_std and noise_clip must be >= 0, got {noise_std!r}, {noise_clip!r}")
        if class_normaliser <= 0 or eps < 0:
            raise ValueError(f"class_normaliser must be > 0 and eps >= 0, got {class_normaliser!r}, {eps!r}")
        self.passes, self.batch_repeat = int(passes), int(batch_repeat)
        self.noise_std, self.noise_clip = float(noise_std), float(noise_clip)
        self.class_normaliser, self.eps = float(class_normaliser), float(eps)

    def noisy(self, x: Tensor) -> Tensor:
        return gaussian_input_noise(x, self.noise_std, self.noise_clip)

    @torch.no_grad()
    def uncertainty(self, teacher: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``U`` of the mean softmax of ``passes`` noisy teacher forwards of every sample of ``x``: (N, 1, *spatial).
        ``teacher`` returns full-resolution logits."""
        n = x.shape[0]
        repeated = x.repeat(self.batch_repeat, *([1] * (x.ndim - 1)))
        mean_probs = None
        for _ in range(self.passes // self.batch_repeat):
            probs = F.softmax(teacher(self.noisy(repeated)).float(), dim=1)
            summed = probs.reshape(self.batch_repeat, n, *probs.shape[1:]).sum(0)
            mean_probs = summed if mean_probs is None else mean_probs + summed
        return predictive_entropy(mean_probs / self.passes, self.eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, uncertainty: Tensor,
                threshold: float) -> tuple[Tensor, Tensor]:
        """``(L_u, fraction of voxels with U < τ)``: the masked MSE of the module doc (teacher detached) and the
        share of certain voxels (no graph)."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                             f"logits must match")
        if uncertainty.shape != (student_logits.shape[0], 1, *student_logits.shape[2:]):
            raise ValueError(f"uncertainty must be (N, 1, *spatial), got {tuple(uncertainty.shape)}")
        mask = (uncertainty.detach() < threshold).float()
        squared = (F.softmax(student_logits.float(), 1) - F.softmax(teacher_logits.detach().float(), 1)) ** 2
        loss = (mask * squared).sum() / (self.class_normaliser * mask.sum() + 1e-16)
        return loss, mask.mean().detach()
