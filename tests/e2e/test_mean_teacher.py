"""Mean Teacher end to end through the real CLIs: plan+preprocess (fixture), train, interrupt, resume, predict,
evaluate; plus the errors and resumability of the unlabeled pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from e2e_utils import (
    assert_finite_progress,
    assert_state_dicts_equal,
    fold_dir,
    predict,
    restore_trainer,
    run_cli,
    train_interrupt_resume,
)

pytestmark = pytest.mark.slow


def sitk_array(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
TRAINER = "nnUNetTrainerMeanTeacher"


def test_trainers_are_found_by_nnunet_lookup(synthetic3d):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "import sys; print([f(n).__name__ for n in sys.argv[1:]])")
    proc = run_cli([sys.executable, "-c", code, TRAINER, "nnUNetTrainerSupervised",
                    "nnUNetTrainerMeanTeacher_consistencyAll"], synthetic3d.env)
    assert "nnUNetTrainerMeanTeacher_consistencyAll" in proc.stdout


def test_mean_teacher_3d_interrupt_resume_predict_evaluate(synthetic3d, tmp_path):
    ds = synthetic3d
    fold = train_interrupt_resume(ds.env, ds.dataset_id, ds.name, "3d_fullres", TRAINER)
    assert_finite_progress(fold, ["loss_unsupervised", "loss_supervised", "unsupervised_weight",
                                  "pseudo_label_confidence", "fraction_above_threshold", "pseudo_label_dice"])
    assert (fold / "ssl_progress.png").is_file() and (fold / "progress.png").is_file()

    trainer, ckpt = restore_trainer(ds.env, fold)
    state = ckpt["nnssl_state"]
    assert state["global_iteration"] == 4  # 2 epochs x 2 iterations, counted across the interruption
    assert_state_dicts_equal(trainer.extra_networks["teacher"].state_dict(), state["extra_networks"]["teacher"])
    assert_state_dicts_equal(trainer.network.state_dict(), ckpt["network_weights"])
    teacher, student = state["extra_networks"]["teacher"], ckpt["network_weights"]
    assert any(not np.array_equal(teacher[k].numpy(), student[k].numpy()) for k in student
               if student[k].is_floating_point()), "the teacher must be an EMA, not a copy of the student"

    pred = predict(ds.env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (ds.raw / "labelsTs").iterdir())
    proc = run_cli(["nnssl_evaluate", str(pred), str(ds.raw / "labelsTs"), "-d", str(ds.dataset_id)], ds.env)
    summary = json.loads((pred / "nnssl_evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert "liver" in proc.stdout and summary["per_case"]


def test_mean_teacher_learns_above_chance(synthetic3d, tmp_path):
    """One epoch of 350 iterations at nnU-Net's initial lr: long enough to leave the all-background phase."""
    ds = synthetic3d
    env = {**ds.env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "350",
           "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1"}
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"], env)
    pred = predict(env, ds.dataset_id, "3d_fullres", TRAINER, ds.raw / "imagesTs", tmp_path / "pred", fold="all")
    run_cli(["nnssl_evaluate", str(pred), str(ds.raw / "labelsTs"), "-d", str(ds.dataset_id)], ds.env)
    summary = json.loads((pred / "nnssl_evaluation" / "summary.json").read_text(encoding="utf-8"))
    # a random guess with the class frequencies scores about the class's voxel fraction
    liver_fraction = np.mean([np.mean(sitk_array(f) == 1) for f in (ds.raw / "labelsTs").iterdir()])
    liver_dice = summary["per_class"]["liver"]["dice"]["mean"]
    assert liver_dice > max(0.25, 3 * liver_fraction), (liver_dice, liver_fraction)


