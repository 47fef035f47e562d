"""DHC's CPS base as the scripts of its method zoo run it (``xmed-lab/DHC code/train_{depl,adsh,dst,...}.py``): the
shared part of the trainers grafted on it, so that each method's file holds only its own terms.

Per step, on the batch ``x = [x_l; x_u]``: both networks see the whole batch; network A is ``self.network``
(nnU-Net's kaiming init), network B the declared second network, re-initialised xavier-normal as those scripts do
(``model_B = xavier_normal_init_weight(model_B)``; only ``train_dhc.py`` itself keeps kaiming for B); the supervised
term is nnU-Net's DC+CE (deep supervision) of each network on the labeled rows, as the scripts' unweighted
``loss_func(output_A_l, label_l) + loss_func(output_B_l, label_l)``; the unsupervised weight is DHC's per-epoch ramp
``0.1 · sigmoid_rampup(max(e − 1, 0), num_epochs)`` (``cps_w`` is refreshed after each epoch with that epoch's
index, so epoch ``e`` trains with ``r(e − 1)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nnssl.ramps import ConsistencyWeight
from nnssl.tensors import argmax_agreement, as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.step import SSLTerms


class DHCEpochRamp:
    """Mixin: DHC's per-epoch ramp of the unsupervised weight (``-r``), ``rampup_epochs`` long (None: all epochs)."""

    rampup_epochs: int | None = None  # None: num_epochs (DHC: max_epoch)

    def weight_schedule(self) -> ConsistencyWeight:
        """``unsupervised_weight · sigmoid_rampup(max(epoch − 1, 0), L)``, DHC's per-epoch value."""
        length = self.num_epochs if self.rampup_epochs is None else self.rampup_epochs
        return ConsistencyWeight(self.unsupervised_weight, length, unit="epoch", delay=1)


class DHCZooTrainerBase(DHCEpochRamp, nnUNetTrainerSSLBase):
    """Base of the trainers that follow one of DHC's CPS-based zoo scripts (see the module docstring).

    A subclass implements :meth:`unsupervised_terms` from the full-resolution logits of both networks on the whole
    batch and returns the loss with its logged extras; :meth:`ssl_terms` adds the supervised terms, the diagnostics
    and the common extras ``loss_supervised_a`` / ``loss_supervised_b``.
    """

    second_network = "xavier"  # DHC's zoo scripts: A kaiming-normal, B xavier-normal
    unsupervised_weight = 0.1  # the scripts' launch configuration ``-w 0.1``; the ramp: DHCEpochRamp
    supports_regions = False
    unsupported_reason = "hard pseudo-labels need mutually exclusive (softmax) classes"

    def forward_pair(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs of network A and network B on ``inputs`` (deep-supervision lists, full resolution first)."""
        return as_list(self.network(inputs)), as_list(self.network2(inputs))

    def unsupervised_terms(self, logits_a: torch.Tensor, logits_b: torch.Tensor, n_labeled: int
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Mapping[str, torch.Tensor | float]]:
        """Hook: ``(L_unsup, pseudo_label_logits, extras)`` from both networks' full-resolution logits of the batch
        ``[labeled; unlabeled]``; ``pseudo_label_logits``: the unlabeled logits whose argmax is the pseudo-label."""
        raise NotImplementedError(f"{type(self).__name__} must implement unsupervised_terms")

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs_a, outputs_b = self.forward_pair(torch.cat((data, unlabeled)))
        sup_a = self.supervised_loss(outputs_a, target, n_l)
        sup_b = self.supervised_loss(outputs_b, target, n_l)
        full_a, full_b = outputs_a[0], outputs_b[0]
        loss_u, pseudo_logits, extras = self.unsupervised_terms(full_a, full_b, n_l)
        return SSLTerms(sup_a + sup_b, loss_u, pseudo_label_logits=pseudo_logits,
                        agreement=argmax_agreement(full_a[n_l:], full_b[n_l:]),
                        extras={"loss_supervised_a": sup_a, "loss_supervised_b": sup_b, **extras})
