"""GuidedNet's loss terms (Zhao et al., ACM MM 2024; docs/methods/guidednet.md): labeled-feature guidance
("3D-CGMM", formulas in :mod:`nnssl.gmm`), KT-CPS with crossed class weights, the total loss, the voxel subset the
kernel maps run on and the fitted-GMM rectification of the FittedGMM variant (the labeled class histogram KT-CPS
starts from is :func:`nnssl.training.class_statistics.labeled_class_counts`)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from nnssl.debiasing import KnowledgeTransferWeighting
from nnssl.gmm import (
    DiagonalGaussianMixture,
    class_prototypes,
    cross_network_kernel_consistency,
    kernel_responsibility,
    labeled_gmm_loss,
    pair_unlabeled_with_labeled,
    prototype_repulsion,
    rectify_pseudo_labels,
    unlabeled_gmm_loss,
)
from nnssl.losses.cps import cross_pseudo_supervision_loss, hard_pseudo_label, weighted_cross_entropy
from nnssl.tensors import class_argmax


def voxel_subset(spatial_shape: Sequence[int], max_voxels: int, device: torch.device | str) -> Tensor | None:
    """Indices of ``max_voxels`` distinct voxels of a flattened patch, drawn on ``device``; ``None`` if the patch
    has no more voxels than that (then nothing is subsampled).

    Same semantics as :func:`nnssl.gmm.subsample_voxels` (one subset shared by the batch), but the permutation is
    drawn on the device: ``subsample_voxels`` draws it on the CPU, an O(V) host cost (~0.1 s for two 128^3 patches
    on a slow core) in every iteration. The index is returned so that the SAME voxels are taken from both networks
    (needed by the cross-network kernel consistency) and from features, logits and labels.
    """
    if int(max_voxels) != max_voxels or max_voxels < 1:
        raise ValueError(f"max_voxels: must be a positive integer, got {max_voxels!r}")
    n_voxels = int(np.prod([int(s) for s in spatial_shape]))
    if n_voxels <= max_voxels:
        return None
    return torch.randperm(n_voxels, device=device)[: int(max_voxels)]


def flat_voxels(x: Tensor, spatial_ndim: int, index: Tensor | None) -> Tensor:
    """``(N, [C,] *spatial)`` -> ``(N, [C,] V')``: the spatial dims flattened, then ``index`` taken (all if None)."""
    flat = x.flatten(start_dim=x.ndim - spatial_ndim)
    return flat if index is None else flat.index_select(-1, index)


class GuidanceTerms(NamedTuple):
    """One network's GuidedNet "3D-CGMM" terms (docs/methods/guidednet.md)."""

    gmm_labeled: Tensor  # loss1 + loss2 of tools.cal_gmm_loss (item 4)
    prototype: Tensor  # proto_loss (item 5)
    gmm_unlabeled: Tensor  # tools.gmm_loss (item 6)
    responsibility_labeled: Tensor  # r^l (N_l, K, V), input of the cross-network consistency (item 7)

    @property
    def total(self) -> Tensor:
        """``gmm_loss_l + gmm_loss_u`` (docs/methods/guidednet.md), ``gmm_loss_l = loss1 + loss2 + proto_loss``."""
        return self.gmm_labeled + self.prototype + self.gmm_unlabeled


def guidance_terms(prototypes: Tensor, present: Tensor, features_l: Tensor, logits_l: Tensor, labels_l: Tensor,
                   features_u: Tensor, logits_u: Tensor, prototype_batch_mean: bool = True) -> GuidanceTerms:
    """GuidedNet's labeled-feature guidance for one network (docs/methods/guidednet.md; gmm.py holds the formulas).

    - ``r^l_{i,k} = exp(-d(f^l_i, mu_{i,k})^2) * c_{i,k}`` and ``r^u_j = exp(-d(f^u_j, mu_{pair(j)})^2)`` with
      ``pair(j) = j mod N_l`` (:func:`pair_unlabeled_with_labeled`, any sub-batch sizes);
    - ``gmm_labeled = mean_v sum_k c_k BCE(r^l_k, p^l_k)/2/sum c + mean_v sum_k c_k BCE(onehot(y)_k, r^l_k)/2/sum c``;
    - ``prototype = mean_{a<b} exp(-(mean_c |m_a - m_b|)^2)`` over batch prototypes ``m_k``;
    - ``gmm_unlabeled = mean_v sum_k c_{pair,k} BCE(r^u_k, p^u_k)/2/sum c``; ``p = softmax(z)``.

    Args:
        prototypes, present: ``class_prototypes`` of the labeled features, (N_l, K, C) and (N_l, K).
        features_l, logits_l, labels_l: labeled voxels (N_l, C, *sp), (N_l, K, *sp), (N_l, *sp); any spatial
            layout, typically the flattened subset of :func:`flat_voxels`.
        features_u, logits_u: unlabeled voxels (N_u, C, *sp), (N_u, K, *sp).
        prototype_batch_mean: ``m_k`` = the true mean over samples (our fix) instead of the official ~sum.
    """
    n_l, n_u = features_l.shape[0], features_u.shape[0]
    if prototypes.shape[0] != n_l or n_l < 1:
        raise ValueError(f"prototypes: expected {n_l} labeled samples (one row each), got {tuple(prototypes.shape)}")
    probs_l = torch.softmax(logits_l.float(), dim=1)
    probs_u = torch.softmax(logits_u.float(), dim=1)
    r_l = kernel_responsibility(features_l, prototypes, present)
    gmm_labeled = labeled_gmm_loss(probs_l, r_l, labels_l, present)
    prototype = prototype_repulsion(prototypes, present, batch_mean=prototype_batch_mean)
    if n_u > 0:
        pair = pair_unlabeled_with_labeled(n_u, n_l, device=prototypes.device)
        r_u = kernel_responsibility(features_u, prototypes[pair])  # no presence masking (official GMM_predict)
        gmm_unlabeled = unlabeled_gmm_loss(probs_u, r_u, present[pair])
    else:
        gmm_unlabeled = prototypes.new_zeros(())
    return GuidanceTerms(gmm_labeled, prototype, gmm_unlabeled, r_l)


def kt_cps_class_weights(weighting: KnowledgeTransferWeighting, logits_l1: Tensor, logits_l2: Tensor,
                         target: Tensor) -> tuple[Tensor, Tensor]:
    """KT-CPS weights of one iteration (docs/methods/guidednet.md): ONE shared state updated sequentially,
    ``w_A = update(z_l^1, y)`` then ``w_B = update(z_l^2, y)`` (w_B has seen both nets' correct voxels)."""
    w_a = weighting.update(logits_l1, target)
    w_b = weighting.update(logits_l2, target)
    return w_a, w_b


def kt_cps_loss(logits1: Tensor, logits2: Tensor, w_a: Tensor, w_b: Tensor, pseudo1: Tensor | None = None,
                pseudo2: Tensor | None = None) -> Tensor:
    """``L_ktcps = CE_{w_B}(z^1, ŷ^2) + CE_{w_A}(z^2, ŷ^1)`` over the whole batch (docs/methods/guidednet.md).

    The weights are CROSSED: net 1's term uses w_B (from net 2's correctness), net 2's uses w_A. Without explicit
    pseudo-labels ``ŷ^m = argmax sg(z^m)``; ``pseudo1`` / ``pseudo2`` (N, *spatial) replace them (the GMM-rectified
    labels of the FittedGMM variant).
    """
    if pseudo1 is None and pseudo2 is None:
        return cross_pseudo_supervision_loss(logits1, logits2, class_weights_a=w_b, class_weights_b=w_a)
    pseudo1 = hard_pseudo_label(logits1) if pseudo1 is None else pseudo1
    pseudo2 = hard_pseudo_label(logits2) if pseudo2 is None else pseudo2
    return (weighted_cross_entropy(logits1, pseudo2.detach(), w_b)
            + weighted_cross_entropy(logits2, pseudo1.detach(), w_a))


def batch_guidance_terms(logits: Tensor, features: Tensor, labels: Tensor, n_labeled: int, num_classes: int,
                         index_l: Tensor | None, index_u: Tensor | None, prototype_batch_mean: bool = True
                         ) -> GuidanceTerms:
    """:func:`guidance_terms` of one network on its joint batch ``[x_l; x_u]`` (``logits`` (N, K, *sp), ``features``
    (N, C, *sp), ``labels`` (N_l, 1, *sp)): class prototypes of its labeled features, then the kernel maps and GMM
    losses on the voxel subsets ``index_l`` / ``index_u`` of :func:`voxel_subset` (None: every voxel)."""
    dims = labels.ndim - 2
    prototypes, present = class_prototypes(features[:n_labeled], labels, num_classes)
    f_l, z_l = flat_voxels(features[:n_labeled], dims, index_l), flat_voxels(logits[:n_labeled], dims, index_l)
    f_u, z_u = flat_voxels(features[n_labeled:], dims, index_u), flat_voxels(logits[n_labeled:], dims, index_u)
    return guidance_terms(prototypes, present, f_l, z_l, flat_voxels(labels[:, 0], dims, index_l), f_u, z_u,
                          prototype_batch_mean=prototype_batch_mean)


def pair_guidance_terms(logits: Sequence[Tensor], features: Sequence[Tensor], labels: Tensor, n_labeled: int,
                        num_classes: int, max_voxels: int, prototype_batch_mean: bool = True
                        ) -> tuple[list[GuidanceTerms], Tensor]:
    """:func:`batch_guidance_terms` of each network on the SAME voxel subsets (labeled, then unlabeled: at most
    ``max_voxels`` each, :func:`voxel_subset`) and the cross-network consistency ``C`` of their labeled kernel maps
    (:func:`nnssl.gmm.cross_network_kernel_consistency`). ``logits`` / ``features``: one (N, ., *sp) tensor per network,
    labeled rows first."""
    spatial, device = labels.shape[2:], labels.device
    index_l = voxel_subset(spatial, max_voxels, device)
    index_u = voxel_subset(spatial, max_voxels, device)
    guidance = [batch_guidance_terms(z, f, labels, n_labeled, num_classes, index_l, index_u, prototype_batch_mean)
                for z, f in zip(logits, features)]
    return guidance, cross_network_kernel_consistency(*(g.responsibility_labeled for g in guidance))


def assemble_guidednet_loss(supervised: Sequence[Tensor], guidance: Sequence[Tensor], kernel_consistency: Tensor,
                            kt_cps: Tensor, lam: float, unsup_weight: float) -> Tensor:
    """GuidedNet's total loss (docs/methods/guidednet.md), one backward through both networks::

        L = sum_m [ L_sup^m + lam * (G^m + w(t) * C) ] + w(t) * L_ktcps

    with ``G^m = gmm_loss_l^m + gmm_loss_u^m`` (``guidance[m]``), ``C`` the cross-network kernel consistency (counted
    once per network as in the official code, i.e. ``2 lam w(t) C`` in all) and ``w(t) = 0.1 * ramp``.
    ``lam = 0`` leaves plain KT-CPS plus supervision: ``sum_m L_sup^m + w(t) L_ktcps``.
    """
    if len(supervised) != len(guidance) or len(supervised) == 0:
        raise ValueError(f"supervised ({len(supervised)}) and guidance ({len(guidance)}) need one entry per network")
    total = unsup_weight * kt_cps
    for sup, gmm in zip(supervised, guidance):
        total = total + sup + lam * (gmm + unsup_weight * kernel_consistency)
    return total


def gmm_rectified_pseudo_labels(logits_u: Tensor, features_u: Tensor, gmm: DiagonalGaussianMixture,
                                strength: float, rule: str = "product") -> tuple[Tensor, Tensor]:
    """Unlabeled pseudo-labels rectified by the fitted class-conditional GMM (FittedGMM variant).

    ``q = rectify(softmax(z_u), p_GMM(k | f_u), strength)`` (product rule ``q_k ∝ p_k g_k^strength`` by default,
    see :func:`nnssl.gmm.rectify_pseudo_labels`) and ``ŷ_u = argmax q``. Until every class has been fitted at least
    once the posterior would exclude the unseen classes (``g_k = 0``), so the network's ``softmax(z_u)`` is used
    unchanged. Returns ``(hard (N_u, *sp) long, soft q (N_u, K, *sp) float32)``; nothing carries a gradient.
    """
    with torch.no_grad():
        probs = torch.softmax(logits_u.detach().float(), dim=1)
        rectified = rectify_pseudo_labels(probs, gmm.class_posterior(features_u), strength, rule)
        # where, not an if on the host: no wait for the device in the training step
        probs = torch.where(gmm.fitted.all().to(probs.device), rectified, probs)
        return class_argmax(probs), probs
