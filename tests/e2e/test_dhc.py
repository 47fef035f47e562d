"""DHC end to end through the real CLIs on the class-imbalanced synthetic 3D dataset (tiny adrenal beside the
liver): train, interrupt, resume with --c, check the restored networks and class statistics, the class-weight
figure, then predict the test images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e_utils import assert_finite_progress, assert_state_dicts_equal, predict, restore_trainer, train_interrupt_resume

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerDHC"


def _fold0_training_histogram(preprocessed, num_classes: int) -> list[int]:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    train_keys = json.loads((preprocessed / "splits_final.json").read_text(encoding="utf-8"))[0]["train"]
    dataset = nnUNetDatasetBlosc2(str(preprocessed / "nnUNetPlans_3d_fullres"), list(train_keys))
    counts = np.zeros(num_classes, dtype=np.int64)
    for key in train_keys:
        seg = np.asarray(dataset.load_case(key)[1][:]).astype(np.int64)
        counts += np.bincount(np.maximum(seg, 0).ravel(), minlength=num_classes)
    return counts.tolist()


def test_dhc_3d_interrupt_resume_predict(synthetic3d, tmp_path):
    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "3d_fullres", TRAINER)
    assert_finite_progress(fold, ["loss_supervised", "dhc_loss_supervised_a", "dhc_loss_supervised_b",
                                  "loss_unsupervised", "unsupervised_weight", "agreement",
                                  "pseudo_label_confidence", "fraction_above_threshold"])
    assert (fold / "progress.png").is_file() and (fold / "ssl_progress.png").is_file()
    assert (fold / "dhc_class_weights.png").read_bytes()[:4] == b"\x89PNG"
    logged = json.loads((fold / "dhc_class_weights.json").read_text(encoding="utf-8"))
    assert logged["class_names"] == ["background", "liver", "spleen", "kidney", "adrenal"]
    for name in ("diffdw_network_a", "distdw_network_b"):
        series = np.array(logged["weights"][name], dtype=float)
        assert series.shape == (2, 5) and np.all(np.isfinite(series)), name  # both epochs, across the resume
        assert series.max() <= 5 + 1e-4 and series.min() >= 0
    distdw_epoch0 = logged["weights"]["distdw_network_b"][0]
    assert distdw_epoch0[4] > distdw_epoch0[1] > distdw_epoch0[0]  # tiny adrenal > large liver > background

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    assert_state_dicts_equal(trainer.network2.state_dict(), state["extra_networks"]["network2"])
    a, b = ckpt["network_weights"], state["extra_networks"]["network2"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())

    saved, restored = state["extra_state"]["dhc"], trainer.ssl_state_dict()["extra_state"]["dhc"]
    for key, value in saved["diffdw"].items():
        assert torch.equal(restored["diffdw"][key], value), key
    assert torch.equal(restored["distdw"]["weights"], saved["distdw"]["weights"])
    assert restored["class_weight_log"] == saved["class_weight_log"]
    # DistDW started from the labeled training cases of fold 0 only (not validation, not unlabeled)
    assert saved["labeled_class_counts"].tolist() == _fold0_training_histogram(ds.preprocessed, 5)
    # DiffDW updated (every update pulls dice_weight below its start of 1; the hard Dice of a class the
    # network does not predict yet is legitimately ~1e-11, so last_dice itself says nothing)
    assert (saved["diffdw"]["dice_weight"] < 1).all()

    pred = predict(ds.env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
