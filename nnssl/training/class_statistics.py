"""Class statistics of the SSL trainers: the labeled training histogram that DHC's DistDW and GuidedNet's KT-CPS
start from, and DHC's class weights as one checkpointable state.

Both histograms come from the labeled TRAINING cases of the fold only (``do_split()``'s training keys), never from
validation or unlabeled cases: the official GuidedNet code reads ``train.txt[:42]``, which for AMOS-10% includes the
labels of "unlabeled" cases (a leak; docs/methods/guidednet.md).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from nnssl.class_weight_diagnostics import EpochClassWeights
from nnssl.debiasing import DifficultyAwareWeighting, DistributionAwareWeighting
from nnssl.losses.cps import hard_pseudo_label

DIFFDW_LOG = "diffdw_network_a"
DISTDW_LOG = "distdw_network_b"


def labeled_class_counts(dataset_class, folder: str, identifiers: Sequence[str], num_classes: int,
                         outside_mask_as_background: bool = False) -> Tensor:
    """Voxel histogram ``(K,)`` (int64) of the preprocessed ground truth of ``identifiers``, read with nnU-Net's
    dataset class one slab at a time (a whole CT label map as int64 would take several GB).

    nnU-Net's ``-1`` (outside the nonzero mask) is skipped (KT-CPS) or counted as background with
    ``outside_mask_as_background`` (DHC); ids ``>= K`` (the ignore label) never count.
    """
    identifiers = list(identifiers)
    if not identifiers:
        raise ValueError(f"labeled_class_counts: no labeled training cases given for {folder}")
    dataset = dataset_class(folder, identifiers)
    counts = np.zeros(num_classes, dtype=np.int64)
    for key in identifiers:
        seg = dataset.load_case(key)[1]
        for index in range(seg.shape[1]):
            slab = np.asarray(seg[0, index]).astype(np.int64)
            if outside_mask_as_background:
                slab = np.maximum(slab, 0)
            values = slab[(slab >= 0) & (slab < num_classes)]
            counts += np.bincount(values, minlength=num_classes)[:num_classes]
    return torch.from_numpy(counts)


def fold_labeled_class_counts(trainer, outside_mask_as_background: bool = False) -> Tensor:
    """:func:`labeled_class_counts` of ``trainer``'s fold: its ``do_split()`` training keys only."""
    train_keys, _ = trainer.do_split()
    return labeled_class_counts(trainer.dataset_class, trainer.preprocessed_dataset_folder, train_keys,
                                trainer.label_manager.num_segmentation_heads, outside_mask_as_background)


class DualDebiasedWeights:
    """DHC's class weights (Wang & Li, MICCAI 2023, Sec. 2.2-2.3) as one state, registered once and restored by ``--c``.

    ``difficulty`` (DiffDW) weights network A from its labeled predictions; ``distribution`` (DistDW) weights network
    B from its unlabeled pseudo-label histogram and starts from ``labeled_counts()`` (read on first use, or restored);
    ``log`` keeps the per-epoch means of both. ``state_dict`` has the layout of the ``nnssl_state['dhc']`` entry of
    earlier checkpoints, so those load unchanged.
    """

    def __init__(self, num_classes: int, labeled_counts: Callable[[], Tensor], distdw_momentum: float = 0.99,
                 diffdw_accumulate_iters: int = 50, diffdw_exponent: float = 1 / 5,
                 report: Callable[[str], None] = print):
        self.num_classes, self.distdw_momentum = num_classes, distdw_momentum
        self.difficulty = DifficultyAwareWeighting(num_classes, diffdw_accumulate_iters, diffdw_exponent)
        self._labeled_counts, self._report = labeled_counts, report
        self._distribution: DistributionAwareWeighting | None = None
        self.labeled_class_counts: Tensor | None = None
        self.log = EpochClassWeights()

    @property
    def distribution(self) -> DistributionAwareWeighting:
        if self._distribution is None:
            counts = self._labeled_counts()
            if int(counts.sum()) == 0:
                raise RuntimeError("DHC: the labeled training cases contain no voxels")
            self.labeled_class_counts = counts
            self._distribution = DistributionAwareWeighting(counts, self.distdw_momentum)
            self._report(f"DHC DistDW init from labeled training voxels {counts.tolist()}: weights "
                         f"{rounded(self._distribution.weights)}")
        return self._distribution

    def update(self, logits_a_labeled: Tensor, target: Tensor, logits_b_unlabeled: Tensor) -> tuple[Tensor, Tensor]:
        """One DiffDW step from A's labeled logits, one DistDW step from B's unlabeled argmax; returns ``(w_A, w_B)``,
        each ``(K,)`` on the logits' device, and adds them to the epoch log."""
        weights_a = self.difficulty.update(logits_a_labeled.detach(), target).to(logits_a_labeled.device)
        weights_b = self.distribution.update(hard_pseudo_label(logits_b_unlabeled)).to(logits_a_labeled.device)
        self.log.add({DIFFDW_LOG: weights_a, DISTDW_LOG: weights_b})
        return weights_a, weights_b

    def state_dict(self) -> dict[str, Any]:
        counts = self.labeled_class_counts
        return {"diffdw": self.difficulty.state_dict(), "distdw": self.distribution.state_dict(),
                "labeled_class_counts": None if counts is None else counts.clone(),
                "class_weight_log": {k: [list(e) for e in v] for k, v in self.log.log.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.difficulty.load_state_dict(state["diffdw"])
        # placeholder counts, overwritten at once by the saved EMA weights
        self._distribution = DistributionAwareWeighting(torch.ones(self.num_classes), self.distdw_momentum)
        self._distribution.load_state_dict(state["distdw"])
        counts = state.get("labeled_class_counts")
        self.labeled_class_counts = None if counts is None else torch.as_tensor(counts).clone()
        self.log.log = {k: [list(e) for e in v] for k, v in state.get("class_weight_log", {}).items()}


def rounded(values: Tensor | Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]
