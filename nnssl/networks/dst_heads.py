"""DST's extra heads on a U-Net's encoder (docs/methods/dst.md; ``xmed-lab/DHC code/models/vnet_dst.py``
``VNet_Decoupled``: one encoder, three decoders ``decoder`` / ``decoder_pseudo`` / ``decoder_worst``).

In nnssl the plans' U-Net stays the network nnU-Net saves and predicts with (its decoder is the main head); the
pseudo and worst-case heads are further decoders of the same architecture that read the encoder's skips, recorded by
:class:`EncoderSkipsTap` while the network runs its ordinary forward (through any compile / DDP wrapper).
"""

from __future__ import annotations

from torch import nn

from nnssl.networks.feature_tap import DecoderFeatureTap
from nnssl.tensors import unwrap


class EncoderSkipsTap(DecoderFeatureTap):
    """Forward hook on ``network.encoder`` of a dynamic-network-architectures U-Net: records the encoder's skips
    (a list, bottleneck last) while :meth:`capture` is active; ``take()`` hands them over (the
    :class:`~nnssl.networks.feature_tap.DecoderFeatureTap` protocol, on the encoder instead of the last decoder stage).
    The skips keep their graph, so a head's loss reaches the encoder."""

    def __init__(self, network: nn.Module):
        encoder = getattr(unwrap(network), "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"DST needs a U-Net with an encoder/decoder; got {type(unwrap(network)).__name__}")
        self.features = None
        self._active = False
        self._handle = encoder.register_forward_hook(self._hook)


def encoder_free_decoder(unet: nn.Module) -> nn.Module:
    """The decoder of a freshly built ``unet`` (its init kept), without the reference to that U-Net's encoder, so
    that it can decode another encoder's skips of the same architecture; full-resolution output only."""
    decoder = getattr(unet, "decoder", None)
    if not isinstance(decoder, nn.Module) or not hasattr(decoder, "deep_supervision"):
        raise TypeError(f"DST needs a U-Net with a UNetDecoder; got {type(unet).__name__}")
    if hasattr(decoder, "encoder"):
        del decoder.encoder  # the encoder belongs to the main network alone (one optimizer, saved once)
    decoder.deep_supervision = False
    return decoder
