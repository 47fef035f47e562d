"""MGCC multi-decoder consistency (docs/methods/mgcc.md; ``train.py`` of the official repository)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["multi_decoder_consistency"]


def _probabilities(logits: Tensor) -> Tensor:
    # one channel: the official binary sigmoid; several: the multi-class generalisation
    z = logits.float()
    return torch.sigmoid(z) if z.shape[1] == 1 else torch.softmax(z, dim=1)


def multi_decoder_consistency(main_logits: Tensor, aux_logits: Sequence[Tensor], detach_main: bool = False) -> Tensor:
    """``L_cons = (1/n_aux) sum_i mean((P(z_main) - P(z_aux_i))^2)`` (docs/methods/mgcc.md).

    ``P`` is softmax over dim 1 for K >= 2 channels (generalisation of the paper's binary case) and sigmoid for a
    single channel (exactly the official ``MSE(sigmoid(main), sigmoid(aux_i))``). The mean is over all elements.
    As in the official code nothing is detached, so gradients reach the main and every auxiliary decoder;
    ``detach_main=True`` stops the gradient into the main branch (mean-teacher style alternative).
    Computed in float32 with autocast disabled. Apply it to the unlabelled part of the batch only.

    Args:
        main_logits: (N, K, *spatial).
        aux_logits: non-empty sequence of tensors shaped like ``main_logits``.
    """
    if not isinstance(main_logits, Tensor) or main_logits.ndim < 3:
        raise ValueError(f"main_logits: expected (N, K, *spatial), got {getattr(main_logits, 'shape', main_logits)}")
    aux_logits = list(aux_logits)
    if not aux_logits:
        raise ValueError("aux_logits: need at least one auxiliary decoder output")
    for i, a in enumerate(aux_logits):
        if a.shape != main_logits.shape:
            raise ValueError(f"aux_logits[{i}]: shape {tuple(a.shape)} != main_logits shape {tuple(main_logits.shape)}")
    with torch.autocast(device_type=main_logits.device.type, enabled=False):
        p_main = _probabilities(main_logits.detach() if detach_main else main_logits)
        terms = [(p_main - _probabilities(a)).pow(2).mean() for a in aux_logits]
        return torch.stack(terms).mean()
