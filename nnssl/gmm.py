"""GuidedNet "3D-CGMM" math (docs/methods/guidednet.md) and a literal class-conditional GMM variant.

Two things live here:

1. The functions GuidedNet's official code actually computes (``utils/tools.py`` of ``kimjisoo12/GuidedNet``).
   Despite the name this is not an EM-fitted mixture: every labelled sample contributes one prototype per class
   present in its label map (the class mean of its decoder features), and the "responsibility" of class k at a voxel
   is a fixed-bandwidth kernel ``r_k = exp(-d_k^2)`` of the mean absolute feature difference ``d_k``.
   Losses pull the network's probabilities towards the kernel maps (labelled and unlabelled) and the kernel maps
   towards the ground truth (labelled), plus a prototype repulsion term and a cross-network consistency.

2. :class:`DiagonalGaussianMixture`, the paper's description taken literally: per class k a mixture of ``M``
   diagonal Gaussians over the feature vectors, fitted by a few EM steps on labelled features each iteration and
   blended into a persistent state by momentum. Its class posterior rectifies pseudo-labels via
   :func:`rectify_pseudo_labels`.

Conventions: features ``(N, C, *spatial)``, probabilities / maps ``(N, K, *spatial)``, labels ``(N, *spatial)`` or
``(N, 1, *spatial)`` with integer class ids; ids outside ``[0, K)`` are treated as "ignore" (the official
``one_hot`` drops ids ``>= K``). Any number of spatial dims >= 1 works, so 2D, 3D and the flattened output of
:func:`subsample_voxels` are all accepted. All arithmetic runs in float32 with autocast disabled, whatever the
input dtype, so bf16/fp16 activations under CUDA autocast cannot overflow ``exp`` or produce ``log(0)``.
Outputs are float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BCE_EPS",
    "class_prototypes",
    "kernel_responsibility",
    "labeled_gmm_loss",
    "unlabeled_gmm_loss",
    "prototype_repulsion",
    "pair_unlabeled_with_labeled",
    "cross_network_kernel_consistency",
    "subsample_voxels",
    "DiagonalGaussianMixture",
    "rectify_pseudo_labels",
]

BCE_EPS = 1e-6  # the official code's eps inside both logs of its hand-written BCE
PRESENCE_EPS = 1e-6  # the official code's eps in "/(sum_k c_k + 1e-6)" and in the prototype means


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _float32_region(device: torch.device) -> Iterator[None]:
    """Disable autocast so that matmuls/scatters below really run in the float32 we cast to."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _check_maps(name: str, x: Tensor, min_spatial: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 + min_spatial:
        raise ValueError(
            f"{name}: expected shape (N, C, *spatial) with >= {min_spatial} spatial dim, got {tuple(x.shape)}"
        )


