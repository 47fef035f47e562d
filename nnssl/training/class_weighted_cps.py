"""DHC's CPS base for the class-imbalance methods of its zoo (CReST, SimiS, CLD; ``xmed-lab/DHC code/train_crest.py``,
``train_simis.py``, ``train_cld.py``): two networks on the whole batch ``[x_l; x_u]``, each supervised by a
class-weighted DC+CE (DHC ``w_ce+dice``), and DHC's per-epoch ramp of the CPS weight.

DHC's scripts initialise network A kaiming-normal and network B xavier-normal (``xavier_normal_init_weight``), so
``second_network = "xavier"`` (norm weight 1, bias 0), as ``nnUNetTrainerCPS``. ``cps_w`` is recomputed at the end
of each epoch ``e`` from ``e`` itself, so epoch ``e`` trains with ``0.1 · r(max(e − 1, 0))``, ramp length = number
of epochs (``ConsistencyWeight(..., unit="epoch", delay=1)``, as ``nnUNetTrainerDHC``). Inference uses network A.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl.losses.weighted_dc_ce import ClassWeightedDCandCELoss
from nnssl.tensors import argmax_agreement, labeled_rows
from nnssl.training.class_statistics import fold_labeled_class_counts
from nnssl.training.dhc_zoo import DHCZooTrainerBase
from nnssl.training.step import SSLTerms


class ClassWeightedCPSTrainer(DHCZooTrainerBase):
    """DHC's zoo CPS base (:class:`nnssl.training.dhc_zoo.DHCZooTrainerBase`: networks, ramp, :meth:`forward_pair`)
    with a class-weighted supervised DC+CE (see the module doc). Subclasses return their
    per-class state from :meth:`make_class_state` and implement ``ssl_terms`` with :meth:`forward_pair`,
    :meth:`class_weighted_supervised_loss` and :meth:`pair_terms`."""

    supports_ignore_label = False
    unsupported_reason = "per-class weights and statistics of hard pseudo-labels need plain label classes"

    def build_extra_networks(self) -> None:
        self.num_classes = self.label_manager.num_segmentation_heads
        weighted = ClassWeightedDCandCELoss(batch_dice=self.configuration_manager.batch_dice)
        self.class_weighted_loss = DeepSupervisionWrapper(weighted, self.loss.weight_factors) \
            if isinstance(self.loss, DeepSupervisionWrapper) else weighted
        self.class_state = self.register_state(self.log_prefix, self.make_class_state())

    def make_class_state(self):
        """Hook: the method's per-class state, registered as ``extra_state[log_prefix]`` (``self.class_state``):
        ``state_dict`` / ``load_state_dict``, ``initialised`` and ``initialise(labeled_counts)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_class_state")

    def initialise_class_state(self) -> None:
        """Start the per-class state from :meth:`labeled_class_counts` unless it is set (or restored by ``--c``);
        called at the start of training and before every step (cheap once set)."""
        if not self.class_state.initialised:
            counts = self.labeled_class_counts()
            self.class_state.initialise(counts)
            self.print_to_log_file(f"{self.log_prefix}: per-class state initialised from the labeled training "
                                   f"voxels {counts.tolist()}")

    def on_train_start(self):
        super().on_train_start()
        self.initialise_class_state()  # read the labeled histogram now rather than inside the first step

    def labeled_class_counts(self) -> torch.Tensor:
        """Voxel histogram of the fold's labeled training cases (DHC: whole labeled volumes; outside-mask voxels
        count as background, as for DHC's DistDW)."""
        return fold_labeled_class_counts(self, outside_mask_as_background=True)

    def class_weighted_supervised_loss(self, outputs: list[torch.Tensor], target, n_labeled: int,
                                       class_weights: torch.Tensor) -> torch.Tensor:
        """``DCCE_w`` on the labeled rows, every deep-supervision scale with nnU-Net's factors when enabled."""
        labeled = labeled_rows(outputs, n_labeled)
        if isinstance(self.class_weighted_loss, DeepSupervisionWrapper):
            return self.class_weighted_loss(labeled, target, [class_weights] * len(labeled))
        return self.class_weighted_loss(labeled[0], target[0] if isinstance(target, list) else target,
                                        class_weights)

    @staticmethod
    def pair_terms(full_a: torch.Tensor, full_b: torch.Tensor, n_labeled: int, supervised_a: torch.Tensor,
                   supervised_b: torch.Tensor, unsupervised: torch.Tensor, **extras) -> SSLTerms:
        """The step's terms; both networks' unlabeled logits are the pseudo-label logits of the diagnostics."""
        return SSLTerms(supervised_a + supervised_b, unsupervised,
                        pseudo_label_logits=(full_a[n_labeled:], full_b[n_labeled:]),
                        agreement=argmax_agreement(full_a[n_labeled:], full_b[n_labeled:]),
                        extras={"loss_supervised_a": supervised_a, "loss_supervised_b": supervised_b, **extras})


class RebalancedCPSTrainer(ClassWeightedCPSTrainer):
    """CPS whose two networks carry their own EMA class weights, refreshed every step from their own predictions
    (CReST, SimiS; ``xmed-lab/DHC code/train_crest.py``, ``train_simis.py``)::

        w_X ← m w_X + (1 − m) rule(hist(argmax z_X)),   X ∈ {A, B}     (the rows: ``weights_from_whole_batch``)
        L = DCCE_{w_A}(z_l^A, y) + DCCE_{w_B}(z_l^B, y) + λ(e) [CE_{w_A}(z^A, ŷ^B) + CE_{w_B}(z^B, ŷ^A)]

    A method sets ``weights_class`` (its rule, :mod:`nnssl.losses.class_rebalancing`), ``momentum`` and which rows
    count for the update."""

    weights_class: type
    momentum: float = 0.99
    # which rows count for the weight update: the unlabeled half (CReST) or the whole batch (SimiS)
    weights_from_whole_batch: bool = False

    def make_class_state(self):
        return self.weights_class(self.num_classes, self.momentum)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        self.initialise_class_state()
        n_l = data.shape[0]
        outputs_a, outputs_b = self.forward_pair(torch.cat((data, unlabeled)))
        full_a, full_b = outputs_a[0], outputs_b[0]
        start = 0 if self.weights_from_whole_batch else n_l
        weights_a, weights_b = self.class_state.update(full_a[start:], full_b[start:])
        supervised_a = self.class_weighted_supervised_loss(outputs_a, target, n_l, weights_a)
        supervised_b = self.class_weighted_supervised_loss(outputs_b, target, n_l, weights_b)
        cps = cross_pseudo_supervision_loss(full_a, full_b, weights_a, weights_b)
        return self.pair_terms(full_a, full_b, n_l, supervised_a, supervised_b, cps,
                               weight_min_a=weights_a.min(), weight_max_a=weights_a.max())
