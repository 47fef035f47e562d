"""nnUNetTrainerWeakStrongMT end to end through the real CLIs: trained, interrupted, resumed with --c (teacher and
the DistDW class weights restored), used by nnUNetv2_predict."""

from __future__ import annotations

import pytest
import torch
from e2e_utils import assert_finite_progress, predict, restore_trainer, train_interrupt_resume

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerWeakStrongMT"


def test_weak_strong_2d_interrupt_resume_predict(synthetic2d, tmp_path):
    ds = synthetic2d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "2d", TRAINER)
    assert_finite_progress(fold, ["loss_supervised", "loss_unsupervised", "unsupervised_weight",
                                  "pseudo_label_confidence", "fraction_above_threshold", "pseudo_label_dice",
                                  "ws_class_weight_max"])
    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4 and set(state["extra_networks"]) == {"teacher"}
    assert torch.equal(trainer.class_weighting.weights, state["extra_state"]["class_balance"]["weights"])
    pred = predict(ds.env, ds.dataset_id, "2d", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
