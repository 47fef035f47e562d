"""Two-network helpers for cross pseudo supervision (docs/methods/cps.md): the second initialisation and a module that
holds both networks and predicts with their averaged softmax.

SSL4MIS ``train_cross_pseudo_supervision_3D.py`` and DHC ``train_cps.py`` initialise network 1 with kaiming-normal
and network 2 with xavier-normal weights (norm weight 1, bias 0). nnU-Net already initialises every network it
builds with kaiming-normal (``InitWeights_He(1e-2)``), so only network 2 needs :func:`xavier_normal_init_`.
"""

from __future__ import annotations

import torch
from dynamic_network_architectures.initialization.weight_init import init_last_bn_before_add_to_0
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: batch and instance norms


def xavier_normal_init_(network: nn.Module) -> nn.Module:
    """Re-initialise ``network`` in place: every (transposed) convolution weight ``~ N(0, 2 / (fan_in + fan_out))``
    (xavier-normal, gain 1) with bias 0; every affine norm weight 1, bias 0. Returns ``network``.

    Conv biases are zeroed as nnU-Net's own kaiming init does, so the two CPS networks differ only in the weight
    distribution. Residual encoders keep nnU-Net's zero init of the last norm before each residual addition
    (``init_last_bn_before_add_to_0``; a no-op for plain U-Nets), so network 2 is the same architecture with the
    same residual start, only differently drawn.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, _CONV_TYPES):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, _NORM_TYPES):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        network.apply(init_last_bn_before_add_to_0)
    return network


def average_softmax_as_logits(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """``log((softmax(z_1) + softmax(z_2)) / 2)`` over the class axis 1, in float32.

    The result is a valid logit tensor whose softmax is exactly the averaged probabilities
    (``softmax(log p) = p`` when ``Σ_k p_k = 1``), so nnU-Net's predictor, losses and argmax can treat it as any
    network output. Probabilities are clamped at the smallest float32 normal before the log to avoid ``-inf``.
    """
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"the two networks' outputs differ in shape: {tuple(logits_1.shape)} vs "
                         f"{tuple(logits_2.shape)}")
    mean_probs = 0.5 * (torch.softmax(logits_1.float(), 1) + torch.softmax(logits_2.float(), 1))
    return torch.log(mean_probs.clamp_min(torch.finfo(torch.float32).tiny))


class NetworkPair(nn.Module):
    """Holds two segmentation networks (``net1``, ``net2``; state-dict keys ``net1.*`` / ``net2.*``).

    ``forward(x)`` returns :func:`average_softmax_as_logits` of both outputs (per deep-supervision scale when the
    networks return lists), which is what ``nnUNetv2_predict`` and nnU-Net's validation see.
    ``forward(x, return_both=True)`` returns ``(output_1, output_2)`` unchanged, for training each network with
    its own loss; passing it through ``forward`` (instead of calling ``net1`` directly) keeps torch.compile and DDP
    wrappers of the pair in the loop.
    """

    def __init__(self, net1: nn.Module, net2: nn.Module):
        super().__init__()
        self.net1 = net1
        self.net2 = net2

    def forward(self, x: torch.Tensor, return_both: bool = False):
        out1, out2 = self.net1(x), self.net2(x)
        if return_both:
            return out1, out2
        if isinstance(out1, (list, tuple)):
            if not isinstance(out2, (list, tuple)) or len(out1) != len(out2):
                raise ValueError("net1 and net2 must both return deep-supervision lists of the same length, or "
                                 "both a single tensor")
            return [average_softmax_as_logits(a, b) for a, b in zip(out1, out2)]
        return average_softmax_as_logits(out1, out2)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Toggle deep supervision of both nnU-Net networks (their ``decoder.deep_supervision`` flag)."""
        for net in (self.net1, self.net2):
            net.decoder.deep_supervision = enabled
