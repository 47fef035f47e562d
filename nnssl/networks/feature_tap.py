"""A forward hook that records the feature map a U-Net's segmentation head reads (GuidedNet's ``rep``)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

from nnssl.tensors import unwrap


class DecoderFeatureTap:
    """Forward hook on the last decoder stage of a dynamic-network-architectures U-Net (``decoder.stages[-1]``).

    That stage's output is the full-resolution feature map fed to the segmentation head (``decoder.seg_layers[-1]``)
    with ``decoder.features_per_stage[0]`` channels: GuidedNet's ``rep`` (docs/methods/guidednet.md). The hook only
    records while :meth:`capture` is active, so validation / final inference of the trainer keep no extra reference, and
    it never changes the output. ``nnUNetv2_predict`` builds the plain plans architecture and knows nothing of it.
    """

    def __init__(self, network: nn.Module):
        decoder = getattr(unwrap(network), "decoder", None)
        stages = getattr(decoder, "stages", None)
        if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
            raise TypeError(f"reading the last decoder feature map needs a U-Net with a UNetDecoder (decoder.stages); "
                            f"got {type(unwrap(network)).__name__}")
        self.features: Tensor | None = None
        self._active = False
        self._handle = stages[-1].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._active:
            self.features = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[DecoderFeatureTap]:
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def take(self) -> Tensor:
        """The features recorded by the last forward inside :meth:`capture` (the reference is released)."""
        if self.features is None:
            raise RuntimeError("DecoderFeatureTap: no features recorded; run the forward inside capture()")
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self._handle.remove()


def decoder_feature_channels(network: nn.Module) -> int:
    """Channels of the feature map :class:`DecoderFeatureTap` records (the segmentation head's input)."""
    return int(unwrap(network).decoder.seg_layers[-1].in_channels)
