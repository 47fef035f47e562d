import torch

from nnssl.losses.ssnet import FeatureMemory, VirtualAdversarialDice, ssnet_contrastive_terms
from nnssl.networks.feature_tap import DecoderFeatureTap, decoder_feature_channels
from nnssl.networks.ssnet_heads import SSNetHeads
from nnssl.tensors import as_list, unwrap
from nnssl.training.base import UnsupportedByTrainer, nnUNetTrainerSSLBase
from nnssl.training.dhc_zoo import DHCEpochRamp
from nnssl.training.passes import NetworkPass
from nnssl.training.step import SSLTerms


class nnUNetTrainerSSNet(DHCEpochRamp, nnUNetTrainerSSLBase):
    """SS-Net, smoothness and class separation (Wu et al., MICCAI 2022) as DHC's method zoo runs it
    (``xmed-lab/DHC code/train_ssnet.py``, launched ``-r -w 0.1``; docs/methods/ssnet.md)::

        L = DC+CE_ds(f(x_l), y) + λ(e) · (L_vat + 0.1 · (L_c,l + L_c,u)),   λ(e) = 0.1 · r(max(e - 1, 0), E)
        L_vat = 1 - Dice_bg(softmax f(x + 10 d_adv), sg softmax f(x))     whole batch, d_adv: one power iteration, ξ 10
        L_c = (1/K) Σ_c mean((1 - cos(pred(proj(h_v)), m_c)) · selector weights)     h: last decoder features
        m_c ← 32 lowest-ranked projected correct foreground labeled features of class c (replaced every step)

    ``L_c,l`` uses every labeled voxel with its label, ``L_c,u`` every unlabeled voxel with its argmax. The decoder
    features come from a forward hook (:class:`~nnssl.networks.feature_tap.DecoderFeatureTap`); the heads
    (projection, prediction, 2K selectors: :class:`~nnssl.networks.ssnet_heads.SSNetHeads`) are the extra
    trainable network ``ssnet_heads`` (own optimizer with nnU-Net's settings), the memory is the registered state
    ``ssnet_memory``; DDP is refused. ``nnUNetv2_predict`` uses ``self.network`` (the plain plans architecture).
    Deviations from ``train_ssnet.py`` and why: docs/methods/ssnet.md.
    """

    unsupervised_weight = 0.1
    contrastive_weight: float = 0.1
    memory_per_class: int = 32
    vat_xi: float = 10.0
    vat_epsilon: float = 10.0
    log_prefix = "ssnet"
    # the whole batch three times: the step, VAT's power iteration (autograd to the input) and its adversarial
    # forward; the heads are small MLPs on decoder features
    network_passes = (NetworkPass("both", True),) * 3
    supports_regions = False
    supports_ignore_label = False
    unsupported_reason = "the class memory and the Dice over classes need plain label classes"

    def build_extra_networks(self) -> None:
        if self.is_ddp:  # SyncBatchNorm in per-class heads called a data-dependent number of times would hang
            raise UnsupportedByTrainer(f"{type(self).__name__} does not support DDP: its per-class heads run a "
                                       f"data-dependent number of times on each rank")
        self.feature_tap = DecoderFeatureTap(self.network)
        num_classes = self.label_manager.num_segmentation_heads
        heads = SSNetHeads(decoder_feature_channels(self.network), num_classes).to(self.device)
        self.register_extra_network("ssnet_heads", heads, trainable=True)
        self.memory = self.register_state("ssnet_memory", FeatureMemory(num_classes, self.memory_per_class))
        self.vat = VirtualAdversarialDice(self.vat_xi, self.vat_epsilon)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        inputs = torch.cat((data, unlabeled))
        with self.feature_tap.capture():
            outputs = as_list(self.network(inputs))
        features = self.feature_tap.take()
        labels = (target[0] if isinstance(target, list) else target)[:, 0]
        heads = unwrap(self.extra_networks["ssnet_heads"])
        contrastive_l, contrastive_u = ssnet_contrastive_terms(heads, self.memory, features, outputs[0], labels, n_l)
        vat = self.vat(self.network, inputs, clean_logits=outputs[0])
        unsupervised = vat + self.contrastive_weight * (contrastive_l + contrastive_u)
        return SSLTerms(self.supervised_loss(outputs, target, n_l), unsupervised,
                        pseudo_label_logits=(outputs[0][n_l:],),
                        extras={"loss_vat": vat, "loss_contrastive_labeled": contrastive_l,
                                "loss_contrastive_unlabeled": contrastive_u,
                                "memory_classes": float(self.memory.filled())})
