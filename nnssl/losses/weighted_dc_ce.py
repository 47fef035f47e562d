"""Class-weighted Dice + cross-entropy that plugs into nnU-Net's ``DeepSupervisionWrapper`` (DHC supervision,
docs/methods/dhc.md).

nnU-Net's ``DC_and_CE_loss`` has no per-call class weights, and DHC swaps its weights every iteration
(``update_weight``). Here the weights are an argument of ``forward`` instead of hidden state, so one module
serves both networks. With deep supervision pass one weight vector per output scale::

    loss = DeepSupervisionWrapper(ClassWeightedDCandCELoss(batch_dice), factors)
    value = loss(outputs, targets, [w] * len(outputs))
"""

from __future__ import annotations

import torch
from torch import nn

from nnssl.debiasing import weighted_soft_dice_loss
from nnssl.losses.cps import weighted_cross_entropy

# nnU-Net's smoothing of its Dice (``nnUNetTrainer._build_loss``: smooth=1e-5)
NNUNET_DICE_SMOOTH = 1e-5


class ClassWeightedDCandCELoss(nn.Module):
    """``L = weight_ce · CE_w(z, y) + weight_dice · SoftDice_w(softmax z, y)`` (docs/methods/dhc.md, DHC ``w_ce+dice``).

    - ``CE_w = Σ_v w[y_v]·ce_v / Σ_v w[y_v]`` over all classes (:func:`nnssl.losses.cps.weighted_cross_entropy`,
      which returns 0 instead of NaN when ``Σ_v w[y_v] = 0``, e.g. a background-only patch and a DistDW
      background weight of 0).
    - ``SoftDice_w = −mean_{k≥1} w_k·dc_k`` (:func:`nnssl.debiasing.weighted_soft_dice_loss`, foreground only,
      negative Dice as nnU-Net and DHC).

    With ``w = 1`` this equals nnU-Net's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` (do_bg=False)
    for the same ``batch_dice`` and ``smooth``, up to the ``1e-8`` DHC adds to the Dice denominator (nnU-Net clamps
    it at 1e-8 instead). Default ``smooth`` is nnU-Net's 1e-5 (DHC: 1). No ignore label, no regions, no DDP
    all-gather of the Dice statistics (nnU-Net's Dice gathers them across ranks when ``batch_dice``).
    """

    def __init__(self, batch_dice: bool, smooth: float = NNUNET_DICE_SMOOTH, weight_ce: float = 1.0,
                 weight_dice: float = 1.0):
        super().__init__()
        if smooth < 0:
            raise ValueError(f"ClassWeightedDCandCELoss smooth must be >= 0, got {smooth}")
        self.batch_dice = bool(batch_dice)
        self.smooth = float(smooth)
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor,
                class_weights: torch.Tensor | None) -> torch.Tensor:
        """``net_output`` logits ``(N, K, *sp)``; ``target`` nnU-Net labels ``(N, 1, *sp)``; ``class_weights``
        ``(K,)`` or ``None`` (all ones)."""
        loss = net_output.new_zeros((), dtype=torch.float32)
        if self.weight_ce != 0:
            loss = loss + self.weight_ce * weighted_cross_entropy(net_output, target, class_weights)
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * weighted_soft_dice_loss(net_output, target, class_weights, do_bg=False,
                                                                     batch_dice=self.batch_dice, smooth=self.smooth)
        return loss