def _labels_as_nsp(labels: Tensor, spatial_shape: Sequence[int], n: int, name: str = "labels") -> Tensor:
    """Return labels as a long tensor (N, *spatial); accepts (N, *spatial) or (N, 1, *spatial)."""
    if labels.ndim == len(spatial_shape) + 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if tuple(labels.shape) != (n, *spatial_shape):
        raise ValueError(
            f"{name}: expected shape (N, *spatial) = {(n, *spatial_shape)} (or with a singleton channel), "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        labels = labels.round()
    return labels.long()


def _check_present(present: Tensor, n: int, k: int, name: str = "present") -> Tensor:
    if tuple(present.shape) != (n, k):
        raise ValueError(f"{name}: expected shape (N, K) = {(n, k)}, got {tuple(present.shape)}")
    return present.float()


def _half_bce(target: Tensor, pred: Tensor) -> Tensor:
    """Official elementwise ``0.5 * BCE(target, pred)`` with eps 1e-6 inside both logs.

    ``pred`` is clamped into [0, 1] first: a probability a hair above 1 (rounding) would otherwise give
    ``log(negative) = NaN`` in ``log(1 - pred + 1e-6)``.
    """
    pred = pred.clamp(0.0, 1.0)
    loss = -target * torch.log(pred + BCE_EPS) - (1.0 - target) * torch.log(1.0 - pred + BCE_EPS)
    return 0.5 * loss


def _presence_weighted_class_mean(per_class: Tensor, present: Tensor) -> Tensor:
    """``sum_k c_k * x_k / (sum_k c_k + 1e-6)`` per voxel; ``per_class`` (N, K, V), ``present`` (N, K) -> (N, V)."""
    c = present.unsqueeze(-1)
    return (per_class * c).sum(1) / (c.sum(1) + PRESENCE_EPS)


# ----------------------------------------------------------------------------------------------------------------
# official GuidedNet terms
# ----------------------------------------------------------------------------------------------------------------


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-sample class prototypes of labelled features (docs/methods/guidednet.md; ``tools.cal_protypes``).

    ``mu_{i,k} = sum_{v: y_i(v)=k} f_i(v) / (|{v: y_i(v)=k}| + 1e-6)`` and ``c_{i,k} = 1[k in y_i]``.
    Absent classes get ``mu = 0`` and ``c = 0``. Label ids outside ``[0, K)`` are ignored.
    Gradients flow into ``features`` (the official code does not detach the prototypes).

    Args:
        features: (N, C, *spatial) decoder features of the labelled samples.
        labels: (N, *spatial) or (N, 1, *spatial) integer labels.
        num_classes: K, including background.

    Returns:
        ``(prototypes, present)``: float32 (N, K, C) and float32 0/1 (N, K).
    """
    _check_maps("features", features)
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    n, c = features.shape[:2]
    spatial = features.shape[2:]
    lab = _labels_as_nsp(labels, spatial, n).reshape(n, -1)
    with _float32_region(features.device):
        feat = features.float().reshape(n, c, -1)
        # Ignored ids go to an extra bin K that is dropped at the end; a scatter-add keeps memory at O(N*C*V)
        # where the official per-class boolean indexing (or a one-hot matmul) costs O(N*K*V).
        bins = torch.where((lab >= 0) & (lab < num_classes), lab, torch.full_like(lab, num_classes))
        sums = feat.new_zeros(n, c, num_classes + 1).scatter_add(2, bins.unsqueeze(1).expand(n, c, -1), feat)
        counts = feat.new_zeros(n, num_classes + 1).scatter_add(1, bins, torch.ones_like(bins, dtype=feat.dtype))
        sums, counts = sums[:, :, :num_classes], counts[:, :num_classes]
        prototypes = (sums / (counts.unsqueeze(1) + PRESENCE_EPS)).transpose(1, 2).contiguous()
        present = (counts > 0).float()
    return prototypes, present


class _MeanAbsDistance(torch.autograd.Function):
    """``d[n, k, v] = (1/C) sum_c |f[n, c, v] - mu[n, k, c]|`` without materialising the (N, K, C, V) difference.

    Autograd on the broadcast expression would keep a (N, K, C, V) tensor alive for the backward
    (e.g. 8 x 14 x 16 x 1M voxels = 7 GB for one GuidedNet patch batch). Here forward and backward loop over
    classes, so only (N, C, V) is transient and the saved state is just the inputs.
    """

    @staticmethod
    def forward(ctx, feat: Tensor, protos: Tensor) -> Tensor:  # feat (N, C, V), protos (N, K, C)
        n, c, v = feat.shape
        k = protos.shape[1]
        out = feat.new_empty(n, k, v)
        for j in range(k):
            out[:, j] = (feat - protos[:, j, :, None]).abs().mean(1)
        ctx.save_for_backward(feat, protos)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        feat, protos = ctx.saved_tensors
        c = feat.shape[1]
        need_feat, need_protos = ctx.needs_input_grad[:2]
        grad_feat = torch.zeros_like(feat) if need_feat else None
        grad_protos = torch.zeros_like(protos) if need_protos else None
        for j in range(protos.shape[1]):
            # d|x|/dx = sign(x) with sign(0) = 0, the same subgradient torch.abs uses
            g = torch.sign(feat - protos[:, j, :, None]) * (grad_out[:, j, None, :] / c)
            if need_feat:
                grad_feat += g
            if need_protos:
                grad_protos[:, j] = -g.sum(-1)
        return grad_feat, grad_protos


def kernel_responsibility(features: Tensor, prototypes: Tensor, present: Tensor | None = None) -> Tensor:
    """GuidedNet "Gaussian" responsibility map (docs/methods/guidednet.md; ``tools.GMM`` / ``tools.GMM_predict``).

    ``d_k(v) = (1/C) sum_c |f(v)_c - mu_{k,c}|`` and ``r_k(v) = exp(-d_k(v)^2) * c_k``, so ``r in (0, 1]`` with
    ``r_k(v) = 1`` iff ``f(v) = mu_k``. With ``present`` (labelled branch, ``tools.GMM``) absent classes are set
    to 0; with ``present=None`` (unlabelled branch, ``tools.GMM_predict``) no masking is applied.
    Not detached: gradients reach both ``features`` and ``prototypes``, as in the official code.

    For the unlabelled branch pass the prototypes of the paired labelled samples, e.g.
    ``prototypes[pair_unlabeled_with_labeled(n_u, n_l)]``.

    Args:
        features: (N, C, *spatial).
        prototypes: (N, K, C), row i used for sample i.
        present: optional (N, K) 0/1 presence mask.

    Returns:
        float32 (N, K, *spatial).
    """
    _check_maps("features", features)
    n, c = features.shape[:2]
    spatial = features.shape[2:]
    if prototypes.ndim != 3 or prototypes.shape[0] != n or prototypes.shape[2] != c:
        raise ValueError(
            f"prototypes: expected shape (N, K, C) with N={n}, C={c} matching features, got {tuple(prototypes.shape)}"
        )
    k = prototypes.shape[1]
    with _float32_region(features.device):
        d = _MeanAbsDistance.apply(features.float().reshape(n, c, -1), prototypes.float())
        r = torch.exp(-(d * d))
        if present is not None:
            r = r * _check_present(present, n, k).unsqueeze(-1)
    return r.reshape(n, k, *spatial)


def labeled_gmm_loss(probs: Tensor, responsibility: Tensor, labels: Tensor, present: Tensor) -> Tensor:
    """``loss1 + loss2`` of GuidedNet's labelled GMM loss (docs/methods/guidednet.md; ``tools.cal_gmm_loss``).

    With ``c`` the presence mask of the sample and ``BCE(t, q) = -t log(q + 1e-6) - (1 - t) log(1 - q + 1e-6)``:

    - ``loss1 = mean_{all v} [ sum_k c_k * BCE(r_k(v), p_k(v)) / 2 / (sum_k c_k + 1e-6) ]``
      (the prediction is fitted to the soft kernel map);
    - ``loss2 = mean_{v: 0 <= y(v) < K} [ sum_k c_k * BCE(onehot(y(v))_k, r_k(v)) / 2 / (sum_k c_k + 1e-6) ]``
      (the kernel map is fitted to the ground truth).

    Gradients flow into both ``probs`` and ``responsibility`` (neither is detached officially).
    The prototype repulsion (``proto_loss``, item 5) is NOT included: add :func:`prototype_repulsion`.
    If no voxel has a valid label, ``loss2`` is 0 (the official mean of an empty set would be NaN).

    Args:
        probs: (N, K, *spatial) softmax probabilities of the labelled samples.
        responsibility: (N, K, *spatial) from :func:`kernel_responsibility` with ``present``.
        labels: (N, *spatial) or (N, 1, *spatial).
        present: (N, K) from :func:`class_prototypes`.
    """
    _check_maps("probs", probs)
    if probs.shape != responsibility.shape:
        raise ValueError(f"responsibility: shape {tuple(responsibility.shape)} != probs shape {tuple(probs.shape)}")
    n, k = probs.shape[:2]
    lab = _labels_as_nsp(labels, probs.shape[2:], n).reshape(n, -1)
    with _float32_region(probs.device):
        c = _check_present(present, n, k)
        p = probs.float().reshape(n, k, -1)
        r = responsibility.float().reshape(n, k, -1)
        loss1 = _presence_weighted_class_mean(_half_bce(r, p), c).mean()

        valid = (lab >= 0) & (lab < k)
        onehot = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), k).permute(0, 2, 1).float()
        per_voxel = _presence_weighted_class_mean(_half_bce(onehot, r), c)
        n_valid = valid.sum()
        loss2 = (per_voxel * valid).sum() / n_valid.clamp_min(1)
    return loss1 + loss2


def unlabeled_gmm_loss(probs_u: Tensor, responsibility_u: Tensor, present: Tensor) -> Tensor:
    """GuidedNet unlabelled GMM loss (docs/methods/guidednet.md; ``tools.gmm_loss``), the pseudo-label "rectification".

    ``mean_v [ sum_k c_k * BCE(r^u_k(v), p^u_k(v)) / 2 / (sum_k c_k + 1e-6) ]``: unlabelled probabilities are pulled
    towards the kernel map built from the paired labelled sample's prototypes. ``present`` must already be aligned
    with the unlabelled samples (row j = presence of the labelled sample paired with unlabelled j), e.g.
    ``present_l[pair_unlabeled_with_labeled(n_u, n_l)]``. The official code runs this in fp16; here it is float32.
    """
    _check_maps("probs_u", probs_u)
    if probs_u.shape != responsibility_u.shape:
        raise ValueError(
            f"responsibility_u: shape {tuple(responsibility_u.shape)} != probs_u shape {tuple(probs_u.shape)}"
        )
    n, k = probs_u.shape[:2]
    with _float32_region(probs_u.device):
        c = _check_present(present, n, k)
        p = probs_u.float().reshape(n, k, -1)
        r = responsibility_u.float().reshape(n, k, -1)
        return _presence_weighted_class_mean(_half_bce(r, p), c).mean()


def prototype_repulsion(prototypes: Tensor, present: Tensor, batch_mean: bool = False) -> Tensor:
    """GuidedNet ``proto_loss`` (docs/methods/guidednet.md): repulsion between batch-level class prototypes.

    ``m_k = (sum_i mu_{i,k}) * n_k / (n_k + 1e-6)`` with ``n_k = sum_i c_{i,k}``, then
    ``L = mean_{a<b, n_a>0, n_b>0} exp(-(mean_c |m_a - m_b|)^2)``; 0 when fewer than two classes are present.
    ``L = 1`` when all present batch prototypes coincide and it decreases monotonically with their distance.

    Quirk kept by default: ``m_k`` is approximately the SUM of the per-sample prototypes, not their mean
    (the official code multiplies by ``n_k / (n_k + 1e-6)`` where it presumably meant to divide by ``n_k``), so the
    repulsion scale grows with the number of labelled samples containing class k. Pass ``batch_mean=True`` for the
    true mean ``m_k = sum_i mu_{i,k} / n_k`` (a deliberate deviation from the official code).

    Args:
        prototypes: (N, K, C) from :func:`class_prototypes` (absent entries are 0).
        present: (N, K) 0/1.
    """
    if prototypes.ndim != 3:
        raise ValueError(f"prototypes: expected shape (N, K, C), got {tuple(prototypes.shape)}")
    n, k, _ = prototypes.shape
    with _float32_region(prototypes.device):
        c = _check_present(present, n, k)
        protos = prototypes.float()
        n_k = c.sum(0)  # (K,)
        summed = (protos * c.unsqueeze(-1)).sum(0)  # absent entries are 0 anyway; masking guards odd inputs
        if batch_mean:
            m = summed / n_k.clamp_min(1.0).unsqueeze(-1)
        else:
            m = summed * (n_k / (n_k + PRESENCE_EPS)).unsqueeze(-1)
        in_batch = n_k > 0
        dist = (m.unsqueeze(1) - m.unsqueeze(0)).abs().mean(-1)  # (K, K), K is small
        pair = torch.triu(in_batch.unsqueeze(1) & in_batch.unsqueeze(0), diagonal=1).float()
        num_pairs = pair.sum()
        # official: sum / (num + 1e-6), which is exactly 0 when there is no pair
        return (torch.exp(-(dist * dist)) * pair).sum() / (num_pairs + PRESENCE_EPS)


def pair_unlabeled_with_labeled(n_unlabeled: int, n_labeled: int, device: torch.device | str | None = None) -> Tensor:
    """Index of the labelled sample whose prototypes guide each unlabelled sample (docs/methods/guidednet.md).

    The official ``tools.GMM_predict`` pairs unlabelled j with labelled j and so requires equal sub-batch sizes.
    Here ``pair[j] = j mod n_labeled``: identical to the official pairing when the sizes are equal, and with more
    unlabelled than labelled samples the labelled prototypes are reused cyclically (every labelled sample is used
    as evenly as possible); with fewer unlabelled samples only the first ``n_unlabeled`` labelled ones are used.

    Returns:
        LongTensor (n_unlabeled,) with values in ``[0, n_labeled)``.
    """
    if int(n_labeled) != n_labeled or n_labeled < 1:
        raise ValueError(f"n_labeled: must be a positive integer, got {n_labeled!r}")
    if int(n_unlabeled) != n_unlabeled or n_unlabeled < 0:
        raise ValueError(f"n_unlabeled: must be a non-negative integer, got {n_unlabeled!r}")
    return torch.arange(int(n_unlabeled), device=device) % int(n_labeled)


def cross_network_kernel_consistency(r1: Tensor, r2: Tensor) -> Tensor:
    """Cross-network kernel consistency (docs/methods/guidednet.md): ``mean((softmax_k(r1) - softmax_k(r2))^2)``.

    The softmax runs over the class axis (dim 1) of the two nets' labelled kernel maps; the mean is over all
    elements (N, K, *spatial). No detach on either side (official). The ramp weight is the caller's business.
    """
    _check_maps("r1", r1)
    if r1.shape != r2.shape:
        raise ValueError(f"r2: shape {tuple(r2.shape)} != r1 shape {tuple(r1.shape)}")
    with _float32_region(r1.device):
        return (torch.softmax(r1.float(), dim=1) - torch.softmax(r2.float(), dim=1)).pow(2).mean()


def subsample_voxels(
    tensors: Sequence[Tensor],
    spatial_shape: Sequence[int],
    max_voxels: int,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Flatten the spatial dims and keep the same random ``max_voxels`` voxels in every tensor.

    Lets the GMM terms (prototypes, kernel maps, losses) run on a random subset of voxels of a big 3D patch: all
    functions in this module accept a flattened (N, C, V) layout. Tensors may be (N, C, *spatial) or
    (N, *spatial) (labels); the result is (N, C, V') or (N, V') with ``V' = min(V, max_voxels)``. When ``V <=
    max_voxels`` the tensors are only reshaped (no copy, order kept). The subset is shared by the whole batch.
    Note that a class with very few voxels can miss the subset and then counts as absent for that sample.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if max_voxels < 1:
        raise ValueError(f"max_voxels: must be >= 1, got {max_voxels}")
    nsp = len(spatial_shape)
    v = math.prod(spatial_shape)
    idx = None
    if v > max_voxels:
        idx = torch.randperm(v, generator=generator)[:max_voxels]
    out = []
    for i, t in enumerate(tensors):
        if tuple(t.shape[-nsp:]) != spatial_shape or t.ndim not in (nsp + 1, nsp + 2):
            raise ValueError(
                f"tensors[{i}]: expected (N, *spatial) or (N, C, *spatial) with spatial={spatial_shape}, "
                f"got {tuple(t.shape)}"
            )
        flat = t.reshape(*t.shape[: t.ndim - nsp], v)
        out.append(flat if idx is None else flat.index_select(-1, idx.to(t.device)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the paper taken literally: a class-conditional diagonal GMM fitted by EM
# ----------------------------------------------------------------------------------------------------------------


class _GMMParams(NamedTuple):
    means: Tensor  # (K, M, C)
    variances: Tensor  # (K, M, C)
    weights: Tensor  # (K, M)


_TRANSIENT_ELEMENTS = 2 ** 22  # bounds the (K, chunk, C) transient of the GMM density (16 MiB in float32)


def _component_log_density(x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """``log N(x_v | mean_km, diag(var_km))`` for every class k and component m, all classes in one batched product.

    x: (K, V, C) (each class its own voxels, as in the EM fit) or (1, V, C) (the same voxels for every class);
    means, variances: (K, M, C). Returns (K, M, V): components before voxels, because reductions over M (softmax,
    log-sum-exp) along a strided axis are many times faster on CPU than along a last axis of length M.

    The quadratic form is expanded, ``(1/var) . x^2 - 2 (mu/var) . x + mu^2 . (1/var)``, so it is two batched
    matrix products instead of a (V, M, C) broadcast done class by class (what made the FittedGMM trainer's step
    slow). To keep the expansion from cancelling when features are large relative to the variance floor, x and the
    means are first centred on each class's mean of its component means, so only the spread within a class enters
    the squares; the result is clamped at 0 like the exact form.
    """
    k, m, c = means.shape
    center = means.mean(1, keepdim=True)  # (K, 1, C)
    mu = means - center
    inv_var = 1.0 / variances  # (K, M, C)
    lin = -2.0 * mu * inv_var
    mu_term = (mu.pow(2) * inv_var).sum(-1, keepdim=True)  # (K, M, 1)
    const = variances.log().sum(-1, keepdim=True) + c * math.log(2 * math.pi)  # (K, M, 1)
    n_vox = x.shape[1]
    chunk = max(1, _TRANSIENT_ELEMENTS // (k * max(c, m)))
    out = x.new_empty(k, m, n_vox)
    for start in range(0, n_vox, chunk):
        xc = (x[:, start : start + chunk] - center).transpose(1, 2)  # (K, C, chunk)
        quad = (inv_var @ xc.pow(2) + lin @ xc + mu_term).clamp_min(0.0)
        out[:, :, start : start + chunk] = -0.5 * (quad + const)
    return out


def _em_steps(x: Tensor, valid: Tensor, init: _GMMParams, n_steps: int, var_floor: float) -> _GMMParams:
    """Plain EM for K independent diagonal GMMs at once, one per class, on x (K, V, C) where ``valid`` (K, V) marks
    the voxels that belong to the class (the rest is padding and gets no responsibility). Started from ``init``.

    A component that receives (almost) no responsibility keeps its previous mean and variance, so component
    identities stay aligned with the stored state (needed for the momentum blend). A class without valid voxels
    comes out unchanged except for its weights (the caller does not store it).
    """
    means, variances, weights = init
    mask = valid.to(x.dtype).unsqueeze(1)  # (K, 1, V)
    n = mask.sum(2).clamp_min(1.0)  # (K, 1)
    x2 = x.pow(2)
    for _ in range(n_steps):
        log_r = _component_log_density(x, means, variances) + weights.clamp_min(1e-12).log().unsqueeze(-1)
        resp = torch.softmax(log_r, dim=1) * mask  # (K, M, V)
        nk = resp.sum(2)  # (K, M)
        alive = (nk > 1e-6).unsqueeze(-1)
        safe_nk = nk.clamp_min(1e-6).unsqueeze(-1)
        new_means = resp @ x / safe_nk  # (K, M, C)
        new_vars = (resp @ x2) / safe_nk - new_means.pow(2)
        means = torch.where(alive, new_means, means)
        variances = torch.where(alive, new_vars, variances).clamp_min(var_floor)
        weights = nk / n
    return _GMMParams(means, variances, weights / weights.sum(-1, keepdim=True).clamp_min(1e-12))


class DiagonalGaussianMixture(nn.Module):
    """Class-conditional Gaussian mixture over feature vectors, the paper's "3D-CGMM" taken literally.

    For each class k: ``p(f | k) = sum_m w_{k,m} N(f | mu_{k,m}, diag(sigma^2_{k,m}))`` with ``M`` components.
    State (buffers, so ``state_dict``/``load_state_dict``/``.to(device)`` work as for any module and the trainer can
    checkpoint it): ``means`` (K, M, C), ``variances`` (K, M, C), ``weights`` (K, M), ``fitted`` (K,) bool.
    The GuidedNet official code does NOT do this (see :func:`kernel_responsibility`); this is the alternative
    reading of the paper, offered as a separate option.

    Args:
        num_classes: K, including background.
        num_features: C, the feature channels.
        num_components: M per class.
        var_floor: lower bound on every variance (keeps the log-density finite for collapsed components).
    """

    def __init__(self, num_classes: int, num_features: int, num_components: int = 3, var_floor: float = 1e-3):
        super().__init__()
        for name, val in (
            ("num_classes", num_classes),
            ("num_features", num_features),
            ("num_components", num_components),
        ):
            if int(val) != val or val < 1:
                raise ValueError(f"{name}: must be a positive integer, got {val!r}")
        if not var_floor > 0:
            raise ValueError(f"var_floor: must be > 0, got {var_floor}")
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.num_components = int(num_components)
        self.var_floor = float(var_floor)
        k, m, c = self.num_classes, self.num_components, self.num_features
        self.register_buffer("means", torch.zeros(k, m, c))
        self.register_buffer("variances", torch.ones(k, m, c))
        self.register_buffer("weights", torch.full((k, m), 1.0 / m))
        self.register_buffer("fitted", torch.zeros(k, dtype=torch.bool))

    @property
    def all_classes_fitted(self) -> bool:
        return bool(self.fitted.all())

    def _check_features(self, features: Tensor) -> None:
        _check_maps("features", features)
        if features.shape[1] != self.num_features:
            raise ValueError(f"features: expected {self.num_features} channels, got {features.shape[1]}")

    @torch.no_grad()
    def fit_step(
        self,
        features: Tensor,
        labels: Tensor,
        n_em_steps: int = 3,
        momentum: float = 0.9,
        max_voxels_per_class: int | None = 4096,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A few EM steps per class on the labelled features, blended into the stored state by momentum.

        For each class k present in ``labels``: take its voxel features (at most ``max_voxels_per_class``,
        sampled at random, to bound memory and time on big patches), run ``n_em_steps`` EM steps started from the
        stored parameters (or, the first time a class is seen, from ``M`` random class voxels as means, the class
        feature variance and uniform weights) and set ``theta <- momentum * theta_old + (1 - momentum) * theta_EM``.
        A class seen for the first time takes ``theta_EM`` directly. Classes absent from the batch are unchanged.
        Features are detached (the GMM is a statistic, not a trained module).

        All classes are fitted at once (padded to the largest sample, masked) and nothing is read back to the host,
        so a training step with this fit does not wait for the device.

        Returns:
            (K,) long tensor on the GMM's device: the number of voxels used per class in this step.
        """
        self._check_features(features)
        if n_em_steps < 1:
            raise ValueError(f"n_em_steps: must be >= 1, got {n_em_steps}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {momentum}")
        if max_voxels_per_class is not None and max_voxels_per_class < 1:
            raise ValueError(f"max_voxels_per_class: must be >= 1 or None, got {max_voxels_per_class}")
        n, c = features.shape[:2]
        dev = self.means.device
        lab = _labels_as_nsp(labels, features.shape[2:], n).reshape(-1).to(dev)
        with _float32_region(dev):
            x_all = features.detach().float().reshape(n, c, -1).permute(0, 2, 1).reshape(-1, c).to(dev)  # (N*V, C)
            x, valid = self._sample_class_voxels(x_all, lab, max_voxels_per_class, generator)
            used = valid.sum(1)  # (K,)
            present = used > 0
            # the start of a never-fitted class, computed for every class (small: K x M means, K x C variances),
            # because choosing the classes that need it would read `fitted` back to the host
            init = self._initial_params(x, valid)
            fitted = self.fitted.view(-1, 1, 1)
            start = _GMMParams(torch.where(fitted, self.means, init.means),
                               torch.where(fitted, self.variances, init.variances),
                               torch.where(self.fitted.view(-1, 1), self.weights, init.weights))
            new = _em_steps(x, valid, start, n_em_steps, self.var_floor)
            # a class seen for the first time takes the EM result as is; a class absent from the batch is unchanged
            mom = torch.where(self.fitted, momentum, 0.0).view(-1, 1, 1)
            keep = (~present).view(-1, 1, 1)
            means = mom * self.means + (1 - mom) * new.means
            variances = (mom * self.variances + (1 - mom) * new.variances).clamp_min(self.var_floor)
            w = mom[..., 0] * self.weights + (1 - mom[..., 0]) * new.weights
            self.means.copy_(torch.where(keep, self.means, means))
            self.variances.copy_(torch.where(keep, self.variances, variances))
            self.weights.copy_(torch.where(keep[..., 0], self.weights, w / w.sum(-1, keepdim=True)))
            self.fitted |= present
        return used

    def _sample_class_voxels(self, x_all: Tensor, lab: Tensor, max_voxels: int | None,
                             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per class, up to ``max_voxels`` of its voxels in random order, without reading counts back to the host:
        every voxel gets a random key, keys of other classes are set to -1, and the top keys per class are taken.
        Returns x (K, S, C) and valid (K, S) (False where a class has fewer than S voxels: padding)."""
        keys = torch.rand(lab.shape[0], generator=generator,
                          device=generator.device if generator is not None else lab.device).to(lab.device)
        classes = torch.arange(self.num_classes, device=lab.device).unsqueeze(1)
        keys = torch.where(lab.unsqueeze(0) == classes, keys.unsqueeze(0), -1.0)  # (K, N*V)
        s = lab.shape[0] if max_voxels is None else min(max_voxels, lab.shape[0])
        top, idx = keys.topk(s, dim=1)
        return x_all[idx], top >= 0

    def _initial_params(self, x: Tensor, valid: Tensor) -> _GMMParams:
        """Start of a class never fitted: M of its (randomly ordered) voxels as means (repeated when it has fewer
        than M), its feature variance for every component (1 for a single voxel), uniform weights."""
        m = self.num_components
        count = valid.sum(1, keepdim=True)  # (K, 1)
        pick = torch.arange(m, device=x.device).unsqueeze(0) % count.clamp_min(1)  # (K, M)
        means = torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        mask = valid.to(x.dtype).unsqueeze(-1)
        cnt = mask.sum(1).clamp_min(1.0)  # (K, 1)
        mean = (x * mask).sum(1) / cnt
        var = ((x - mean.unsqueeze(1)).pow(2) * mask).sum(1) / cnt  # (K, C), biased like x.var(unbiased=False)
        var = torch.where(count > 1, var, torch.ones_like(var)).clamp_min(self.var_floor)
        variances = var.unsqueeze(1).expand(-1, m, -1).clone()
        weights = torch.full((x.shape[0], m), 1.0 / m, device=x.device)
        return _GMMParams(means, variances, weights)

    @torch.no_grad()
    def class_log_likelihood(self, features: Tensor) -> Tensor:
        """``log p(f(v) | k)`` as float32 (N, K, *spatial); ``-inf`` for classes never fitted."""
        self._check_features(features)
        n, c = features.shape[:2]
        spatial = features.shape[2:]
        with _float32_region(features.device):
            x = features.detach().float().reshape(n, c, -1).permute(0, 2, 1).reshape(1, -1, c).to(self.means.device)
            dens = _component_log_density(x, self.means, self.variances.clamp_min(self.var_floor))  # (K, M, V)
            out = torch.logsumexp(dens + self.weights.clamp_min(1e-12).log().unsqueeze(-1), dim=1)  # (K, V)
            out = torch.where(self.fitted.unsqueeze(1), out, float("-inf"))
        out = out.reshape(self.num_classes, n, -1).permute(1, 0, 2)
        return out.reshape(n, self.num_classes, *spatial).to(features.device)

    @torch.no_grad()
    def class_posterior(self, features: Tensor) -> Tensor:
        """``p(k | f(v)) = p(f | k) / sum_k' p(f | k')`` (uniform class prior), float32 (N, K, *spatial).

        Computed with a log-sum-exp over classes, so it sums to 1 over the class axis even when every likelihood
        underflows. The prior is deliberately uniform: the network probabilities already carry the class
        frequencies, and :func:`rectify_pseudo_labels` multiplies the two (counting the prior once).
        Classes never fitted get posterior 0; if no class is fitted yet the posterior is uniform.
        """
        log_lik = self.class_log_likelihood(features)
        uniform = torch.full_like(log_lik, 1.0 / self.num_classes)
        # where, not an if: deciding on the host would wait for the device every step
        return torch.where(self.fitted.any(), torch.softmax(log_lik, dim=1).nan_to_num(0.0), uniform)


def rectify_pseudo_labels(probs: Tensor, posterior: Tensor, lam: float, rule: str = "product") -> Tensor:
    """Rectify the network's class probabilities with the GMM class posterior; returns soft pseudo-labels.

    - ``rule="product"`` (default): ``q_k ∝ p_k * g_k^lam``, computed in log space. With ``g`` the uniform-prior
      posterior of :meth:`DiagonalGaussianMixture.class_posterior`, ``lam = 1`` is exactly Bayes' rule for a
      network posterior ``p(k | x)`` and a feature likelihood ``p(f | k)`` assumed conditionally independent
      (product of experts, prior counted once); ``lam in (0, 1)`` tempers the GMM's influence. Voxels where the GMM
      excludes a class (``g_k = 0``) cannot be assigned to it; if the two disagree completely (all ``p_k g_k = 0``)
      the network's ``p`` is kept.
    - ``rule="mixture"``: ``q = (1 - lam) * p + lam * g``, a convex blend (``lam`` in [0, 1]).

    Why product by default: a voxel is relabelled only when the feature-space evidence is strong relative to the
    network's confidence, whereas the mixture can flip a confident prediction just because the GMM is confident.
    ``lam = 0`` returns ``probs`` itself (unchanged, same dtype), i.e. the plain pseudo-labels ``argmax probs``.

    Args:
        probs: (N, K, *spatial) network softmax probabilities (no gradient is needed; the result is detached).
        posterior: (N, K, *spatial) class posterior.
        lam: strength; ``>= 0`` (product), ``[0, 1]`` (mixture).

    Returns:
        float32 (N, K, *spatial) that sums to 1 over classes (or ``probs`` itself when ``lam == 0``);
        the hard pseudo-labels are its argmax over dim 1.
    """
    _check_maps("probs", probs)
    if posterior.shape != probs.shape:
        raise ValueError(f"posterior: shape {tuple(posterior.shape)} != probs shape {tuple(probs.shape)}")
    if rule not in ("product", "mixture"):
        raise ValueError(f"rule: must be 'product' or 'mixture', got {rule!r}")
    if lam < 0 or (rule == "mixture" and lam > 1):
        raise ValueError(f"lam: must be >= 0 (and <= 1 for the mixture rule), got {lam}")
    if lam == 0:
        return probs
    with torch.no_grad(), _float32_region(probs.device):
        p = probs.detach().float().clamp_min(0.0)
        g = posterior.detach().float().to(p.device).clamp_min(0.0)
        if rule == "mixture":
            q = (1.0 - lam) * p + lam * g
            return q / q.sum(1, keepdim=True).clamp_min(1e-12)
        log_q = torch.log(p) + lam * torch.log(g)  # -inf where either is 0
        q = torch.softmax(log_q, dim=1)
        # all -inf in a voxel -> softmax gives NaN; fall back to the network there
        degenerate = torch.isinf(log_q).all(dim=1, keepdim=True) | torch.isnan(q).any(dim=1, keepdim=True)
        p_norm = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.where(degenerate, p_norm, q)
