import torch

from nnssl.losses.urpc import upsample_logits, urpc_consistency
from nnssl.tensors import as_list
from nnssl.training.base import UnsupportedByTrainer, nnUNetTrainerSSLBase
from nnssl.training.dhc_zoo import DHCEpochRamp
from nnssl.training.passes import ONE_NETWORK_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerURPC(DHCEpochRamp, nnUNetTrainerSSLBase):
    """URPC, uncertainty rectified pyramid consistency (Luo et al., MICCAI 2021) as DHC's
    method zoo runs it (``xmed-lab/DHC code/train_urpc.py``, launched ``-r -w 0.1``; docs/methods/urpc.md)::

        p_i = softmax(up(z_i(x_u))),  i = 1..4: nnU-Net's four highest-resolution deep-supervision outputs
        P = mean_i p_i,  v_i = KL(P ‖ p_i) per voxel
        L_u = mean_i [ mean((P - p_i)² e^(-v_i)) / (mean(e^(-v_i)) + 1e-8) + mean(v_i) ]
        L = DC+CE_ds(f(x_l), y) + λ(e) L_u,   λ(e) = 0.1 · sigmoid_rampup(max(e - 1, 0), E)

    The pyramid is nnU-Net's deep supervision (DHC's ``unet_3D_ds`` has four heads at scales 1, 1/2, 1/4, 1/8):
    the lower-resolution logits are upsampled (bi/trilinearly) to full resolution, as DHC's heads upsample theirs.
    One network (``self.network``), which ``nnUNetv2_predict`` uses; deep supervision must be on during training.
    Deviations from ``train_urpc.py`` and why: docs/methods/urpc.md.
    """

    unsupervised_weight = 0.1
    pyramid_levels: int = 4
    log_prefix = "urpc"
    network_passes = ONE_NETWORK_PASSES  # the pyramid is the deep-supervision outputs of the same pass
    supports_regions = False
    unsupported_reason = "the pyramid's KL divergences need mutually exclusive softmax classes"

    def build_extra_networks(self) -> None:
        if not self.enable_deep_supervision:
            raise UnsupportedByTrainer(f"{type(self).__name__} needs deep supervision: its pyramid is nnU-Net's "
                                       f"deep-supervision outputs")

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs = as_list(self.network(torch.cat((data, unlabeled))))
        if len(outputs) < 2:
            raise RuntimeError(f"{type(self).__name__}: the network returned one output; URPC needs its "
                               f"deep-supervision outputs (enable_deep_supervision)")
        pyramid = upsample_logits([o[n_l:] for o in outputs[:self.pyramid_levels]])
        return SSLTerms(self.supervised_loss(outputs, target, n_l), urpc_consistency(pyramid),
                        pseudo_label_logits=(outputs[0][n_l:],), extras={"pyramid_levels": float(len(pyramid))})
