"""MGCC's shared-encoder, multi-decoder network built from an nnU-Net plans file (docs/methods/mgcc.md).

Two modules, so that only the inference path is what nnU-Net saves and predicts with:

- :class:`GlobalContextUNet` (the *main path*): the plans' encoder, an optional chain of ConvMixer blocks
  CM1..CMn on the bottleneck ("global context") and the plans' decoder. ``forward(x)`` is the main decoder's
  output (with or without deep supervision, as any nnU-Net network); ``forward(x, return_features=True)``
  also returns the clean encoder skips and every level of the bottleneck chain
  ``[x5, CM1(x5), CM2(CM1(x5)), ..., CMn(...)]``, the main decoder using the last one. Without the chain its
  state dict has exactly the keys of the plans' own network (e.g. ``PlainConvUNet``).
- :class:`AuxiliaryDecoders`: n further ``UNetDecoder``\\ s on the same encoder (they do not own it) with a
  multi-level feature perturbation each; auxiliary decoder i reads the skips and bottleneck level i, all
  perturbed. Its output is only used for training.

:class:`MultiDecoderNetwork` joins the two with MGCC's train/eval contract (docs/methods/mgcc.md): in train mode
``(main, aux_1, ..., aux_n)``, in eval mode the main output alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import Tensor, nn

from nnssl.perturbations import PERTURBATIONS, multi_level_perturbations

__all__ = ["ConvMixerBlock", "GlobalContextChain", "GlobalContextUNet", "FeaturePerturbation", "AuxiliaryDecoders",
           "MultiDecoderNetwork", "MGCC_PERTURBATIONS", "auxiliary_bottlenecks", "build_global_context_unet"]


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvMixerBlock(nn.Module):
    """MGCC's ConvMixer block: ``depth`` times ``x <- norm(GELU(conv1x1(x + norm(GELU(dwconv_k(x))))))``.

    ``dwconv_k`` is a depthwise k^d convolution with 'same' padding (on nnU-Net's small bottleneck it covers the
    whole map: the "global context"). ``norm_op`` is the plans' normalisation (nnU-Net: InstanceNorm) instead of
    the official BatchNorm, because nnU-Net's batches are 2 to 12 patches.
    """

    def __init__(self, channels: int, conv_op: type[nn.Module], depth: int = 3, kernel_size: int = 7,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        if depth < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvMixerBlock: depth must be >= 1 and kernel_size odd, got {depth}, {kernel_size}")
        dim = convert_conv_op_to_dim(conv_op)
        kernel = (kernel_size,) * dim

        def norm() -> nn.Module:
            return norm_op(channels, **dict(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

        layers = []
        for _ in range(depth):
            depthwise = nn.Sequential(conv_op(channels, channels, kernel, padding=kernel_size // 2, groups=channels),
                                      nn.GELU(), norm())
            layers.append(nn.Sequential(_Residual(depthwise), conv_op(channels, channels, 1), nn.GELU(), norm()))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GlobalContextChain(nn.Module):
    """CM1, ..., CMn applied in sequence; ``forward(x)`` returns every level ``[x, CM1(x), CM2(CM1(x)), ...]``."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [x]
        for block in self.blocks:
            levels.append(block(levels[-1]))
        return levels


class GlobalContextUNet(nn.Module):
    """Encoder -> (global-context chain on the bottleneck) -> decoder: MGCC's main path and inference network.

    ``encoder`` must return its skips (bottleneck last) and ``decoder`` take that list, as the encoders and
    decoders of dynamic-network-architectures do. With ``global_context=None`` the module holds the same
    parameters under the same names as the U-Net the two came from.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, global_context: GlobalContextChain | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.global_context = global_context

    def bottleneck_levels(self, bottleneck: Tensor) -> list[Tensor]:
        return self.global_context(bottleneck) if self.global_context is not None else [bottleneck]

    def forward(self, x: Tensor, return_features: bool = False):
        """The main decoder's output; with ``return_features`` also ``(skips above the bottleneck, levels)``."""
        skips = self.encoder(x)
        levels = self.bottleneck_levels(skips[-1])
        out = self.decoder([*skips[:-1], levels[-1]])
        if return_features:
            return out, list(skips[:-1]), levels
        return out


