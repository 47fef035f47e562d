"""DePL, debiased pseudo-labels (X. Wang, Z. Wu, L. Lian, S. X. Yu, "Debiased Learning from Naturally Imbalanced
Pseudo-Labels", CVPR 2022: the causal-inference debiasing of the pseudo-labels with a momentum estimate ``q̂`` of the
marginal prediction), as DHC's zoo runs it on its CPS base (``xmed-lab/DHC code/train_depl.py``; docs/methods/depl.md).

Per network, with ``q̂`` of the shape of one output patch ``(1, K, *spatial)`` (DHC ``initial_qhat``: per voxel)::

    q̃ = softmax(z − τ log q̂)                  (DHC ``causal_inference``, τ = 1)
    ŷ = argmax_k q̃,   m = [max_k q̃ ≥ 0.9]
    q̂ ← 0.99 q̂ + 0.01 · mean_{unlabeled rows} softmax(z)      (DHC ``update_qhat``, after the pseudo-labels)

and the CPS term ``mean(CE(z_A, ŷ_B)·m_B) + mean(CE(z_B, ŷ_A)·m_A)`` (:func:`nnssl.losses.masked_ce.masked_cps_loss`).
The paper's adaptive marginal loss is computed by ``train_depl.py`` into ``output_A_u`` but never used (the loss reads
``output_A``), so it is not here either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from nnssl.losses.masked_ce import check_logits, confident_argmax


class DebiasedPseudoLabels(nn.Module):
    """The per-voxel prior ``q̂`` of one network (a buffer ``qhat``, ``(1, K, *spatial)``, initially ``1/K``) and the
    debiased pseudo-labels it gives; ``state_dict`` / ``load_state_dict`` are the module's (register it as trainer
    state so ``--c`` restores ``q̂``).

    ``momentum``: EMA momentum of ``q̂`` (DHC 0.99); ``tau``: debiasing strength (DHC 1.0); ``threshold``: the
    confidence ``max q̃ ≥ threshold`` a pseudo-label needs (DHC 0.9).
    """

    def __init__(self, num_classes: int, spatial_shape: Sequence[int], momentum: float = 0.99, tau: float = 1.0,
                 threshold: float = 0.9):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        spatial = tuple(int(s) for s in spatial_shape)
        if not spatial or any(s < 1 for s in spatial):
            raise ValueError(f"spatial_shape must be positive sizes, got {tuple(spatial_shape)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"tau must be finite and >= 0, got {tau!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.num_classes, self.spatial_shape = int(num_classes), spatial
        self.momentum, self.tau, self.threshold = float(momentum), float(tau), float(threshold)
        self.register_buffer("qhat", torch.full((1, self.num_classes, *spatial), 1.0 / self.num_classes))

    def _check(self, logits: torch.Tensor) -> None:
        check_logits(logits)
        if tuple(logits.shape[1:]) != (self.num_classes, *self.spatial_shape):
            raise ValueError(f"logits {tuple(logits.shape)} do not match q̂ (N, {self.num_classes}, "
                             f"{', '.join(map(str, self.spatial_shape))})")

    @torch.no_grad()
    def debiased_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``sg(z) − τ log q̂`` in float32: logits whose softmax is ``q̃``. ``q̂`` is clamped at the smallest normal
        float32 inside the log: a class whose probability underflowed to 0 for thousands of steps would otherwise make
        ``log q̂ = −inf`` and the pseudo-labels NaN (DHC has no guard)."""
        self._check(logits)
        return logits.detach().float() - self.tau * torch.log(self.qhat.clamp_min(torch.finfo(torch.float32).tiny))

    @torch.no_grad()
    def pseudo_labels(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(argmax q̃, [max q̃ ≥ threshold])`` as ``(N, *spatial)`` long / float tensors, ``q̃ = softmax(sg(z) −
        τ log q̂)``."""
        return confident_argmax(torch.softmax(self.debiased_logits(logits), dim=1), self.threshold, strict=False)

    @torch.no_grad()
    def update(self, logits_unlabeled: torch.Tensor) -> None:
        """``q̂ ← m q̂ + (1 − m) mean_n softmax(z_n)`` from the unlabeled rows' logits."""
        self._check(logits_unlabeled)
        mean_prob = torch.softmax(logits_unlabeled.detach().float(), dim=1).mean(dim=0, keepdim=True)
        self.qhat.mul_(self.momentum).add_(mean_prob, alpha=1.0 - self.momentum)
