import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnssl.class_weight_diagnostics import EpochClassWeights
from nnssl.debiasing import DifficultyAwareWeighting, DistributionAwareWeighting, class_histogram
from nnssl.losses.cps import cross_pseudo_supervision_loss, hard_pseudo_label
from nnssl.losses.weighted_dc_ce import ClassWeightedDCandCELoss
from nnssl.ramps import ConsistencyWeight
from nnssl.tensors import argmax_agreement, as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.step import SSLTerms

DIFFDW_LOG = "diffdw_network_a"
DISTDW_LOG = "distdw_network_b"


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
    (``dhc_class_weights.json/.png``) are checkpointed under ``nnssl_state['dhc']``. Defaults, NaN guards and every
    deviation from ``train_dhc.py`` with its reason: docs/methods/dhc.md.
    """

    second_network = "kaiming"  # different random draw of the same init: DHC trains two kaiming-initialised V-Nets
    unsupervised_weight = 0.1
    rampup_epochs: int | None = None  # None: num_epochs (DHC: max_epoch)
    log_prefix = "dhc"
    legacy_network_names = {"network_b": "network2"}
    supports_regions = False
    supports_ignore_label = False
    unsupported_reason = "DiffDW/DistDW weight plain label classes"
    distdw_momentum: float = 0.99
    diffdw_accumulate_iters: int = 50
    diffdw_exponent: float = 1 / 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_classes = self.label_manager.num_segmentation_heads
        self.difficulty_weighting = DifficultyAwareWeighting(self.num_classes, self.diffdw_accumulate_iters,
                                                             self.diffdw_exponent)
        self._distribution_weighting: DistributionAwareWeighting | None = None
        self.labeled_class_counts: torch.Tensor | None = None
        self.class_weights = EpochClassWeights()
        self.weighted_supervised_loss = None  # -> initialize

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            return
        super().initialize()
        weighted = ClassWeightedDCandCELoss(batch_dice=self.configuration_manager.batch_dice)
        if isinstance(self.loss, DeepSupervisionWrapper):
            weighted = DeepSupervisionWrapper(weighted, self.loss.weight_factors)
        self.weighted_supervised_loss = weighted

    def class_names(self) -> list[str]:
        names = {int(v): k for k, v in self.label_manager.label_dict.items() if isinstance(v, int)}
        return [names.get(k, str(k)) for k in range(self.num_classes)]

    def labeled_training_class_histogram(self) -> torch.Tensor:
        """Voxel count of every class over the full preprocessed segmentations of this fold's labeled training
        cases (``do_split()``'s training keys; never validation or unlabeled cases). -1 counts as background."""
        train_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, train_keys)
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for key in train_keys:
            _, seg, _, _ = dataset.load_case(key)
            # one slab at a time: a full CT label map as int64 would take several GB
            for index in range(seg.shape[1]):
                slab = torch.from_numpy(np.asarray(seg[0, index]).astype(np.int64)).clamp_min_(0)
                try:
                    counts += class_histogram(slab, self.num_classes)
                except ValueError as error:
                    raise ValueError(f"{type(self).__name__}: labeled case {key!r} in "
                                     f"{self.preprocessed_dataset_folder}: {error}") from None
        return counts

    @property
    def distribution_weighting(self) -> DistributionAwareWeighting:
        """DistDW state, initialised from the labeled training histogram on first use (or restored by ``--c``)."""
        if self._distribution_weighting is None:
            counts = self.labeled_training_class_histogram()
            if int(counts.sum()) == 0:
                raise RuntimeError(f"{type(self).__name__}: the labeled training cases of fold {self.fold} in "
                                   f"{self.preprocessed_dataset_folder} contain no voxels")
            self.labeled_class_counts = counts
            self._distribution_weighting = DistributionAwareWeighting(counts, self.distdw_momentum)
            self.print_to_log_file(f"DHC DistDW init from labeled training voxels {counts.tolist()}: weights "
                                   f"{_rounded(self._distribution_weighting.weights)}")
        return self._distribution_weighting

    def on_train_start(self):
        super().on_train_start()
        _ = self.distribution_weighting  # read the labeled histogram now rather than inside the first step

    # ------------------------------------------------------------------ DHC step
    def weight_schedule(self) -> ConsistencyWeight:
        """``0.1 * sigmoid_rampup(max(epoch - 1, 0), L)``: DHC's per-epoch value, recomputed after each epoch."""
        length = self.num_epochs if self.rampup_epochs is None else self.rampup_epochs
        return ConsistencyWeight(self.unsupervised_weight, length, unit="epoch", delay=1)

    def update_class_weights(self, logits_a_labeled: torch.Tensor, target: torch.Tensor,
                             logits_b_unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DiffDW step from A's labeled logits and one DistDW step from B's unlabeled argmax (steps 1-2
        of docs/methods/dhc.md); returns ``(w_A, w_B)``, each ``(K,)`` on the logits' device."""
        weights_a = self.difficulty_weighting.update(logits_a_labeled.detach(), target)
        weights_b = self.distribution_weighting.update(hard_pseudo_label(logits_b_unlabeled))
        return weights_a.to(logits_a_labeled.device), weights_b.to(logits_a_labeled.device)

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
        weights_a, weights_b = self.update_class_weights(full_a[:n_l], target_full, full_b[n_l:])
        self.class_weights.add({DIFFDW_LOG: weights_a, DISTDW_LOG: weights_b})
        if self.enable_deep_supervision:
            sup_a = self.weighted_supervised_loss_of([o[:n_l] for o in outputs_a], target, weights_a)
            sup_b = self.weighted_supervised_loss_of([o[:n_l] for o in outputs_b], target, weights_b)
        else:
            sup_a = self.weighted_supervised_loss_of(full_a[:n_l], target, weights_a)
            sup_b = self.weighted_supervised_loss_of(full_b[:n_l], target, weights_b)
        cps = cross_pseudo_supervision_loss(full_a, full_b, weights_a, weights_b)
        return SSLTerms(sup_a + sup_b, cps, pseudo_label_logits=(full_a[n_l:], full_b[n_l:]),
                        agreement=argmax_agreement(full_a, full_b),
                        extras={"loss_supervised_a": sup_a, "loss_supervised_b": sup_b})

    # ------------------------------------------------------------------ class-weight log
    @property
    def class_weight_log(self) -> dict[str, list[list[float]]]:
        return self.class_weights.log

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.class_weights.start_epoch()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for name, mean in self.class_weights.end_epoch(self.current_epoch).items():
            self.print_to_log_file(f"dhc {name} (epoch mean): {_rounded(mean)}")

    def on_epoch_end(self):
        if self.local_rank == 0:
            self.class_weights.save(self.output_folder, "dhc_class_weights", self.class_names())
        super().on_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        state = super().ssl_state_dict()
        state["dhc"] = {
            "diffdw": self.difficulty_weighting.state_dict(),
            "distdw": self.distribution_weighting.state_dict(),
            "labeled_class_counts": None if self.labeled_class_counts is None else self.labeled_class_counts.clone(),
            "class_weight_log": {k: [list(e) for e in v] for k, v in self.class_weight_log.items()},
        }
        return state

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        if "dhc" not in state:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint has no DHC class statistics "
                               "(nnssl_state['dhc']); it was not written by this trainer")
        dhc = state["dhc"]
        self.difficulty_weighting.load_state_dict(dhc["diffdw"])
        # the placeholder counts are overwritten at once by the saved EMA weights
        distribution = DistributionAwareWeighting(torch.ones(self.num_classes), self.distdw_momentum)
        distribution.load_state_dict(dhc["distdw"])
        self._distribution_weighting = distribution
        counts = dhc.get("labeled_class_counts")
        self.labeled_class_counts = None if counts is None else torch.as_tensor(counts).clone()
        self.class_weights.log = {k: [list(e) for e in v] for k, v in dhc.get("class_weight_log", {}).items()}


def _rounded(values: torch.Tensor | list[float]) -> list[float]:
    return [round(float(v), 4) for v in values]