def build_global_context_unet(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                              input_channels: int, output_channels: int, deep_supervision: bool,
                              n_context_blocks: int = 3, context_depth: int = 3,
                              context_kernel_size: int = 7) -> GlobalContextUNet:
    """The plans' U-Net (nnU-Net's ``get_network_from_plans``, initialised as nnU-Net does) with
    ``n_context_blocks`` ConvMixer blocks inserted before its decoder (0: the plans' network unchanged)."""
    if n_context_blocks < 0:
        raise ValueError(f"n_context_blocks: must be >= 0, got {n_context_blocks}")
    unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                  output_channels, allow_init=True, deep_supervision=deep_supervision)
    if not hasattr(unet, "encoder") or not hasattr(unet, "decoder"):
        raise ValueError(f"{arch_class_name}: MGCC needs an encoder/decoder U-Net from dynamic-network-architectures")
    encoder = unet.encoder
    chain = None
    if n_context_blocks:
        chain = GlobalContextChain([
            ConvMixerBlock(encoder.output_channels[-1], encoder.conv_op, context_depth, context_kernel_size,
                           encoder.norm_op, encoder.norm_op_kwargs) for _ in range(n_context_blocks)])
    return GlobalContextUNet(encoder, unet.decoder, chain)


@dataclass(frozen=True)
class FeaturePerturbation:
    """One of :mod:`nnssl.perturbations` by name with its arguments, applied to every feature level."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name != "none" and self.name not in PERTURBATIONS:
            raise ValueError(f"FeaturePerturbation: unknown {self.name!r}; choose from "
                             f"{sorted(PERTURBATIONS) + ['none']}")

    def __call__(self, features: Sequence[Tensor]) -> list[Tensor]:
        return multi_level_perturbations(features, self.name, **dict(self.kwargs))


# MGCC order (docs/methods/mgcc.md): aux1 feature dropout (on x5), aux2 dropout p=0.3 (on CM1(x5)), aux3 feature
# noise 0.3 (on CM2(CM1(x5))). The later official snapshot swaps aux1 and aux3.
MGCC_PERTURBATIONS = (
    FeaturePerturbation("feature_dropout", {"gamma_range": (0.7, 0.9)}),
    FeaturePerturbation("spatial_dropout", {"p": 0.3}),
    FeaturePerturbation("feature_noise", {"magnitude": 0.3}),
)


def auxiliary_bottlenecks(levels: Sequence[Tensor], n_auxiliary: int) -> list[Tensor]:
    """Bottleneck input of each auxiliary decoder: level i of the chain for decoder i (the main decoder takes the
    last level), or the plain bottleneck for every decoder when there is no chain."""
    if len(levels) == 1:
        return [levels[0]] * n_auxiliary
    if len(levels) != n_auxiliary + 1:
        raise ValueError(f"{len(levels)} bottleneck levels for {n_auxiliary} auxiliary decoders: a global-context "
                         f"chain needs one block per auxiliary decoder")
    return list(levels[:-1])


class AuxiliaryDecoders(nn.Module):
    """One ``UNetDecoder`` per perturbation, built for ``encoder``'s skips but not owning it.

    ``forward(skips, bottlenecks)``: decoder i decodes ``perturbation_i([*skips, bottlenecks[i]])`` (every level,
    skips included: MGCC's multi-level perturbation). Perturbations are always active; the module is only used in
    training. Gradients flow back into the features, hence into the shared encoder.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, n_conv_per_stage: int | Sequence[int],
                 perturbations: Sequence[FeaturePerturbation] = MGCC_PERTURBATIONS, deep_supervision: bool = True,
                 nonlin_first: bool = False):
        super().__init__()
        if not perturbations:
            raise ValueError("AuxiliaryDecoders: need at least one perturbation")
        decoders = []
        for _ in perturbations:
            decoder = UNetDecoder(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
            # UNetDecoder registers the encoder as its submodule; dropped so that the shared encoder's parameters
            # belong to the main network alone (one optimizer step per iteration, saved once in network_weights)
            del decoder.encoder
            decoders.append(decoder)
        self.decoders = nn.ModuleList(decoders)
        self.perturbations = tuple(perturbations)
        self.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its U-Net decoders

    def set_deep_supervision(self, enabled: bool) -> None:
        for decoder in self.decoders:
            decoder.deep_supervision = enabled

    def forward(self, skips: Sequence[Tensor], bottlenecks: Sequence[Tensor]) -> list[Tensor | list[Tensor]]:
        if len(bottlenecks) != len(self.decoders):
            raise ValueError(f"AuxiliaryDecoders: {len(bottlenecks)} bottlenecks for {len(self.decoders)} decoders")
        return [decoder(perturb([*skips, bottleneck]))
                for decoder, perturb, bottleneck in zip(self.decoders, self.perturbations, bottlenecks)]


class MultiDecoderNetwork(nn.Module):
    """MGCC's model: train mode returns ``(main, aux_1, ..., aux_n)``, eval mode the main output only
    (no perturbation, deterministic)."""

    def __init__(self, main: GlobalContextUNet, auxiliary: AuxiliaryDecoders):
        super().__init__()
        self.main = main
        self.auxiliary = auxiliary

    def forward(self, x: Tensor):
        if not self.training:
            return self.main(x)
        out, skips, levels = self.main(x, return_features=True)
        return (out, *self.auxiliary(skips, auxiliary_bottlenecks(levels, len(self.auxiliary.decoders))))

