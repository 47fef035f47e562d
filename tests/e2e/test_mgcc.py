"""MGCC end to end through the real CLIs: generated images added as unlabeled data (nnssl_add_unlabeled +
nnssl_preprocess_unlabeled), 2D training with interruption and --c resume, predict; a short 3d_fullres run
(one epoch, batch 1 + 1, no interruption: the resume path is the same as in 2D) with predict."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from e2e_utils import (
    assert_finite_progress,
    assert_state_dicts_equal,
    fold_dir,
    nnunet_env,
    predict,
    restore_trainer,
    run_cli,
    ssl_progress,
    train_interrupt_resume,
)
from PIL import Image

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerMGCC"
LOGGED = ["loss_supervised", "mgcc_loss_supervised_main", "loss_unsupervised", "unsupervised_weight",
          "pseudo_label_confidence", "agreement", "fraction_above_threshold"]

UNLABELED_IDS_SNIPPET = """
import json, sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnssl_trainers.mgcc import nnUNetTrainerMGCC
pre = sys.argv[1]
plans = {**load_json(pre + '/nnUNetPlans.json'), 'continue_training': False}
trainer = nnUNetTrainerMGCC(plans, '2d', 0, load_json(pre + '/dataset.json'), device=torch.device('cpu'))
from nnssl.training.unlabeled_data import unlabeled_identifiers
print(json.dumps(unlabeled_identifiers(trainer)))
"""


def _copy_dataset(ds, root):
    """A private copy of a planned fixture dataset, so that adding cases leaves the session fixture unchanged."""
    shutil.copytree(ds.raw, root / "raw" / ds.name)
    shutil.copytree(ds.preprocessed, root / "preprocessed" / ds.name)
    return nnunet_env(root)


def _write_generated_images(template_png, folder, n: int) -> list[str]:
    """RGB PNGs standing in for a diffusion model's output (flipped, noisy variants of an unlabeled image)."""
    folder.mkdir()
    grey = np.asarray(Image.open(template_png).convert("L"), dtype=np.float32)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        image = np.clip(np.flip(grey, axis=i % 2) + rng.normal(0, 8, grey.shape), 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([image] * 3, axis=-1), mode="RGB").save(folder / f"sample {i}.png")
        names.append(f"gen_sample_{i}")
    return names


def _check_restored_state(env, fold, iterations: int, weights_per_epoch: list[float]):
    trainer, ckpt = restore_trainer(env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == iterations  # counted across an interruption
    saved_aux = state["extra_networks"]["auxiliary_decoders"]
    assert_state_dicts_equal(trainer.extra_networks["auxiliary_decoders"].state_dict(), saved_aux)
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    assert set(state["extra_optimizers"]) == {"auxiliary_decoders"}
    restored_opt = trainer.extra_optimizers["auxiliary_decoders"].state_dict()["state"]
    saved_opt = state["extra_optimizers"]["auxiliary_decoders"]["state"]
    assert saved_opt and restored_opt.keys() == saved_opt.keys()  # the auxiliary decoders were stepped
    assert all(torch.equal(restored_opt[k]["momentum_buffer"], saved_opt[k]["momentum_buffer"]) for k in saved_opt)
    # the inference weights are the main path only: encoder, global-context blocks, main decoder
    weights = ckpt["network_weights"]
    assert any(k.startswith("global_context.") for k in weights) and not any(k.startswith("decoders.")
                                                                            for k in weights)
    assert not any("encoder" in k for k in saved_aux)
    assert ssl_progress(fold)["unsupervised_weight"] == pytest.approx(weights_per_epoch)


def test_mgcc_2d_with_generated_unlabeled_images_interrupt_resume_predict(synthetic2d, tmp_path):
    ds = synthetic2d
    env = _copy_dataset(ds, tmp_path / "nnunet")
    raw = tmp_path / "nnunet" / "raw" / ds.name
    preprocessed = tmp_path / "nnunet" / "preprocessed" / ds.name
    template = sorted((raw / "imagesUnlabeled").glob("*.png"))[0]
    generated = _write_generated_images(template, tmp_path / "generated", 3)

    run_cli(["nnssl_add_unlabeled", str(ds.dataset_id), str(tmp_path / "generated"), "--prefix", "gen_",
             "--no-progress"], env)
    split = json.loads((raw / "ssl_split.json").read_text(encoding="utf-8"))
    assert set(generated) <= set(split["unlabeled"]) and not set(generated) & set(split["labeled"])
    proc = run_cli(["nnssl_preprocess_unlabeled", "-d", str(ds.dataset_id), "-c", "2d", "-np", "1"], env)
    assert "8/11 already done" in proc.stdout + proc.stderr  # only the generated cases are preprocessed
    proc = run_cli([sys.executable, "-c", UNLABELED_IDS_SNIPPET, str(preprocessed)], env)
    identifiers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(generated) <= set(identifiers) and len(identifiers) == len(split["unlabeled"]) == 11

    fold = train_interrupt_resume(env, ds.dataset_id, ds.name, "2d", TRAINER)
    assert_finite_progress(fold, LOGGED)
    agreement = np.array(ssl_progress(fold)["agreement"])
    assert np.all((agreement >= 0) & (agreement <= 1))
    # lambda(t) = 7 sigmoid_rampup(t, L), L = int(1.5 x 4 iterations) = 6 (MGCC keeps the official ramp/schedule
    # ratio): epoch means of t = 0, 1 and t = 2, 3
    ramp = [math.exp(-5 * (1 - t / 6) ** 2) for t in range(4)]
    _check_restored_state(env, fold, 4, [3.5 * (ramp[0] + ramp[1]), 3.5 * (ramp[2] + ramp[3])])

    pred = predict(env, ds.dataset_id, "2d", TRAINER, raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    for p in pred.glob("*.png"):
        assert set(np.unique(np.asarray(Image.open(p))).tolist()) <= {0, 1}


def test_mgcc_3d_fullres_short_run_restore_predict(synthetic3d, tmp_path):
    ds = synthetic3d
    env = {**ds.env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "2", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1",
           "NNSSL_LABELED_BATCH_SIZE": "1", "NNSSL_UNLABELED_BATCH_SIZE": "1"}
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = fold_dir(env, ds.name, TRAINER, "3d_fullres", "0")
    log = ssl_progress(fold)
    assert all(len(log[k]) == 1 and np.isfinite(log[k][0]) for k in LOGGED), log
    # L = int(1.5 x 2 iterations) = 3: one epoch, mean of lambda at t = 0 and t = 1
    _check_restored_state(env, fold, 2, [3.5 * (math.exp(-5) + math.exp(-5 * (2 / 3) ** 2))])
    pred = predict(env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
