"""Cross pseudo supervision trainers (docs/methods/cps.md): ``nnUNetTrainerCPS``, ``nnUNetTrainerCPS_wholeBatch`` and
``nnUNetTrainerCPS_ensemble`` (predicts with both networks' averaged softmax; a finished CPS run becomes one with
:func:`nnssl.cps_ensemble.export_cps_ensemble`)."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.losses.cps import cps_loss_on_batch
from nnssl.network_pair import NetworkPair, xavier_normal_init_
from nnssl.tensors import argmax_agreement, as_list, unwrap
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.passes import PAIR_PASSES, NetworkPass
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


class nnUNetTrainerCPS_ensemble(nnUNetTrainerCPS):
    """CPS trained exactly as ``nnUNetTrainerCPS``, but ``self.network`` is a :class:`nnssl.network_pair.NetworkPair`
    holding both networks, so ``network_weights`` holds both (``net1.*``, ``net2.*``) and ``nnUNetv2_predict -tr
    nnUNetTrainerCPS_ensemble`` (and nnU-Net's validation) predicts with the **average of both networks' softmax**
    (as ``log`` of the mean probabilities, a valid logit tensor for nnU-Net's sliding window and mirroring).

    Both networks share one SGD optimizer and lr scheduler (SGD acts on each parameter alone, so this equals two
    with the same settings); gradients are clipped to norm 12 per network; the checkpoint is nnU-Net's own.
    """

    second_network = None  # network 2 lives inside self.network (the pair)
    network_passes = (NetworkPass("both", True, scale=2.0, note="the pair: both networks in one module"),)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        def build() -> nn.Module:
            return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)

        return NetworkPair(build(), xavier_normal_init_(build()))

    @property
    def network2(self) -> nn.Module:
        return unwrap(self.network).net2

    def forward_both(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out1, out2 = self.network(x, return_both=True)  # through the compile / DDP wrappers of the pair
        return as_list(out1), as_list(out2)

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net's version sets ``decoder.deep_supervision`` on self.network, which the pair does not have
        unwrap(self.network).set_deep_supervision(enabled)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """One backward, clip each network of the pair to norm 12, one optimizer step (GradScaler on CUDA)."""
        pair = unwrap(self.network)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        for net in (pair.net1, pair.net2):
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
