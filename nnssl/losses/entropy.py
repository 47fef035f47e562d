"""Entropy minimisation (Grandvalet & Bengio, "Semi-supervised learning by entropy minimization", NeurIPS 2004):
the unsupervised term of the worked example trainer ``nnUNetTrainerEntropyMin`` (README, "Add a method")."""

from __future__ import annotations

import torch

from nnssl.losses.consistency import _check_logits


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = mean_{n,v} -Σ_k p_k log p_k`` with ``p = softmax(z)`` over the class axis 1 (Grandvalet & Bengio 2004,
    Eq. 7: the entropy regulariser of the posterior on unlabeled samples).

    0 for one-hot (infinitely confident) predictions, ``log K`` for uniform ones; computed in float32 with
    ``log_softmax`` (no ``log 0``). Logits ``(N, K, *spatial)``; returns a float32 scalar with a gradient.
    """
    _check_logits(logits, "logits")
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()
