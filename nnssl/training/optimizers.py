"""Optimisers of the papers that do not use nnU-Net's SGD, as trainer mixins (one setting each, named in the
trainer variant that uses it)."""

from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class ConstantLRAdam:
    """Mixin placed before an nnU-Net trainer: Adam (default betas, no weight decay) at the constant lr
    ``constant_adam_lr`` for every network the trainer optimises (extra networks reuse ``configure_optimizers``).
    A poly schedule with exponent 0 keeps nnU-Net's per-epoch scheduler calls. ``NNSSL_INITIAL_LR`` does not
    override it (``uses_nnunet_optimizer`` is False): the lr belongs to the paper's optimiser."""

    constant_adam_lr: float = 1e-3
    uses_nnunet_optimizer: bool = False

    # nnU-Net records the constructor's arguments by the signature of type(self).__init__: it must be the explicit one
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.constant_adam_lr  # nnU-Net's __init__ sets its own 0.01

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)
