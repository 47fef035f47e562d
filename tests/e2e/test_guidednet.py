"""GuidedNet end to end through the real CLIs on the synthetic multi-organ data: train, interrupt, resume with --c,
check the restored second network / KT-CPS weights / fitted GMMs equal the saved ones, predict imagesTs
(base trainer on 3d_fullres, the FittedGMM variant on 2d)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from e2e_utils import (
    assert_finite_progress,
    assert_state_dicts_equal,
    predict,
    restore_trainer,
    run_cli,
    train_interrupt_resume,
)

from nnssl.training.class_statistics import fold_labeled_class_counts

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerGuidedNet"
VARIANT = "nnUNetTrainerGuidedNet_FittedGMM"
LOGGED = ["loss_supervised", "loss_unsupervised", "unsupervised_weight", "agreement", "pseudo_label_confidence",
          "fraction_above_threshold", "pseudo_label_dice",
          *(f"guidednet_{k}" for k in ("loss_gmm_labeled", "loss_gmm_unlabeled", "loss_prototype",
                                       "loss_kernel_consistency", "loss_ktcps", "kt_weight_min", "kt_weight_max"))]


def test_guidednet_trainers_are_found_by_nnunet_lookup(synthetic3d):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "import sys; print([f(n).__name__ for n in sys.argv[1:]])")
    proc = run_cli([sys.executable, "-c", code, TRAINER, VARIANT], synthetic3d.env)
    assert f"['{TRAINER}', '{VARIANT}']" in proc.stdout


def test_guidednet_3d_interrupt_resume_predict(synthetic3d, tmp_path):
    import blosc2

    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "3d_fullres", TRAINER)
    assert_finite_progress(fold, LOGGED)

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4  # 2 epochs x 2 iterations, across the interruption
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    assert_state_dicts_equal(trainer.network2.state_dict(), state["extra_networks"]["network2"])
    assert torch.equal(trainer.kt_weighting.weights.cpu(), state["extra_state"]["kt_cps"]["weights"])
    net1, net2 = ckpt["network_weights"], state["extra_networks"]["network2"]
    assert all(not torch.equal(net1[k], net2[k]) for k in net1 if k.endswith("conv.weight")), \
        "the two networks must be different (kaiming vs xavier init)"

    # the KT-CPS start histogram: the 4 labeled TRAINING cases of fold 0 only, read from the preprocessed seg
    splits = json.loads((ds.preprocessed / "splits_final.json").read_text(encoding="utf-8"))
    train_keys = splits[0]["train"]
    assert len(train_keys) == 4 and not set(train_keys) & set(splits[0]["val"])
    expected = np.zeros(5, dtype=np.int64)
    for key in train_keys:
        seg = blosc2.open(str(ds.preprocessed / "nnUNetPlans_3d_fullres" / f"{key}_seg.b2nd"), mode="r")[:]
        expected += np.bincount(seg[seg >= 0].ravel().astype(np.int64), minlength=5)
    assert fold_labeled_class_counts(trainer).tolist() == expected.tolist()
    from nnssl.debiasing import distribution_aware_weights

    initial = distribution_aware_weights(torch.from_numpy(expected)).float()
    kt_weights = state["extra_state"]["kt_cps"]["weights"]
    assert not torch.equal(kt_weights.float(), initial), "KT-CPS weights must be updated (EMA)"
    assert bool(torch.isfinite(kt_weights).all())

    pred = predict(ds.env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())


def test_guidednet_fitted_gmm_2d_interrupt_resume_restores_gmm_state(synthetic3d):
    """The variant on the 2d configuration: cheaper than a second 3D run and covers the 2D feature path."""
    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "2d", VARIANT)
    assert_finite_progress(fold, LOGGED + ["guidednet_gmm_relabeled_fraction", "guidednet_gmm_fitted_classes"])

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4
    saved_gmms = state["extra_state"]["gmm"]
    assert_state_dicts_equal(trainer.gmms.state_dict(), saved_gmms)
    for i in range(2):
        saved = {k.split(".", 1)[1]: v for k, v in saved_gmms.items() if k.startswith(f"{i}.")}
        assert bool(saved["fitted"].any()), "the GMM must have been fitted on labeled features"
        assert bool(torch.isfinite(saved["means"]).all()) and bool((saved["variances"] > 0).all())
    assert torch.equal(trainer.kt_weighting.weights.cpu(), state["extra_state"]["kt_cps"]["weights"])
    assert_state_dicts_equal(trainer.network2.state_dict(), state["extra_networks"]["network2"])
