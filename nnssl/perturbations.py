"""MGCC feature perturbations for the auxiliary decoders (docs/methods/mgcc.md; ``src/network/MGCC.py``).

Each function takes one feature map (N, C, *spatial) (2D or 3D) and returns a perturbed map of the same shape
and dtype. They are always active (the official code calls them only in the training forward, so gating by
``model.training`` is the caller's job). Gradients flow through the kept features.
:func:`multi_level_perturbations` applies one of them to every feature level (all skips plus the bottleneck),
which is what MGCC's "multi-level" means.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PERTURBATIONS", "feature_dropout", "feature_noise", "spatial_dropout", "multi_level_perturbations"]


def _check_features(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.ndim < 3:
        raise ValueError(f"{name}: expected a feature map (N, C, *spatial), got {getattr(x, 'shape', type(x))}")


def _uniform(shape: Sequence[int], low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(low, high) float32 on ``like.device``; drawn on the generator's device when a generator is given."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(like.device)


def feature_dropout(
    x: Tensor, gamma_range: tuple[float, float] = (0.7, 0.9), generator: torch.Generator | None = None
) -> Tensor:
    """MGCC ``FeatureDropout``: drop the most activated locations.

    Attention ``a = mean_c x`` (N, 1, *spatial); with one ``gamma ~ U(gamma_range)`` per call (as the official
    ``np.random.uniform`` draw) the threshold of sample i is ``gamma * max a_i`` and every location with
    ``a >= threshold`` is zeroed in all channels. For a sample with ``max a > 0`` this always drops the argmax of
    ``a`` and never a location with ``a < gamma_range[0] * max a``. If ``max a <= 0`` nothing is dropped (official
    behaviour; MGCC's features are post-ReLU so it does not arise there).
    """
    _check_features(x)
    lo, hi = float(gamma_range[0]), float(gamma_range[1])
    if not 0.0 <= lo <= hi:
        raise ValueError(f"gamma_range: expected 0 <= low <= high, got {gamma_range}")
    gamma = _uniform((), lo, hi, x, generator)
    with torch.no_grad():
        attention = x.detach().float().mean(1, keepdim=True)
        max_a = attention.flatten(1).max(1).values.reshape(-1, *([1] * (x.ndim - 1)))
        keep = attention < gamma * max_a
    return x * keep.to(x.dtype)


def feature_noise(x: Tensor, magnitude: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """MGCC ``FeatureNoise``: ``x + x * n`` with ``n ~ U(-magnitude, magnitude)`` of shape (C, *spatial).

    One noise tensor per call, shared by every sample of the batch (official ``sample(x.shape[1:])``).
    """
    _check_features(x)
    if magnitude < 0:
        raise ValueError(f"magnitude: must be >= 0, got {magnitude}")
    noise = _uniform(x.shape[1:], -magnitude, magnitude, x, generator).to(x.dtype).unsqueeze(0)
    return x + x * noise


def spatial_dropout(x: Tensor, p: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """MGCC ``Dropout``: element-wise dropout with rate ``p`` over all channels and locations, kept values scaled by
    ``1 / (1 - p)``; always active (the official ``F.dropout(x, p)`` has ``training=True`` by default).

    Element-wise, not channel-wise (``Dropout2d``), to match the official code despite the name. With a
    ``generator`` the mask is reproducible; without one this is ``torch.nn.functional.dropout``.
    """
    _check_features(x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    if generator is None:
        return torch.nn.functional.dropout(x, p=p, training=True)
    keep = _uniform(x.shape, 0.0, 1.0, x, generator) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


PERTURBATIONS = {
    "feature_dropout": feature_dropout,
    "feature_noise": feature_noise,
    "spatial_dropout": spatial_dropout,
    "dropout": spatial_dropout,
}


def multi_level_perturbations(
    features: Sequence[Tensor], perturbation: str, generator: torch.Generator | None = None, **kwargs: float
) -> list[Tensor]:
    """Apply the named perturbation independently to every feature level (MGCC multi-level perturbation).

    Args:
        features: the encoder skips and the bottleneck, e.g. ``[x1, x2, x3, x4, x5]`` (each (N, C_l, *spatial_l)).
        perturbation: ``"feature_dropout"``, ``"feature_noise"``, ``"spatial_dropout"`` (alias ``"dropout"``) or
            ``"none"`` (identity, for the main decoder).
        generator: optional ``torch.Generator`` (one draw per level, as the official per-level calls).
        kwargs: forwarded to the perturbation (``gamma_range``, ``magnitude``, ``p``).
    """
    if perturbation == "none":
        if kwargs:
            raise ValueError(f"perturbation 'none' takes no arguments, got {sorted(kwargs)}")
        return list(features)
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation: unknown {perturbation!r}; choose from {sorted(PERTURBATIONS) + ['none']}")
    fn = PERTURBATIONS[perturbation]
    return [fn(f, generator=generator, **kwargs) for f in features]
