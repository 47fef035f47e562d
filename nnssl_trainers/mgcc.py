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
from nnssl.tensors import full_resolution, unwrap
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.step import SSLTerms


def _rows(output: Tensor | list[Tensor], rows: slice) -> Tensor | list[Tensor]:
    return [o[rows] for o in output] if isinstance(output, (list, tuple)) else output[rows]


class nnUNetTrainerMGCC(nnUNetTrainerSSLBase):
    """MGCC, multi-level global-context cross-consistency (Tang et al. 2023, arXiv 2305.09447; docs/methods/mgcc.md),
    stage 2 (semi-supervised segmentation) on nnU-Net's plans, 2D and 3D.

    Network (docs/methods/mgcc.md; ``nnssl/networks/multi_decoder.py``): the plans' encoder, shared by one main and
    three auxiliary decoders (the plans' ``UNetDecoder``), and three ConvMixer blocks CM1, CM2, CM3 on the bottleneck
    x5 (each 3 layers of residual depthwise 7^d conv -> GELU -> norm, then 1x1 conv -> GELU -> norm). In training
    every decoder reads all encoder levels (skips included), each auxiliary decoder through its own perturbation:

    - aux1 <- FeatureDropout([x1..x4, x5]) (zero locations whose channel-mean ``a >= gamma max a``, gamma~U(.7,.9)),
    - aux2 <- Dropout p=0.3 ([x1..x4, CM1(x5)]),
    - aux3 <- FeatureNoise 0.3 ([x1..x4, CM2(CM1(x5))]) (``x + x n``, n~U(-.3,.3) shared by the batch),
    - main <- clean [x1..x4, CM3(CM2(CM1(x5)))].

    Loss on a batch of labeled patches ``B_l`` and unlabeled patches ``B_u`` (concatenated, one encoder pass):
    ``L = L_sup + lambda(t) L_cons`` (docs/methods/mgcc.md) with
    ``L_sup = (1/4) sum_{d in main, aux1..3} DC_CE_ds(z_l^d, y)`` (nnU-Net's Dice+CE with deep supervision in
    place of the official BCE+Dice; the paper averages main and auxiliary supervised losses, and so does this
    trainer) and ``L_cons = (1/3) sum_i mean((P(z_u^main) - P(z_u^aux_i))^2)`` on the full-resolution unlabeled
    outputs, nothing detached (gradients reach the main decoder, every auxiliary decoder and the shared encoder).
    ``P`` is softmax over nnU-Net's K >= 2 output channels, generalising the official single-channel sigmoid:
    with K = 2 the mean over both channels of ``(p - q)^2`` equals the official ``(sigmoid(z) - sigmoid(z'))^2``
    for the foreground logit difference, so lambda = 7 keeps its meaning for binary tasks (BUSI); with K > 2 the
    channel mean makes the term smaller, so ``unsupervised_weight`` is a class attribute (variant
    ``nnUNetTrainerMGCC_lambda1``). Region-based plans use a sigmoid per region channel.
    ``lambda(t) = 7 sigmoid_rampup(t, L)`` with t the iteration and L = ``rampup_length()``: 30 000 iterations (the
    official ``iter // 150`` with length 200), capped at 1.5 times the schedule instead of the base's 40 %. The
    official ramp is 1.5 times its own schedule (30 000 of 20 000 iterations), so lambda only reaches
    ``7 exp(-5/9) = 4.0`` at the end; keeping that ratio on short schedules matters for MGCC because lambda = 7 on
    a consistency term with nothing detached, reached before the main decoder has learned anything, pulls every
    decoder to the same all-background output (measured: 2D synthetic, 200 iterations, main-path Dice 0.00 with
    the 40 % cap, 0.88 with lambda 1). nnU-Net's 1000 x 250 schedule still ramps over the paper's 30 000.

    Inference: ``nnUNetv2_predict -tr nnUNetTrainerMGCC`` uses the main path, encoder -> CM1..CM3 -> main decoder
    (``self.network``, what ``network_weights`` holds; ``build_network_architecture`` is overridden to build it),
    with no perturbation, as the official eval forward. The auxiliary decoders are a trainable extra network
    (``auxiliary_decoders``, own optimizer, saved under ``nnssl_state`` and restored by ``--c``); they hold no
    encoder, so the encoder and the ConvMixers are stepped once per iteration by the main optimizer while
    receiving the auxiliary losses' gradients. ``nnUNetTrainerMGCC_noGlobalContext`` leaves out the ConvMixers:
    its inference network is then exactly the plans' plain nnU-Net (its weights load into ``PlainConvUNet``).

    Using generated or other extra unlabeled images (the paper's stage 1, a latent diffusion model generating
    ultrasound images, is not part of nnssl): put them in a folder, one image per file with the dataset's file
    ending, then::

        nnssl_add_unlabeled DATASET_ID FOLDER --prefix gen_          # copies them to imagesUnlabeled, lists them
        nnssl_preprocess_unlabeled -d DATASET_ID -c 2d               # only the new cases are preprocessed
        nnUNetv2_train DATASET_ID 2d 0 -tr nnUNetTrainerMGCC

    RGB PNGs are converted to the dataset's single grey channel; the plans do not change (they come from the
    labeled cases), so no re-planning is needed.

    Logged per epoch: the common keys (``loss_supervised`` = ``L_sup``, ``loss_unsupervised`` = ``L_cons``,
    ``unsupervised_weight``, confidence of the main decoder on unlabeled voxels, ``agreement``: fraction of
    unlabeled voxels where the main and an auxiliary decision agree, mean over the auxiliary decoders) and
    ``mgcc_loss_supervised_main``.

    Deviations from the official code, forced by nnU-Net or by 3D: the backbone is the plans' U-Net (no MSAG
    attention gates on the skips, which belong to the CMU-Net backbone, not to the SSL method; nnU-Net's strided
    convs and stage count instead of 5 max-pooled stages of 64..1024 channels); ConvMixers use the plans' norm
    (InstanceNorm) instead of BatchNorm and 7^3 kernels in 3D; supervised loss Dice+CE with deep supervision on
    every decoder (SSL term at full resolution only); nnU-Net's optimiser, poly lr, patch and batch size and
    augmentation (official: SGD 0.01, 256x256, 4+4 images, flips/rot90). One encoder and four decoders on the
    labeled + unlabeled batch need about 2.5 times the activation memory of one U-Net on that batch
    (``nnUNetTrainerMGCC_mainSupervisionOnly`` runs the auxiliary decoders on the unlabeled half only).
    The perturbation order is that of the snapshot read for docs/methods/mgcc.md (aux1 feature dropout, aux3 feature
    noise); the later official snapshot swaps aux1 and aux3 (``nnUNetTrainerMGCC_snapshotOrder``).
    """

    unsupervised_weight = 7.0
    log_prefix = "mgcc"
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
        return torch.sigmoid(logits.float()) > 0.5 if self.label_manager.has_regions else logits.argmax(1)

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


class nnUNetTrainerMGCC_lambda1(nnUNetTrainerMGCC):
    """lambda = 1: for multi-class tasks, where the softmax MSE averaged over K channels is smaller."""

    unsupervised_weight = 1.0
