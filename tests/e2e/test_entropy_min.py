"""The README's worked example trainer (nnUNetTrainerEntropyMin) end to end through the real CLIs: found by nnU-Net's
trainer lookup, trained, interrupted, resumed with --c, and used by nnUNetv2_predict."""

from __future__ import annotations

import pytest
from e2e_utils import assert_finite_progress, predict, restore_trainer, train_interrupt_resume

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerEntropyMin"


def test_example_trainer_2d_interrupt_resume_predict(synthetic2d, tmp_path):
    ds = synthetic2d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "2d", TRAINER)
    assert_finite_progress(fold, ["loss_supervised", "loss_unsupervised", "unsupervised_weight",
                                  "pseudo_label_confidence", "fraction_above_threshold", "pseudo_label_dice"])
    trainer, ckpt = restore_trainer(ds.env, fold)
    assert ckpt["nnssl_state"]["global_iteration"] == 4 and trainer.global_iteration == 4  # across the interruption
    assert ckpt["nnssl_state"]["extra_networks"] == {}  # one network: only nnU-Net's own weights
    pred = predict(ds.env, ds.dataset_id, "2d", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
