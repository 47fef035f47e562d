"""Cross pseudo supervision trainers (docs/methods/cps.md): ``nnUNetTrainerCPS``, ``nnUNetTrainerCPS_wholeBatch`` and
``nnUNetTrainerCPS_ensemble`` (predicts with both networks' averaged softmax; a finished CPS run becomes one with
:func:`nnssl.cps_ensemble.export_cps_ensemble`)."""

from __future__ import annotations

import torch

from nnssl.losses.cps import cps_loss_on_batch
from nnssl.tensors import argmax_agreement, as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.network_pair_training import PairInOneModule
from nnssl.training.passes import PAIR_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerCPS(nnUNetTrainerSSLBase):
    """Cross pseudo supervision (Chen et al., CVPR 2021, Eq. 1-4) as SSL4MIS
    ``train_cross_pseudo_supervision_3D.py`` runs it (docs/methods/cps.md)::

        L = DC+CE(z_l^1, y) + DC+CE(z_l^2, y) + λ(t) · [CE(z_u^1, ŷ_u^2) + CE(z_u^2, ŷ_u^1)],  ŷ = argmax sg(z)
        λ(t) = 0.1 · sigmoid_rampup(t, rampup_length())

    Network 1 is ``self.network`` (nnU-Net's He init), network 2 the declared second network, re-initialised
    xavier-normal with norm weight 1 / bias 0 as SSL4MIS and DHC do; each has its own optimizer and lr schedule.
    nnU-Net's Dice+CE with deep supervision for the supervised terms, the CPS term on the full-resolution output of
    the unlabeled patches (``nnUNetTrainerCPS_wholeBatch``: labeled + unlabeled, DHC ``train_cps.py``).

    Inference uses **network 1**; ``nnUNetTrainerCPS_ensemble`` (or :func:`nnssl.cps_ensemble.export_cps_ensemble`
    on a finished run) predicts with both networks' averaged softmax. Deviations from SSL4MIS (nnU-Net's optimiser,
    poly lr, patch, batch, augmentation, its Dice+CE at weights 1 + 1, the ramp evaluated every iteration and capped
    at 40 % of the schedule) are in docs/methods/cps.md.
    """

    second_network = "xavier"
    unsupervised_weight = 0.1
    cps_on_labeled: bool = False
    log_prefix = "cps"
    network_passes = PAIR_PASSES
    supports_regions = False
    unsupported_reason = "hard pseudo-labels need mutually exclusive (softmax) classes"

    def forward_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs of network 1 and network 2 on ``x`` (deep-supervision lists, full resolution first)."""
        return as_list(self.network(x)), as_list(self.network2(x))

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        out1, out2 = self.forward_both(torch.cat((data, unlabeled)))
        supervised_1 = self.supervised_loss(out1, target, n_l)
        supervised_2 = self.supervised_loss(out2, target, n_l)
        unlabeled_1, unlabeled_2 = out1[0][n_l:], out2[0][n_l:]
        return SSLTerms(supervised_1 + supervised_2, cps_loss_on_batch(out1[0], out2[0], n_l, self.cps_on_labeled),
                        pseudo_label_logits=(unlabeled_1, unlabeled_2),
                        agreement=argmax_agreement(unlabeled_1, unlabeled_2),
                        extras={"loss_supervised_1": supervised_1, "loss_supervised_2": supervised_2})


class nnUNetTrainerCPS_wholeBatch(nnUNetTrainerCPS):
    """CPS on labeled + unlabeled patches, as DHC ``train_cps.py`` (docs/methods/cps.md)."""

    cps_on_labeled = True


class nnUNetTrainerCPS_unsupWeight0p2(nnUNetTrainerCPS):
    """CPS at twice the paper's weight (0.2): nnU-Net's supervised Dice+CE (weights 1 + 1) is about twice SSL4MIS's
    0.5 (CE + Dice), so 0.2 restores the paper's ratio of the two terms (issue-16 ablation, docs/methods/cps.md)."""

    unsupervised_weight = 0.2

class nnUNetTrainerCPS_ensemble(PairInOneModule, nnUNetTrainerCPS):
    """CPS trained exactly as ``nnUNetTrainerCPS``, but ``self.network`` is a :class:`nnssl.network_pair.NetworkPair`
    holding both networks (:class:`nnssl.training.network_pair_training.PairInOneModule`), so ``network_weights``
    holds both (``net1.*``, ``net2.*``) and ``nnUNetv2_predict -tr nnUNetTrainerCPS_ensemble`` (and nnU-Net's
    validation) predicts with the **average of both networks' softmax** (as ``log`` of the mean probabilities, a
    valid logit tensor for nnU-Net's sliding window and mirroring). One SGD optimizer for both networks."""
