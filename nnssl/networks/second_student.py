"""SDCL's second student: the other one of (plain, residual-encoder) U-Net with the plans' stages
(docs/methods/sdcl.md)."""

from __future__ import annotations

from typing import Sequence

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net ResEnc-M/L blocks per encoder stage (the list is truncated / extended with its last value)
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6)


def _per_stage(values: Sequence[int] | int, n_stages: int, name: str) -> list[int]:
    values = [int(values)] * n_stages if isinstance(values, int) else [int(v) for v in values]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name}: expected positive integers, got {values}")
    return (values + [values[-1]] * n_stages)[:n_stages]


def second_student_architecture(arch_class_name: str, arch_kwargs: dict,
                                blocks_per_stage: Sequence[int] | int = 1,
                                convs_per_stage: Sequence[int] | int = 2) -> tuple[str, dict]:
    """Class name and kwargs of student 2: the other one of (plain, residual-encoder) U-Net with the plans' stages.

    Stages, features, kernel sizes, strides, decoder, norm, nonlinearity and dropout are the plans'. A plain U-Net
    becomes a ``ResidualEncoderUNet`` with ``blocks_per_stage`` residual blocks per encoder stage (1 = the depth of
    nnU-Net's two-conv plain stage; ``RESENC_M_BLOCKS`` = nnU-Net ResEnc-M); a residual one becomes a
    ``PlainConvUNet`` with ``convs_per_stage`` convolutions per stage. Sequences are truncated / extended with their
    last value to ``n_stages``.
    """
    if "n_stages" not in arch_kwargs:
        raise ValueError(f"arch_kwargs: no 'n_stages' in the plans' architecture kwargs ({sorted(arch_kwargs)})")
    n_stages = int(arch_kwargs["n_stages"])
    kwargs = dict(arch_kwargs)
    short_name = arch_class_name.rsplit(".", 1)[-1]
    if short_name == "PlainConvUNet":
        kwargs.pop("n_conv_per_stage", None)
        kwargs.pop("nonlin_first", None)
        kwargs["n_blocks_per_stage"] = _per_stage(blocks_per_stage, n_stages, "blocks_per_stage")
        return RESIDUAL_UNET, kwargs
    if short_name == "ResidualEncoderUNet":
        for key in ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"):
            kwargs.pop(key, None)
        kwargs["n_conv_per_stage"] = _per_stage(convs_per_stage, n_stages, "convs_per_stage")
        return PLAIN_UNET, kwargs
    raise ValueError(f"SDCL needs a second student of a different architecture, but the plans' network "
                     f"{arch_class_name!r} is neither PlainConvUNet nor ResidualEncoderUNet")


def build_second_student(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                         num_input_channels: int, num_output_channels: int, deep_supervision: bool,
                         blocks_per_stage: Sequence[int] | int = 1, convs_per_stage: Sequence[int] | int = 2
                         ) -> nn.Module:
    """Student 2 from the plans' architecture entry (see :func:`second_student_architecture`), He-initialised by
    nnU-Net's ``get_network_from_plans``."""
    name, kwargs = second_student_architecture(arch_class_name, arch_kwargs, blocks_per_stage, convs_per_stage)
    req_import = [k for k in arch_kwargs_req_import if k in kwargs]
    return get_network_from_plans(name, kwargs, req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=deep_supervision)
