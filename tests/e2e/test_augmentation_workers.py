"""nnU-Net's augmentation-worker budget (nnUNet_n_proc_DA) shared by the labeled and the unlabeled stream, through
nnUNetv2_train with real background workers (the other e2e tests augment in the main process)."""

from __future__ import annotations

import re

import pytest
from e2e_utils import SMOKE_SCHEDULE, assert_finite_progress, fold_dir, run_cli

from nnssl.training.unlabeled_data import augmentation_workers

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerEntropyMin"


def test_the_two_streams_share_nnunets_worker_budget(synthetic2d):
    ds = synthetic2d
    env = {**ds.env, **SMOKE_SCHEDULE, "nnUNet_n_proc_DA": "2"}  # nnU-Net caps it at the CPU count: 2 on any CI
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "2d", "1", "-tr", TRAINER, "-device", "cpu"], env)
    fold = fold_dir(env, ds.name, TRAINER, "2d", "1")
    log = "".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    n_l, n_u = (int(x) for x in re.search(r"batch per rank: (\d+) labeled \+ (\d+) unlabeled", log).groups())
    workers = re.search(r"augmentation workers \(nnUNet_n_proc_DA = 2\): (\d+) labeled .* \+ (\d+) unlabeled", log)
    assert workers, log[-3000:]
    assert tuple(int(x) for x in workers.groups()) == augmentation_workers(2, n_l, n_u)
    assert sum(int(x) for x in workers.groups()) == 2
    assert (fold / "checkpoint_final.pth").is_file()
    assert_finite_progress(fold, ["loss_supervised", "loss_unsupervised", "pseudo_label_confidence"])
