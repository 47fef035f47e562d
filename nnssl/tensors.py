"""Small tensor and module helpers every trainer needs, once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def as_list(output: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A network's output as a list, full resolution first (nnU-Net returns a list only with deep supervision)."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def full_resolution(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of a network's output, with or without deep supervision."""
    return output[0] if isinstance(output, (list, tuple)) else output


def labeled_rows(outputs: Sequence[torch.Tensor], n_labeled: int) -> list[torch.Tensor]:
    """The first ``n_labeled`` samples of every deep-supervision output (the batch is ``[labeled; unlabeled]``)."""
    return [o[:n_labeled] for o in outputs]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` (``OptimizedModule._orig_mod``) and DDP/DataParallel (``.module``)
    wrappers, in any nesting order."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def class_argmax(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``argmax_k scores[:, k]``: the hard label of class scores ``(N, K, *spatial)`` (logits or probabilities), the
    first maximal index as ``torch.argmax`` returns it, long ``(N, *spatial)``.

    Why not ``torch.argmax``: on a CPU its reduction over a dimension that is not the innermost is 4-8x slower than
    ``torch.max(dim).indices`` (torch 2.x, one thread: 77 ms vs 9 ms for a (2, 4, 32, 64, 64) patch batch, 2.3 vs
    0.34 ms in 2D), which made argmax 5-10 % of a CPS, SDCL or GuidedNet step on the CPU speed preset. Both return the
    first maximal index, so the result is identical (unit-tested with ties, fp16 and bf16); on CUDA both are one
    reduction kernel."""
    return scores.max(dim=dim).indices


@torch.no_grad()
def argmax_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``mean_v [argmax_k z_a[v] == argmax_k z_b[v]]``: the fraction of voxels where two hard pseudo-labels agree.
    Logits ``(N, K, *spatial)``; returns a float32 scalar without a graph."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits {tuple(logits_a.shape)} and {tuple(logits_b.shape)} must match")
    return (class_argmax(logits_a) == class_argmax(logits_b)).float().mean()
