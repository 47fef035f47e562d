"""Trusting pseudo-labeled cases less than real ones while fine-tuning (an option beyond the FLARE22 paper, which
weights every case equally): a lower loss weight, or a lower sampling probability.

A case is pseudo-labeled iff its id starts with ``pl_`` (the id ``nnssl_pseudolabel`` gives it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from nnssl.pseudolabel.dataset import is_pseudo_id


def pseudo_label_mask(keys: Sequence[str]) -> torch.Tensor:
    """Bool ``(B,)``: True for the pseudo-labeled samples of a batch (keys as nnU-Net's data loader returns them)."""
    return torch.tensor([is_pseudo_id(str(k)) for k in keys], dtype=torch.bool)


def _take(batch: torch.Tensor | list[torch.Tensor], index: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(batch, (list, tuple)):  # deep supervision: one tensor per resolution
        return [t[index.to(t.device)] for t in batch]
    return batch[index.to(batch.device)]


def pseudo_weighted_loss(loss_fn: Callable, output: torch.Tensor | list[torch.Tensor],
                         target: torch.Tensor | list[torch.Tensor], is_pseudo: torch.Tensor,
                         pseudo_weight: float) -> torch.Tensor:
    """``L = (n_r · L(real) + w · n_p · L(pseudo)) / (n_r + n_p)``: the loss of the real and of the pseudo-labeled
    sub-batch, each by ``loss_fn`` (nnU-Net's Dice+CE with deep supervision), mixed by their sample counts with
    weight ``w`` on the pseudo part.

    ``w = 1`` or a batch without pseudo-labeled sample gives ``loss_fn`` on the whole batch, exactly nnU-Net's loss;
    an all-pseudo batch gives ``w · loss_fn``. Samples are weighted by group, not one by one, because nnU-Net's
    Dice is not a per-sample quantity when ``batch_dice`` is on; for a per-sample mean (CE) the formula is exact.
    """
    if not 0 <= pseudo_weight:
        raise ValueError(f"pseudo_weight must be >= 0, got {pseudo_weight}")
    is_pseudo = torch.as_tensor(is_pseudo, dtype=torch.bool).flatten()
    n_pseudo = int(is_pseudo.sum())
    n_total = is_pseudo.numel()
    if n_pseudo == 0 or pseudo_weight == 1:
        return loss_fn(output, target)
    if n_pseudo == n_total:
        return pseudo_weight * loss_fn(output, target)
    real_index = torch.nonzero(~is_pseudo).flatten()
    pseudo_index = torch.nonzero(is_pseudo).flatten()
    loss_real = loss_fn(_take(output, real_index), _take(target, real_index))
    loss_pseudo = loss_fn(_take(output, pseudo_index), _take(target, pseudo_index))
    return ((n_total - n_pseudo) * loss_real + pseudo_weight * n_pseudo * loss_pseudo) / n_total


def pseudo_sampling_probabilities(keys: Sequence[str], pseudo_weight: float) -> np.ndarray | None:
    """Sampling probability of every case for nnU-Net's data loader (``sampling_probabilities``): proportional to
    1 for a real case and ``pseudo_weight`` for a pseudo-labeled one; None (uniform, nnU-Net's default) when there
    is nothing to reweight."""
    if not 0 <= pseudo_weight:
        raise ValueError(f"pseudo_weight must be >= 0, got {pseudo_weight}")
    weights = np.array([pseudo_weight if is_pseudo_id(str(k)) else 1.0 for k in keys], dtype=np.float64)
    if weights.size == 0 or np.all(weights == weights[0]):  # one group only: relative weights change nothing
        return None
    return weights / weights.sum()
