"""GuidedNet (Zhao et al., ACM MM 2024) as nnU-Net v2 trainers: labeled-feature guidance ("3D-CGMM") + KT-CPS.

Module contents: the two trainers, and the small tensor functions they are assembled from (kept at module level so
that they are unit-tested without a planned dataset): :class:`DecoderFeatureTap`, :func:`decoder_feature_channels`,
:func:`xavier_normal_init_`, :func:`voxel_subset`, :func:`flat_voxels`, :func:`guidance_terms`,
:func:`kt_cps_class_weights`, :func:`kt_cps_loss`, :func:`assemble_guidednet_loss`, :func:`labeled_class_counts`,
:func:`gmm_rectified_pseudo_labels`.
Absolute imports only: nnU-Net imports every module of ``nnssl_trainers/`` as a top-level module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

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
from nnssl.network_pair import xavier_normal_init_
from nnssl.ramps import sigmoid_rampup
from nnssl_trainers.base import nnUNetTrainerSSLBase, unwrap

# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------


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
            raise TypeError(f"GuidedNet needs a U-Net with a UNetDecoder (decoder.stages); got "
                            f"{type(unwrap(network)).__name__}")
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


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# statistics and the fitted-GMM rectification
# ----------------------------------------------------------------------------------------------------------------


def labeled_class_counts(dataset_class, folder: str, identifiers: Sequence[str], num_classes: int) -> Tensor:
    """Voxel histogram (K,) of the preprocessed ground truth of ``identifiers`` read with nnU-Net's dataset class.

    Only ids in ``[0, K)`` count: nnU-Net's ``-1`` (outside the nonzero mask) and the ignore label are skipped.
    This is the KT-CPS initial histogram taken from the labeled TRAINING cases of the fold, where the official code
    reads ``train.txt[:42]``, which for AMOS-10% includes the labels of "unlabeled" cases (a leak;
    docs/methods/guidednet.md).
    """
    identifiers = list(identifiers)
    if not identifiers:
        raise ValueError(f"labeled_class_counts: no labeled training cases given for {folder}")
    dataset = dataset_class(folder, list(identifiers))
    counts = np.zeros(num_classes, dtype=np.int64)
    for key in identifiers:
        seg = np.asarray(dataset.load_case(key)[1][:])
        values = seg[(seg >= 0) & (seg < num_classes)].astype(np.int64)
        counts += np.bincount(values, minlength=num_classes)[:num_classes]
    return torch.from_numpy(counts)


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
        if gmm.all_classes_fitted:
            probs = rectify_pseudo_labels(probs, gmm.class_posterior(features_u), strength, rule)
        return probs.argmax(1), probs


# ----------------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------------


class nnUNetTrainerGuidedNet(nnUNetTrainerSSLBase):
    """GuidedNet: labeled data guide unlabeled data (Zhao et al., ACM MM 2024), as its official code computes it
    (docs/methods/guidednet.md, ``kimjisoo12/GuidedNet train_guidedNet_flare.py`` + ``utils/tools.py``).

    Networks (docs/methods/guidednet.md): two instances of the plans' architecture trained together from one summed
    loss:
    ``self.network`` (nnU-Net's He/kaiming-normal init) and the trainable extra network ``"network2"``
    (xavier-normal init, :func:`xavier_normal_init_`), each with nnU-Net's optimizer and poly lr. Each exposes its
    last decoder feature map (output of ``decoder.stages[-1]``, the input of the segmentation head, ``f``) through a
    :class:`DecoderFeatureTap` forward hook registered here; the architecture itself is the plain plans one.
    **Inference** (``nnUNetv2_predict -tr nnUNetTrainerGuidedNet``) uses ``self.network`` (net 1,
    ``network_weights``); net 2 is in the checkpoint under ``nnssl_state``. The base's ``pseudo_label_dice``
    diagnostic scores net 1 too (its pseudo-labels supervise net 2).

    Loss per iteration (docs/methods/guidednet.md), labeled batch ``x_l, y`` and unlabeled batch ``x_u`` through both
    nets as one batch, ``z^m, f^m = net_m([x_l; x_u])``, ``p = softmax(z)``:

    - ``L_sup^m``: nnU-Net's Dice+CE with deep supervision on the labeled part;
    - prototypes ``mu_{i,k} = mean_{y_i(v)=k} f_i(v)`` per labeled sample and class, presence ``c_{i,k}``;
    - kernel maps ``r_k(v) = exp(-(mean_c |f(v)_c - mu_{k,c}|)^2)``, labeled ones masked by ``c``, unlabeled sample
      ``j`` guided by labeled sample ``j mod N_l``;
    - ``gmm_loss_l^m = loss1 + loss2 + proto_loss`` and ``gmm_loss_u^m`` (half-BCE soft targets, see gmm.py);
    - ``C = mean((softmax_k r^{l,1} - softmax_k r^{l,2})^2)`` (cross-network kernel consistency, labeled);
    - KT-CPS: ``w`` = DistDW weights ``K log(n_max/n_k)/max log(n_max/n_k')`` of the histogram of correctly
      predicted labeled voxels (wrong ones count as background), EMA 0.99, one shared state updated by net 1
      (``w_A``) then net 2 (``w_B``); ``L_ktcps = CE_{w_B}(z^1, ŷ^2) + CE_{w_A}(z^2, ŷ^1)`` over the whole batch;
    - ``L = sum_m [L_sup^m + lam (gmm_loss_l^m + gmm_loss_u^m + w(t) C)] + w(t) L_ktcps`` with ``lam = 0.3``
      (``guidance_weight``) and ``w(t) = 0.1 * sigmoid_rampup(t, L)`` (``unsup_weight_max``), ``t`` the global
      iteration, ``L = rampup_length()`` (30 000 iterations as ``iter // 150`` with length 200, capped at 40 % of
      the schedule).

    State kept across iterations and checkpointed (``nnssl_state``, restored by ``--c``): net 2 and its optimizer
    (base), the KT-CPS weight vector (``kt_cps``), the global iteration.

    Deviations from the official code, and why:

    - Supervised term: nnU-Net's DC+CE (Dice over foreground, batch Dice, deep supervision) instead of SSL4MIS's
      ``0.5 (CE + Dice over all K classes)`` at full resolution only: the plugin keeps nnU-Net's supervision so that
      every method is compared to the same supervised baseline. The SSL terms use the full-resolution output only.
    - Optimizer, lr schedule, patch size, batch size and augmentation are nnU-Net's (official: SGD lr 0.1, 4+4 of
      64x128x128, rot90/flip). The unlabeled batch gets nnU-Net's augmentation.
    - KT-CPS initial histogram: from the labeled training cases of the fold (nnU-Net dataset class, training keys
      of ``splits_final.json``) instead of ``train.txt[:42]``, which reads the labels of unlabeled cases for
      AMOS-10% and misses labeled ones for AMOS-50% (docs/methods/guidednet.md quirk).
    - Pairing unlabeled with labeled samples works for any sub-batch sizes (``j mod N_l``); the official code needs
      ``labeled_bs == unlabeled_bs`` and is reproduced exactly when they are equal.
    - ``proto_loss`` uses the true batch mean of the per-sample prototypes (``prototype_batch_mean = True``); the
      official ``m_k`` is ~ their SUM (multiplied where a division was meant, docs/methods/guidednet.md), which
      makes the repulsion depend on how many labeled samples contain the class.
    - Bounded memory: prototypes come from every labeled voxel of the patch (a scatter-add, linear in the patch,
      so tiny organs are never missed), but kernel maps and the GMM losses run on a random subset of at most
      ``max_voxels_for_maps`` voxels per patch, shared by the batch and by both networks (the official code uses all
      1M voxels of a 64x128x128 patch; the losses are voxel means, so the subset gives an unbiased estimate).
    - Numerics: every GMM term runs in float32 with autocast disabled, the BCE clamps its probability, absent classes
      give finite zeros (gmm.py); KT-CPS CE returns 0 instead of NaN when all pseudo-labelled classes have weight 0.
    - The official networks have dropout before ``rep``; nnU-Net's plans have none, so ``f`` is dropout-free.
    - The cross-network consistency keeps the official double count (``2 lam w(t) C`` in all).
    - Region-based (sigmoid) label setups are not supported (the method needs softmax class probabilities).
    - Under DDP each rank updates its KT-CPS weights from its own labeled sub-batch (not all-reduced; the official
      code is single-process); the checkpoint keeps rank 0's.
    """

    guidance_weight: float = 0.3  # lambda ("lanmuda") of the README commands
    unsup_weight_max: float = 0.1  # "consistency" of the README commands; weight of KT-CPS and C after the ramp
    kt_momentum: float = 0.99
    prototype_batch_mean: bool = True
    max_voxels_for_maps: int = 2 ** 17  # voxels per patch for kernel maps / GMM losses (131 072 ~ 51^3)
    second_network_name: str = "network2"

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            return
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} needs softmax class labels; region-based training "
                               f"(regions in dataset.json) is not supported")
        super().initialize()

    def build_extra_networks(self) -> None:
        network2 = xavier_normal_init_(self.new_network())
        self.register_extra_network(self.second_network_name, network2, trainable=True)
        self.feature_taps = (DecoderFeatureTap(self.network), DecoderFeatureTap(network2))
        self.num_classes = self.label_manager.num_segmentation_heads
        counts = self.initial_class_counts()
        self.print_to_log_file(f"KT-CPS initial class histogram (labeled training cases): {counts.tolist()}")
        self.kt_weighting = KnowledgeTransferWeighting(counts, momentum=self.kt_momentum)
        self.build_statistics()

    def build_statistics(self) -> None:
        """Hook for variants that keep more state (the fitted GMM)."""

    def initial_class_counts(self) -> Tensor:
        tr_keys, _ = self.do_split()
        return labeled_class_counts(self.dataset_class, self.preprocessed_dataset_folder, tr_keys, self.num_classes)

    @property
    def network2(self) -> nn.Module:
        return self.extra_networks[self.second_network_name]

    def unsup_weight(self) -> float:
        return self.unsup_weight_max * sigmoid_rampup(self.global_iteration, self.rampup_length())

    # ------------------------------------------------------------------ training
    def unlabeled_pseudo_labels(self, logits: Sequence[Tensor], features: Sequence[Tensor], labels: Tensor,
                                n_labeled: int) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """Hook: pseudo-labels (N_u, *sp) that replace ``argmax z_u^m`` in KT-CPS (None: keep the argmax), plus
        scalars to log. Gets both nets' full-batch logits and features (labeled first) and the labels."""
        return [None for _ in logits], {}

    def train_step(self, batch: dict) -> dict:
        data, target, unlabeled = self.to_device(batch)
        labels = target[0] if isinstance(target, list) else target  # (N_l, 1, *sp), full resolution
        n_l = data.shape[0]
        spatial = data.shape[2:]
        weight = self.unsup_weight()
        self.zero_grad()
        with self.autocast():
            inputs = torch.cat((data, unlabeled))
            outputs, features = [], []
            for net, tap in zip((self.network, self.network2), self.feature_taps):
                with tap.capture():
                    out = net(inputs)
                outputs.append(list(out) if isinstance(out, (list, tuple)) else [out])
                features.append(tap.take())
            logits = [out[0] for out in outputs]  # full resolution (N_l + N_u, K, *sp)

            supervised = [self.loss([o[:n_l] for o in out] if self.enable_deep_supervision else out[0][:n_l], target)
                          for out in outputs]

            index_l = voxel_subset(spatial, self.max_voxels_for_maps, data.device)
            index_u = voxel_subset(spatial, self.max_voxels_for_maps, data.device)
            labels_sub = flat_voxels(labels[:, 0], len(spatial), index_l)
            terms = []
            for z, f in zip(logits, features):
                prototypes, present = class_prototypes(f[:n_l], labels, self.num_classes)
                terms.append(guidance_terms(
                    prototypes, present,
                    flat_voxels(f[:n_l], len(spatial), index_l), flat_voxels(z[:n_l], len(spatial), index_l),
                    labels_sub,
                    flat_voxels(f[n_l:], len(spatial), index_u), flat_voxels(z[n_l:], len(spatial), index_u),
                    prototype_batch_mean=self.prototype_batch_mean))
            kernel_consistency = cross_network_kernel_consistency(terms[0].responsibility_labeled,
                                                                  terms[1].responsibility_labeled)

            w_a, w_b = kt_cps_class_weights(self.kt_weighting, logits[0][:n_l], logits[1][:n_l], labels)
            pseudo_u, extra_logs = self.unlabeled_pseudo_labels(logits, features, labels, n_l)
            pseudo = [None if p_u is None else torch.cat((hard_pseudo_label(z[:n_l]), p_u))
                      for z, p_u in zip(logits, pseudo_u)]
            kt_cps = kt_cps_loss(logits[0], logits[1], w_a, w_b, pseudo[0], pseudo[1])

            loss = assemble_guidednet_loss(supervised, [t.total for t in terms], kernel_consistency, kt_cps,
                                           self.guidance_weight, weight)
        self.backward_and_step(loss)
        self.global_iteration += 1

        with torch.no_grad():
            logs = {
                "loss_supervised": sum(supervised) / 2,
                "loss_gmm_labeled": (terms[0].gmm_labeled + terms[1].gmm_labeled) / 2,
                "loss_prototype": (terms[0].prototype + terms[1].prototype) / 2,
                "loss_gmm_unlabeled": (terms[0].gmm_unlabeled + terms[1].gmm_unlabeled) / 2,
                "loss_kernel_consistency": kernel_consistency,
                "loss_ktcps": kt_cps,
                **self._unlabeled_diagnostics(logits[0][n_l:], logits[1][n_l:]),
                "fraction_above_threshold": self.confidence_stats(logits[0][n_l:], logits[1][n_l:])[1],
                "kt_weight_min": w_b.min(),
                "kt_weight_max": w_b.max(),
                **extra_logs,
            }
            # one device->host transfer for all logged scalars
            values = torch.stack([v.detach().float().reshape(()).to(loss.device) for v in logs.values()]).tolist()
        return {"loss": loss.detach().cpu().numpy(), "unsup_weight": weight, **dict(zip(logs, values))}

    @staticmethod
    def _unlabeled_diagnostics(logits_u1: Tensor, logits_u2: Tensor) -> dict[str, Tensor]:
        """Agreement of the two nets' argmax and mean max-softmax confidence on the unlabeled voxels."""
        p1 = torch.softmax(logits_u1.float(), 1)
        p2 = torch.softmax(logits_u2.float(), 1)
        conf1, label1 = p1.max(1)
        conf2, label2 = p2.max(1)
        return {"agreement": (label1 == label2).float().mean(),
                "pseudo_label_confidence": (conf1.mean() + conf2.mean()) / 2}

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        state = super().ssl_state_dict()
        state["kt_cps"] = self.kt_weighting.state_dict()
        return state

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        if "kt_cps" not in state:
            raise RuntimeError(f"{type(self).__name__}: checkpoint has no KT-CPS weights ('kt_cps' in nnssl_state)")
        self.kt_weighting.load_state_dict(state["kt_cps"])


class nnUNetTrainerGuidedNet_FittedGMM(nnUNetTrainerGuidedNet):
    """GuidedNet with the paper's "3D-CGMM" taken literally: a fitted class-conditional Gaussian mixture rectifies
    the unlabeled pseudo-labels used by KT-CPS.

    Everything of :class:`nnUNetTrainerGuidedNet` is kept (so a comparison isolates the rectification); in
    addition each network m owns a :class:`nnssl.gmm.DiagonalGaussianMixture` over its decoder features
    (``gmm_components`` diagonal Gaussians per class, mixing weights). Every iteration, before the KT-CPS term,
    ``gmm_em_steps`` EM steps per class are run on that network's labeled features (at most
    ``gmm_voxels_per_class`` voxels per class, sampled) and blended into the stored state with momentum
    ``gmm_momentum``. The unlabeled pseudo-labels of net m become ``argmax_k p_k g_k^s`` (product rule, strength
    ``s = gmm_rectify_strength``; ``g`` the GMM class posterior with a uniform prior, which sums to 1 over k) and
    supervise the other network in ``L_ktcps``; labeled voxels keep ``argmax z``. Until every class has been seen
    by the GMM the plain pseudo-labels are used (an unseen class would get posterior 0 and could never be
    pseudo-labelled). Both GMMs are saved in the checkpoint (``nnssl_state['gmm']``) and restored by ``--c``.
    Extra logs: ``gmm_relabeled_fraction`` (unlabeled voxels whose pseudo-label the GMM changed),
    ``gmm_fitted_classes``. Inference: ``self.network``, as for the base trainer.
    """

    gmm_components: int = 3
    gmm_em_steps: int = 3
    gmm_momentum: float = 0.9
    gmm_voxels_per_class: int = 4096
    gmm_rectify_strength: float = 1.0
    gmm_rectify_rule: str = "product"

    def build_statistics(self) -> None:
        channels = decoder_feature_channels(self.network)
        self.gmms = nn.ModuleList(DiagonalGaussianMixture(self.num_classes, channels, self.gmm_components)
                                  for _ in range(2)).to(self.device)

    def unlabeled_pseudo_labels(self, logits, features, labels, n_labeled):
        hard, changed = [], []
        for gmm, z, f in zip(self.gmms, logits, features):
            gmm.fit_step(f[:n_labeled], labels, n_em_steps=self.gmm_em_steps, momentum=self.gmm_momentum,
                         max_voxels_per_class=self.gmm_voxels_per_class)
            pseudo, _ = gmm_rectified_pseudo_labels(z[n_labeled:], f[n_labeled:], gmm, self.gmm_rectify_strength,
                                                    self.gmm_rectify_rule)
            hard.append(pseudo)
            changed.append((pseudo != z[n_labeled:].detach().argmax(1)).float().mean())
        logs = {"gmm_relabeled_fraction": torch.stack(changed).mean(),
                "gmm_fitted_classes": self.gmms[0].fitted.float().sum()}
        return hard, logs

    def ssl_state_dict(self) -> dict:
        state = super().ssl_state_dict()
        state["gmm"] = [{k: v.detach().cpu().clone() for k, v in g.state_dict().items()} for g in self.gmms]
        return state

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        if "gmm" not in state or len(state["gmm"]) != len(self.gmms):
            raise RuntimeError(f"{type(self).__name__}: checkpoint has no state for the two fitted GMMs "
                               f"('gmm' in nnssl_state)")
        for gmm, gmm_state in zip(self.gmms, state["gmm"]):
            gmm.load_state_dict(gmm_state)
