"""CPS end to end through the real CLIs: train, interrupt, resume with --c (both networks and both optimizer
states restored), predict with network 1; a short run of the ensemble variant and a prediction with it."""

from __future__ import annotations

import pytest
import torch
from e2e_utils import (
    assert_finite_progress,
    assert_nested_equal,
    assert_state_dicts_equal,
    fold_dir,
    predict,
    restore_trainer,
    run_cli,
    train_interrupt_resume,
)

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerCPS"
ENSEMBLE = "nnUNetTrainerCPS_ensemble"


def _differs(state_a: dict, state_b: dict) -> bool:
    return any(not torch.equal(state_a[k], state_b[k]) for k in state_a if state_a[k].is_floating_point())


def test_cps_3d_interrupt_resume_predict(synthetic3d, tmp_path):
    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "3d_fullres", TRAINER)
    assert_finite_progress(fold, ["loss_supervised", "loss_unsupervised", "unsupervised_weight", "agreement",
                                  "pseudo_label_confidence", "fraction_above_threshold", "cps_loss_supervised_1",
                                  "cps_loss_supervised_2"])

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    assert_state_dicts_equal(trainer.network2.state_dict(), state["extra_networks"]["network2"])
    assert_nested_equal(trainer.optimizer.state_dict(), ckpt["optimizer_state"], "optimizer")
    saved_opt2 = state["extra_optimizers"]["network2"]
    assert saved_opt2["state"], "network 2's optimizer has no momentum state after 4 steps"
    assert_nested_equal(trainer.extra_optimizers["network2"].state_dict(), saved_opt2, "optimizer2")
    assert _differs(ckpt["network_weights"], state["extra_networks"]["network2"]), "the two networks are equal"

    pred = predict(ds.env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())


def test_cps_ensemble_variant_trains_and_predicts_with_both_networks(synthetic3d, tmp_path):
    ds = synthetic3d
    env = {**ds.env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "2", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1"}
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", ENSEMBLE, "-device", "cpu"], env)
    fold = fold_dir(env, ds.name, ENSEMBLE, "3d_fullres", "0")
    trainer, ckpt = restore_trainer(env, fold)
    weights = ckpt["network_weights"]
    assert {k.split(".")[0] for k in weights} == {"net1", "net2"}
    assert_state_dicts_equal(trainer.network.state_dict(), weights)
    pair = trainer.network
    assert _differs(pair.net1.state_dict(), pair.net2.state_dict())
    # one optimizer over both networks (net1's parameters first), both trained: momentum state in each half (the
    # lowest deep-supervision head has loss weight 0 in nnU-Net, so it alone has no gradient and no state)
    n_params = len(list(pair.net1.parameters()))
    assert n_params == len(list(pair.net2.parameters()))
    assert len(ckpt["optimizer_state"]["param_groups"][0]["params"]) == 2 * n_params
    with_state = list(ckpt["optimizer_state"]["state"])
    n_net1 = sum(1 for i in with_state if i < n_params)
    assert n_net1 >= n_params - 2 and len(with_state) - n_net1 == n_net1
    assert_nested_equal(trainer.optimizer.state_dict(), ckpt["optimizer_state"], "optimizer")
    assert ckpt["nnssl_state"]["extra_networks"] == {}
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's own validation ran on the pair

    pred = predict(env, ds.dataset_id, "3d_fullres", ENSEMBLE, ds.raw / "imagesTs", tmp_path / "pred_ensemble")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
