"""The methods of DHC's zoo (xmed-lab/DHC ``train_<method>.py``) end to end through the real CLIs.

What CI runs (about 8 minutes on 2 cores): one ``nnssl_benchmark --smoke`` over all ten (each trained with
``nnUNetv2_train``'s entry point, predicted with ``nnUNetv2_predict``'s, scored), and the interruption path of DST on
3d_fullres (``--c`` restores every extra network, optimizer and registered per-class state; DST has the zoo's most
unusual structure: frozen and gradient-reversed decoder heads on the encoder's skips). Every trainer's state also
goes through nnU-Net's own ``save_checkpoint`` / ``load_checkpoint`` in its unit test, and URPC's 3D pyramid
(trilinear, anisotropic) is checked in its unit test.

The exhaustive version, every trainer on 3d_fullres and 2d, interrupted and resumed, then predicted (about 35 minutes
on 2 cores), runs with ``NNSSL_EXHAUSTIVE_E2E=1``; it passed for all ten trainers when they were added."""

from __future__ import annotations

import json
import os

import e2e_utils as e2e
import numpy as np
import pytest

pytestmark = pytest.mark.slow
ZOO = ("nnUNetTrainerUAMT", "nnUNetTrainerURPC", "nnUNetTrainerSSNet", "nnUNetTrainerDST", "nnUNetTrainerDePL",
       "nnUNetTrainerAdsh", "nnUNetTrainerCReST", "nnUNetTrainerSimiS", "nnUNetTrainerBasak", "nnUNetTrainerCLD")
IN_CI = ("nnUNetTrainerDST",)
EXHAUSTIVE = os.environ.get("NNSSL_EXHAUSTIVE_E2E", "") not in ("", "0")
COMMON_KEYS = ["loss_supervised", "loss_unsupervised", "unsupervised_weight"]
# the sliding-window validation after training is nnU-Net's, the same for every trainer: skipped for time
FAST = {"NNSSL_SKIP_FINAL_VALIDATION": "1"}


def assert_resumed_state(env: dict, fold) -> None:
    """The trainer rebuilt from checkpoint_final.pth holds exactly the saved networks, optimizers and state."""
    trainer, ckpt = e2e.restore_trainer(env, fold)
    saved = ckpt["nnssl_state"]
    assert saved["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    e2e.assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    restored = trainer.ssl_state_dict()
    for part in ("extra_networks", "extra_optimizers", "extra_state"):
        e2e.assert_nested_equal(restored[part], saved[part], part)


def interrupt_resume_predict(ds, configuration: str, trainer: str, pred_dir) -> None:
    fold = e2e.train_interrupt_resume(ds.env, ds.dataset_id, ds.name, configuration, trainer, extra_env=FAST)
    e2e.assert_finite_progress(fold, COMMON_KEYS)
    assert (fold / "ssl_progress.png").is_file()
    assert_resumed_state(ds.env, fold)
    pred = e2e.predict(ds.env, ds.dataset_id, configuration, trainer, ds.raw / "imagesTs", pred_dir)
    ending = json.loads((ds.raw / "dataset.json").read_text(encoding="utf-8"))["file_ending"]
    assert sorted(p.name for p in pred.glob(f"*{ending}")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())


@pytest.mark.parametrize("trainer", IN_CI)
def test_zoo_trainer_3d_interrupt_resume_predict(trainer, synthetic3d, tmp_path):
    interrupt_resume_predict(synthetic3d, "3d_fullres", trainer, tmp_path / "pred")


@pytest.mark.skipif(not EXHAUSTIVE, reason="every zoo trainer on 3d_fullres and 2d (~35 min): NNSSL_EXHAUSTIVE_E2E=1")
@pytest.mark.parametrize("trainer", ZOO)
def test_zoo_trainer_3d_and_2d_interrupt_resume_predict_exhaustive(trainer, synthetic3d, synthetic2d, tmp_path):
    interrupt_resume_predict(synthetic3d, "3d_fullres", trainer, tmp_path / "pred3d")
    interrupt_resume_predict(synthetic2d, "2d", trainer, tmp_path / "pred2d")


def test_zoo_benchmark_smoke(synthetic2d, tmp_path):
    """Every zoo trainer gets its row in the benchmark: trained, predicted and scored on the test set (the fully
    supervised reference and gap closed are tested in tests/unit/test_benchmark.py; skipped here for time)."""
    ds = synthetic2d
    out = tmp_path / "bench"
    env = {**ds.env, "nnUNet_results": str(tmp_path / "results")}
    e2e.run_cli(["nnssl_benchmark", "-d", str(ds.dataset_id), "-c", "2d", "-f", "0", "--smoke", "-device", "cpu",
             "-o", str(out), "--no-full-reference", "--trainers", *ZOO, "nnUNetTrainerDePL[ensemble]"], env,
            timeout=3000)
    runs = {r["trainer"]: r for r in json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["runs"]}
    for trainer in ZOO:
        assert runs[trainer]["error"] is None, runs[trainer]
        assert np.isfinite(np.mean(list(runs[trainer]["dice"].values()))), runs[trainer]
        assert runs[trainer]["seconds_per_iteration"] > 0
    table = (out / "benchmark.md").read_text(encoding="utf-8")
    assert all(f"| {t} |" in table for t in ZOO)
    # DePL's run predicting with both networks: nothing trained, its own nnUNet_results, DePL's model untouched
    ensemble = runs["nnUNetTrainerDePL[ensemble]"]
    assert ensemble["error"] is None and np.isfinite(np.mean(list(ensemble["dice"].values()))), ensemble
    assert "averaged softmax" in ensemble["notes"] and not ensemble["seconds_per_iteration"] > 0
    (exported,) = (out / "ensembles").glob("*/*/nnUNetTrainerCPS_ensemble__nnUNetPlans__2d/fold_0/checkpoint_final.pth")
    assert not (tmp_path / "results" / ds.name / "nnUNetTrainerCPS_ensemble__nnUNetPlans__2d").exists()
