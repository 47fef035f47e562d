"""The methods of DHC's zoo (xmed-lab/DHC ``train_<method>.py``) end to end through the real CLIs, one parametrised
test over all of them: 3d_fullres and 2d trainings interrupted after epoch 0 and finished with ``--c`` (every extra
network, optimizer and registered per-class state restored), ``nnUNetv2_predict`` on the test images; then one
``nnssl_benchmark --smoke`` over all of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from e2e_utils import (
    assert_finite_progress,
    assert_nested_equal,
    assert_state_dicts_equal,
    predict,
    restore_trainer,
    run_cli,
    train_interrupt_resume,
)

pytestmark = pytest.mark.slow
ZOO = ("nnUNetTrainerUAMT", "nnUNetTrainerURPC", "nnUNetTrainerSSNet", "nnUNetTrainerDST", "nnUNetTrainerDePL",
       "nnUNetTrainerAdsh", "nnUNetTrainerCReST", "nnUNetTrainerSimiS", "nnUNetTrainerBasak", "nnUNetTrainerCLD")
COMMON_KEYS = ["loss_supervised", "loss_unsupervised", "unsupervised_weight"]
# the sliding-window validation after training is nnU-Net's, the same for every trainer: skipped for time
FAST = {"NNSSL_SKIP_FINAL_VALIDATION": "1"}


def assert_resumed_state(env: dict, fold) -> None:
    """The trainer rebuilt from checkpoint_final.pth holds exactly the saved networks, optimizers and state."""
    trainer, ckpt = restore_trainer(env, fold)
    saved = ckpt["nnssl_state"]
    assert saved["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    restored = trainer.ssl_state_dict()
    for part in ("extra_networks", "extra_optimizers", "extra_state"):
        assert_nested_equal(restored[part], saved[part], part)


@pytest.mark.parametrize("trainer", ZOO)
def test_zoo_trainer_3d_and_2d_interrupt_resume_predict(trainer, synthetic3d, synthetic2d, tmp_path):
    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "3d_fullres", trainer, extra_env=FAST)
    assert_finite_progress(fold, COMMON_KEYS)
    assert (fold / "ssl_progress.png").is_file()
    assert_resumed_state(ds.env, fold)
    pred = predict(ds.env, ds.dataset_id, "3d_fullres", trainer, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())

    ds2 = synthetic2d
    fold2 = train_interrupt_resume(ds2.env, ds2.dataset_id, ds2.name, "2d", trainer, extra_env=FAST)
    assert_finite_progress(fold2, COMMON_KEYS)
    assert_resumed_state(ds2.env, fold2)


def test_zoo_benchmark_smoke(synthetic2d, tmp_path):
    """Every zoo trainer gets its row in the benchmark: trained, predicted and scored on the test set (the fully
    supervised reference and gap closed are tested in tests/unit/test_benchmark.py; skipped here for time)."""
    ds = synthetic2d
    out = tmp_path / "bench"
    env = {**ds.env, "nnUNet_results": str(tmp_path / "results")}
    run_cli(["nnssl_benchmark", "-d", str(ds.dataset_id), "-c", "2d", "-f", "0", "--smoke", "-device", "cpu",
             "-o", str(out), "--no-full-reference", "--trainers", *ZOO], env, timeout=3000)
    runs = {r["trainer"]: r for r in json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["runs"]}
    for trainer in ZOO:
        assert runs[trainer]["error"] is None, runs[trainer]
        assert np.isfinite(np.mean(list(runs[trainer]["dice"].values()))), runs[trainer]
    table = (out / "benchmark.md").read_text(encoding="utf-8")
    assert all(f"| {t} |" in table for t in ZOO)
