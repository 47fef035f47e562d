"""Training two networks held in ONE module (:class:`nnssl.network_pair.NetworkPair`), as a trainer mixin: the
checkpoint's ``network_weights`` then hold both networks and ``nnUNetv2_predict`` predicts with their averaged
softmax (``nnUNetTrainerCPS_ensemble``)."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.network_pair import NetworkPair, xavier_normal_init_
from nnssl.tensors import as_list, unwrap
from nnssl.training.passes import NetworkPass


class PairInOneModule:
    """Mixin placed before an SSL trainer of two networks: ``self.network`` is a ``NetworkPair`` of the plans'
    network (nnU-Net's He init) and a second one re-initialised xavier-normal (:func:`xavier_normal_init_`);
    ``network2`` is the pair's second network, ``forward_both`` runs the pair (through its compile / DDP wrappers).
    Both networks share one optimizer and lr scheduler (SGD acts on each parameter alone, so this equals two with the
    same settings); the step clips each network's gradients to norm 12, as nnU-Net clips its one network."""

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
        out1, out2 = self.network(x, return_both=True)
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