def test_mean_teacher_2d_configuration(synthetic3d, tmp_path):
    ds = synthetic3d
    env = {**ds.env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "2", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1"}
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = fold_dir(env, ds.name, TRAINER, "2d", "0")
    assert (fold / "checkpoint_final.pth").is_file()
    pred = predict(env, ds.dataset_id, "2d", TRAINER, ds.raw / "imagesTs", tmp_path / "pred2d")
    assert len(list(pred.glob("*.nii.gz"))) == 2


def test_clear_error_when_unlabeled_not_preprocessed(synthetic3d):
    ds = synthetic3d
    folder = ds.preprocessed / "nnUNetPlans_2d_unlabeled"
    hidden = ds.preprocessed / "hidden_unlabeled"
    os.replace(folder, hidden)
    try:
        env = {**ds.env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "1"}
        proc = run_cli(["nnUNetv2_train", str(ds.dataset_id), "2d", "1", "-tr", TRAINER, "-device", "cpu"], env,
                       expect_ok=False)
        assert proc.returncode != 0
        assert "No preprocessed unlabeled cases" in proc.stderr + proc.stdout
        assert "nnssl_plan_and_preprocess" in proc.stderr + proc.stdout
        assert "Traceback (most recent call last)" not in proc.stderr + proc.stdout
    finally:
        os.replace(hidden, folder)
        shutil.rmtree(fold_dir(ds.env, ds.name, TRAINER, "2d", "1"), ignore_errors=True)


def test_unlabeled_preprocessing_resumes_and_skips_done_cases(synthetic3d):
    ds = synthetic3d
    folder = ds.preprocessed / "nnUNetPlans_3d_fullres_unlabeled"
    cases = sorted(p.stem for p in folder.glob("*.pkl"))
    assert len(cases) == 6
    # the case files, plus the record of the preprocessing parameters the folder was made with
    assert {p.suffix for p in folder.iterdir() if p.is_file()} == {".b2nd", ".pkl", ".json"}
    assert [p.name for p in folder.glob("*.json")] == ["nnssl_preprocessing_source.json"]
    removed, truncated, untouched = cases[0], cases[1], cases[2:]
    (folder / f"{removed}.pkl").unlink()  # as if killed before the .pkl (written last) was moved in
    (folder / f"{truncated}.b2nd").write_bytes(b"truncated")  # a damaged file must not count as done
    mtimes = {c: (folder / f"{c}.b2nd").stat().st_mtime_ns for c in untouched}

    proc = run_cli(["nnssl_preprocess_unlabeled", "-d", str(ds.dataset_id), "-c", "3d_fullres", "-np", "1"], ds.env)
    assert "4/6 already done" in proc.stderr + proc.stdout
    from nnssl.preprocessing.unlabeled import is_case_done

    assert all(is_case_done(folder, c) for c in cases)
    assert {c: (folder / f"{c}.b2nd").stat().st_mtime_ns for c in untouched} == mtimes
    assert not (folder / ".partial").exists()


def test_unlabeled_cases_never_carry_labels(synthetic3d):
    """The seg file of an unlabeled case is only nnU-Net's nonzero mask (-1/0), never a withheld label."""
    import blosc2

    folder = synthetic3d.preprocessed / "nnUNetPlans_3d_fullres_unlabeled"
    for seg_file in folder.glob("*_seg.b2nd"):
        values = set(np.unique(blosc2.open(str(seg_file), mode="r")[:]).tolist())
        assert values <= {-1, 0}, f"{seg_file}: {values}"
    withheld = synthetic3d.preprocessed / "nnUNetPlans_3d_fullres_unlabeled_withheld_labels"
    assert sorted(p.stem for p in withheld.glob("*.npy")) == sorted(p.stem for p in folder.glob("*.pkl"))
    labeled = {p.name[:-len(".b2nd")] for p in (synthetic3d.preprocessed / "nnUNetPlans_3d_fullres").glob("*.b2nd")
               if not p.name.endswith("_seg.b2nd")}
    split = json.loads((synthetic3d.raw / "ssl_split.json").read_text(encoding="utf-8"))
    assert labeled == set(split["labeled"])
    fingerprint = json.loads((synthetic3d.preprocessed / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(fingerprint["spacings"]) == len(split["labeled"])


def test_nnunet_cli_rejects_unknown_trainer(synthetic3d):
    proc = subprocess.run(["nnUNetv2_train", str(synthetic3d.dataset_id), "3d_fullres", "0", "-tr",
                           "nnUNetTrainerDoesNotExist", "-device", "cpu"], env=synthetic3d.env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode != 0 and "nnUNetTrainerDoesNotExist" in proc.stderr
