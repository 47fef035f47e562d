import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import Tensor

from nnssl.losses.mgcc import multi_decoder_consistency
from nnssl.networks.multi_decoder import (
    MGCC_PERTURBATIONS,
    AuxiliaryDecoders,
    FeaturePerturbation,
    GlobalContextUNet,
    auxiliary_bottlenecks,
    build_global_context_unet,
)
from nnssl.tensors import class_argmax, full_resolution, unwrap
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.passes import NetworkPass
from nnssl.training.step import SSLTerms


def _rows(output: Tensor | list[Tensor], rows: slice) -> Tensor | list[Tensor]:
    return [o[rows] for o in output] if isinstance(output, (list, tuple)) else output[rows]


class nnUNetTrainerMGCC(nnUNetTrainerSSLBase):
    """MGCC, multi-level global-context cross-consistency (Tang et al. 2023, arXiv 2305.09447, Eq. 1-4), stage 2
    (semi-supervised segmentation) on nnU-Net's plans, 2D and 3D (docs/methods/mgcc.md).

    The plans' encoder is shared by a main and three auxiliary decoders (``nnssl/networks/multi_decoder.py``); three
    ConvMixer blocks CM1..CM3 on the bottleneck give the multi-level global context; aux1 reads the bottleneck
    through feature dropout, aux2 CM1's output through dropout 0.3, aux3 CM2's through feature noise 0.3, the main
    decoder CM3's, clean. On ``[x_l; x_u]`` (one encoder pass)::

        L = L_sup + λ(t) L_cons,   L_sup = (1/4) Σ_{d ∈ main, aux1..3} DC+CE_ds(z_l^d, y)
        L_cons = (1/3) Σ_i mean((P(z_u^main) − P(z_u^aux_i))²),   P = softmax (sigmoid per region channel)
        λ(t) = 7 · sigmoid_rampup(t, L),   L = min(30 000, 1.5 × schedule)   (the official ramp-to-schedule ratio)

    Nothing is detached in ``L_cons``. Inference: the main path (``self.network``), no perturbation; the auxiliary
    decoders are the trainable extra network ``auxiliary_decoders``. Variants, generated unlabeled images
    (``nnssl_add_unlabeled``) and every deviation from the official code: docs/methods/mgcc.md.
    """

    unsupervised_weight = 7.0
    log_prefix = "mgcc"
    # one encoder + main decoder pass, and three auxiliary decoders (about half a network each: no encoder)
    network_passes = (NetworkPass("both", True), NetworkPass("both", True, "auxiliary_decoders", scale=1.5))
    max_rampup_fraction: float = 1.5
    use_global_context: bool = True
    global_context_depth: int = 3
    global_context_kernel_size: int = 7
    auxiliary_perturbations: tuple[FeaturePerturbation, ...] = MGCC_PERTURBATIONS
    supervise_auxiliary: bool = True

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> GlobalContextUNet:
        # a classmethod (nnU-Net calls it on the class at inference, on the instance in training) so that
        # variants choose the architecture through class attributes
        return build_global_context_unet(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
            enable_deep_supervision,
            n_context_blocks=len(cls.auxiliary_perturbations) if cls.use_global_context else 0,
            context_depth=cls.global_context_depth, context_kernel_size=cls.global_context_kernel_size)

    def build_extra_networks(self) -> None:
        arch = self.configuration_manager.network_arch_init_kwargs
        auxiliary = AuxiliaryDecoders(unwrap(self.network).encoder, self.label_manager.num_segmentation_heads,
                                      arch["n_conv_per_stage_decoder"], self.auxiliary_perturbations,
                                      self.enable_deep_supervision, arch.get("nonlin_first", False))
        self.register_extra_network("auxiliary_decoders", auxiliary.to(self.device), trainable=True)

    @property
    def auxiliary_decoders(self) -> torch.nn.Module:
        return self.extra_networks["auxiliary_decoders"]

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        # the base sets ``.decoder.deep_supervision`` on every trainable extra network, which assumes a U-Net;
        # the auxiliary decoders are several decoders, so nnU-Net handles the main network and this method the rest
        nnUNetTrainer.set_deep_supervision_enabled(self, enabled)
        if "auxiliary_decoders" in self.extra_networks:
            unwrap(self.auxiliary_decoders).set_deep_supervision(enabled)

    def consistency_loss(self, main_logits: Tensor, auxiliary_logits: list[Tensor]) -> Tensor:
        if self.label_manager.has_regions:
            # independent sigmoid per region: the official binary term per channel, averaged over channels
            return torch.stack([multi_decoder_consistency(main_logits[:, c:c + 1], [a[:, c:c + 1] for a in
                                                                                    auxiliary_logits])
                                for c in range(main_logits.shape[1])]).mean()
        return multi_decoder_consistency(main_logits, auxiliary_logits)

    def _decisions(self, logits: Tensor) -> Tensor:
        """Hard decision per voxel (argmax; with regions: sigmoid > 0.5 per channel)."""
        return torch.sigmoid(logits.float()) > 0.5 if self.label_manager.has_regions else class_argmax(logits)

    def ssl_terms(self, data: Tensor, target, unlabeled: Tensor) -> SSLTerms:
        n_l = data.shape[0]
        n_aux = len(self.auxiliary_perturbations)
        main_out, skips, levels = self.network(torch.cat((data, unlabeled)), return_features=True)
        # without auxiliary supervision the auxiliary decoders only need the unlabeled rows
        rows = slice(None) if self.supervise_auxiliary else slice(n_l, None)
        aux_outs = self.auxiliary_decoders([s[rows] for s in skips],
                                           [b[rows] for b in auxiliary_bottlenecks(levels, n_aux)])
        loss_sup_main = self.loss(_rows(main_out, slice(None, n_l)), target)
        loss_sup = loss_sup_main
        if self.supervise_auxiliary:
            aux_sup = [self.loss(_rows(a, slice(None, n_l)), target) for a in aux_outs]
            loss_sup = (loss_sup_main + sum(aux_sup)) / (1 + n_aux)
        unlabeled_rows = slice(n_l, None) if self.supervise_auxiliary else slice(None)
        main_u = full_resolution(main_out)[n_l:]
        aux_u = [full_resolution(a)[unlabeled_rows] for a in aux_outs]
        with torch.no_grad():
            hard_main = self._decisions(main_u)
            agreement = torch.stack([(self._decisions(a) == hard_main).float().mean() for a in aux_u]).mean()
        return SSLTerms(loss_sup, self.consistency_loss(main_u, aux_u), pseudo_label_logits=(main_u,),
                        agreement=agreement, extras={"loss_supervised_main": loss_sup_main})


class nnUNetTrainerMGCC_noGlobalContext(nnUNetTrainerMGCC):
    """No ConvMixer blocks: every decoder reads the plain bottleneck; inference network = plain nnU-Net."""

    use_global_context = False


class nnUNetTrainerMGCC_snapshotOrder(nnUNetTrainerMGCC):
    """Perturbations in the order of the later official snapshot: aux1 feature noise, aux3 feature dropout."""

    auxiliary_perturbations = (MGCC_PERTURBATIONS[2], MGCC_PERTURBATIONS[1], MGCC_PERTURBATIONS[0])


class nnUNetTrainerMGCC_mainSupervisionOnly(nnUNetTrainerMGCC):
    """Supervised loss on the main decoder only; the auxiliary decoders see the unlabeled patches only."""

    supervise_auxiliary = False
    network_passes = (NetworkPass("both", True),
                      NetworkPass("unlabeled", True, "auxiliary_decoders", scale=1.5))


class nnUNetTrainerMGCC_lambda1(nnUNetTrainerMGCC):
    """lambda = 1: for multi-class tasks, where the softmax MSE averaged over K channels is smaller."""

    unsupervised_weight = 1.0
