import functools

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnssl.losses.cps import cross_pseudo_supervision_loss
from nnssl.losses.weighted_dc_ce import ClassWeightedDCandCELoss
from nnssl.ramps import ConsistencyWeight
from nnssl.tensors import argmax_agreement, as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.class_statistics import (
    DIFFDW_LOG,
    DISTDW_LOG,
    DualDebiasedWeights,
    fold_labeled_class_counts,
    rounded,
)
from nnssl.training.passes import PAIR_PASSES
from nnssl.training.step import SSLTerms

__all__ = ["DIFFDW_LOG", "DISTDW_LOG", "nnUNetTrainerDHC"]


class nnUNetTrainerDHC(nnUNetTrainerSSLBase):
    """DHC, dual-debiased heterogeneous co-training (Wang & Li, MICCAI 2023; ``xmed-lab/DHC train_dhc.py``;
    docs/methods/dhc.md).

    Two networks of the plans' architecture, both with nnU-Net's kaiming (He) initialisation from different
    random draws, as ``train_dhc.py`` initialises both V-Nets with kaiming-normal: A = ``self.network``, weighted by
    DiffDW; B = the declared second network ``"network2"`` (own optimizer and lr schedule), weighted by DistDW.
    Per iteration, on the batch ``x = [x_l; x_u]`` (docs/methods/dhc.md)::

        w_A = DiffDW(argmax z_l^A, y)          difficulty: learn/unlearn EMAs of the per-class hard Dice,
                                               beta = 49/50 (accumulate 50), exponent 1/5, max weight K
        w_B = 0.99 w_B + 0.01 DistDW(hist(argmax z_u^B)),  DistDW(n)_k = K log(n_max/n_k) / max_k' log(n_max/n_k')
        L_sup = DCCE_{w_A}(z_l^A, y) + DCCE_{w_B}(z_l^B, y)     weighted CE (all classes) + weighted Dice (fg)
        L_cps = CE_{w_A}(z^A, argmax z^B) + CE_{w_B}(z^B, argmax z^A)      whole batch, each net its OWN weights
        L = L_sup + lambda(e) L_cps,   lambda(e) = 0.1 * sigmoid_rampup(max(e - 1, 0), num_epochs)

    DistDW starts from the voxel histogram of the fold's labeled training cases (unlabeled cases never contribute
    labels). The ramp is DHC's, per epoch: epoch ``e`` trains with ``0.1 r(max(e - 1, 0))`` (``weight_schedule``).
    Supervision: the class-weighted DC+CE in nnU-Net's deep-supervision wrapper (equal to nnU-Net's loss when all
    weights are 1). Inference uses **network A**. DiffDW/DistDW state, the labeled counts and the class-weight log
    (``dhc_class_weights.json/.png``) are one registered state, ``DualDebiasedWeights`` (``extra_state['dhc']``).
    Defaults, NaN guards and every deviation from ``train_dhc.py`` with its reason: docs/methods/dhc.md.
    """

    second_network = "kaiming"  # different random draw of the same init: DHC trains two kaiming-initialised V-Nets
    unsupervised_weight = 0.1
    rampup_epochs: int | None = None  # None: num_epochs (DHC: max_epoch)
    log_prefix = "dhc"
    network_passes = PAIR_PASSES
    legacy_network_names = {"network_b": "network2"}
    legacy_state_names = ("dhc",)
    supports_regions = False
    supports_ignore_label = False
    unsupported_reason = "DiffDW/DistDW weight plain label classes"
    distdw_momentum: float = 0.99
    diffdw_accumulate_iters: int = 50
    diffdw_exponent: float = 1 / 5

    def build_extra_networks(self) -> None:
        self.num_classes = self.label_manager.num_segmentation_heads
        labeled_counts = functools.partial(fold_labeled_class_counts, self, outside_mask_as_background=True)
        self.class_weights = self.register_state("dhc", DualDebiasedWeights(
            self.num_classes, labeled_counts, self.distdw_momentum, self.diffdw_accumulate_iters,
            self.diffdw_exponent, self.print_to_log_file))
        weighted = ClassWeightedDCandCELoss(batch_dice=self.configuration_manager.batch_dice)
        if isinstance(self.loss, DeepSupervisionWrapper):
            weighted = DeepSupervisionWrapper(weighted, self.loss.weight_factors)
        self.weighted_supervised_loss = weighted

    def class_names(self) -> list[str]:
        names = {int(v): k for k, v in self.label_manager.label_dict.items() if isinstance(v, int)}
        return [names.get(k, str(k)) for k in range(self.num_classes)]

    def on_train_start(self):
        super().on_train_start()
        _ = self.class_weights.distribution  # read the labeled histogram now rather than inside the first step

    # ------------------------------------------------------------------ DHC step
    def weight_schedule(self) -> ConsistencyWeight:
        """``0.1 * sigmoid_rampup(max(epoch - 1, 0), L)``: DHC's per-epoch value, recomputed after each epoch."""
        length = self.num_epochs if self.rampup_epochs is None else self.rampup_epochs
        return ConsistencyWeight(self.unsupervised_weight, length, unit="epoch", delay=1)

    def weighted_supervised_loss_of(self, outputs: torch.Tensor | list[torch.Tensor],
                                    target: torch.Tensor | list[torch.Tensor], class_weights: torch.Tensor
                                    ) -> torch.Tensor:
        """Class-weighted DC+CE, over every deep-supervision scale when enabled (outputs/targets as lists)."""
        if isinstance(self.weighted_supervised_loss, DeepSupervisionWrapper):
            return self.weighted_supervised_loss(outputs, target, [class_weights] * len(outputs))
        return self.weighted_supervised_loss(outputs, target, class_weights)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        inputs = torch.cat((data, unlabeled))
        outputs_a, outputs_b = as_list(self.network(inputs)), as_list(self.network2(inputs))
        full_a, full_b = outputs_a[0], outputs_b[0]
        target_full = target[0] if isinstance(target, list) else target
        weights_a, weights_b = self.class_weights.update(full_a[:n_l], target_full, full_b[n_l:])  # steps 1-2
        if self.enable_deep_supervision:
            sup_a = self.weighted_supervised_loss_of([o[:n_l] for o in outputs_a], target, weights_a)
            sup_b = self.weighted_supervised_loss_of([o[:n_l] for o in outputs_b], target, weights_b)
        else:
            sup_a = self.weighted_supervised_loss_of(full_a[:n_l], target, weights_a)
            sup_b = self.weighted_supervised_loss_of(full_b[:n_l], target, weights_b)
        cps = cross_pseudo_supervision_loss(full_a, full_b, weights_a, weights_b)
        return SSLTerms(sup_a + sup_b, cps, pseudo_label_logits=(full_a[n_l:], full_b[n_l:]),
                        agreement=argmax_agreement(full_a[n_l:], full_b[n_l:]),
                        extras={"loss_supervised_a": sup_a, "loss_supervised_b": sup_b})

    # ------------------------------------------------------------------ class-weight log
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.class_weights.log.start_epoch()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for name, mean in self.class_weights.log.end_epoch(self.current_epoch).items():
            self.print_to_log_file(f"dhc {name} (epoch mean): {rounded(mean)}")

    def on_epoch_end(self):
        if self.local_rank == 0:
            self.class_weights.log.save(self.output_folder, "dhc_class_weights", self.class_names())
        super().on_epoch_end()
