"""SDCL end to end through the real CLIs on a 3D and a 2D configuration: BCP pre-training (epoch 0), interruption,
``--c`` resume across the switch into self-training (epoch 1), restored students and teacher, prediction."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_utils import (
    assert_state_dicts_equal,
    predict,
    restore_trainer,
    ssl_progress,
    train_interrupt_resume,
)

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerSDCL"


def _train_resume_check(ds, configuration: str, extra_env: dict[str, str] | None = None):
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, configuration, TRAINER, extra_env=extra_env)

    log = ssl_progress(fold)
    assert log["sdcl_stage"] == [1.0, 2.0]  # SMOKE_SCHEDULE: 2 epochs, the switch after the first
    assert np.all(np.isfinite(np.array(log["loss_supervised"], dtype=float)))
    assert np.all(np.isfinite(np.array(log["agreement"], dtype=float)))
    for key in ("sdcl_loss_mse", "sdcl_loss_kl", "pseudo_label_confidence", "fraction_above_threshold"):  # stage 2
        values = np.array(log[key], dtype=float)
        assert np.isnan(values[0]) and np.isfinite(values[1]), (key, values)
    text = "".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    assert "SDCL: stage 2 (self-training) from epoch 1" in text

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["extra_state"]["sdcl"] == {"sdcl_stage": 2, "sdcl_self_training_start_epoch": 1}
    assert state["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    assert trainer.stages.stage == 2 and trainer.global_iteration == 4
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    for name in ("network2", "teacher"):
        assert_state_dicts_equal(trainer.extra_networks[name].state_dict(), state["extra_networks"][name])
    assert type(trainer.extra_networks["network2"]).__name__ == "ResidualEncoderUNet"
    assert type(trainer.network).__name__ == "PlainConvUNet"
    teacher, student = state["extra_networks"]["teacher"], ckpt["network_weights"]
    assert any(not np.array_equal(teacher[k].numpy(), student[k].numpy()) for k in student
               if student[k].is_floating_point()), "the teacher must be an EMA, not a copy of student 1"
    assert "network2" in state["extra_optimizers"]
    return fold


def test_sdcl_3d_pretrain_interrupt_resume_predict(synthetic3d, tmp_path):
    ds = synthetic3d
    # one labelled + one unlabelled patch keeps the two-student 3D run short (a batch of one is paired with itself;
    # the 2D test covers uneven batches)
    _train_resume_check(ds, "3d_fullres", {"NNSSL_LABELED_BATCH_SIZE": "1", "NNSSL_UNLABELED_BATCH_SIZE": "1"})
    pred = predict(ds.env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())


def test_sdcl_2d_odd_batches_interrupt_resume_predict(synthetic2d, tmp_path):
    ds = synthetic2d
    # 3 labelled + 2 unlabelled patches: the rolled pairing repeats the unlabelled batch cyclically
    _train_resume_check(ds, "2d", {"NNSSL_LABELED_BATCH_SIZE": "3", "NNSSL_UNLABELED_BATCH_SIZE": "2"})
    pred = predict(ds.env, ds.dataset_id, "2d", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    expected = sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
    assert sorted(p.name for p in pred.iterdir() if p.suffix == ".png") == expected
