"""Bad input to the evaluation, benchmark, pseudo-labeling and doctor console scripts (subprocesses): one error line
naming the file/id and the problem, exit 1, no traceback, nothing written or replaced."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from bad_input import TRACEBACK, assert_unchanged, assert_user_error, run_script, tree_snapshot

LABELS = {"background": 0, "organ": 1}


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pp"),
                "nnUNet_results": str(root / "res")})
    for k in ("raw", "pp", "res"):
        (root / k).mkdir(exist_ok=True)
    env.update(extra)
    return env


def _write_label(path: Path, seed: int) -> None:
    arr = (np.random.RandomState(seed).rand(6, 8, 8) > 0.5).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def _cases(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _write_label(folder / f"case_{i}.nii.gz", seed + i)
    return folder


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_evaluate_never_replaces_results_in_the_prediction_folder(tmp_path):
    pred, gt = _cases(tmp_path / "validation", 0), _cases(tmp_path / "gt", 10)
    (pred / "summary.json").write_text('{"nnU-Net": "its own validation summary"}')
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    args = [_script("nnssl_evaluate"), str(pred), str(gt), "--dataset-json", str(dataset_json), "--no-progress"]
    ok = run_script(args)
    assert ok.returncode == 0, ok.stderr
    assert (pred / "summary.json").read_text(encoding="utf-8") == '{"nnU-Net": "its own validation summary"}'
    written = pred / "nnssl_evaluation" / "summary.json"
    assert json.loads(written.read_text(encoding="utf-8"))["num_cases"] == 2

    before = tree_snapshot(tmp_path)
    again = run_script(args)
    assert_user_error(again, str(written), "already exists", "--overwrite")
    assert_unchanged(before, tmp_path)
    assert run_script([*args, "--overwrite"]).returncode == 0


def test_evaluate_with_swapped_arguments_does_not_write_into_the_raw_dataset(tmp_path):
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz",
                                                  "channel_names": {"0": "CT"}, "numTraining": 0}))
    labels_ts, pred = _cases(raw / "labelsTs", 0), _cases(tmp_path / "pred", 10)
    before = tree_snapshot(tmp_path)
    proc = run_script([_script("nnssl_evaluate"), str(labels_ts), str(pred), "--dataset-json",
                       str(raw / "dataset.json"), "--no-progress"])
    assert_user_error(proc, str(raw), "swapped")
    assert_unchanged(before, tmp_path)


def test_benchmark_unknown_trainer_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "bench"
    proc = run_script([_script("nnssl_benchmark"), "--synthetic", "--trainers", "NoSuchTrainer",
                       "nnUNetTrainerSupervised", "-o", str(out)], env=_env(tmp_path))
    line = assert_user_error(proc, "NoSuchTrainer", "unknown trainer")
    assert "nnUNetTrainerSupervised," in line  # the message lists the valid names
    assert not out.exists()


def test_benchmark_and_pseudolabel_unknown_dataset(tmp_path):
    env = _env(tmp_path)
    before = tree_snapshot(tmp_path)
    bench = run_script([_script("nnssl_benchmark"), "-d", "555", "-o", str(tmp_path / "bench")], env=env)
    assert_user_error(bench, "555", "Could not find a dataset")
    pl = run_script([_script("nnssl_pseudolabel"), "-d", "555", "-c", "3d_fullres", "-f", "0", "-o", "556"], env=env)
    assert_user_error(pl, "555", "Could not find a dataset")
    assert_unchanged(before, tmp_path)


def test_benchmark_of_a_dataset_that_was_never_planned(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "raw" / "Dataset555_X").mkdir()
    proc = run_script([_script("nnssl_benchmark"), "-d", "555", "-o", str(tmp_path / "bench")], env=env)
    assert_user_error(proc, "nnUNetPlans.json", "nnssl_plan_and_preprocess -d 555")
    assert not (tmp_path / "bench").exists()


def test_doctor_names_the_missing_trainer_path_and_a_missing_dataset(tmp_path):
    env = _env(tmp_path)
    env.pop("nnUNet_extTrainer", None)
    proc = run_script([_script("nnssl_doctor"), "-d", "555"], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and TRACEBACK not in out
    assert 'export nnUNet_extTrainer="$(nnssl_trainer_path)"' in out
    assert "Could not find requested nnunet trainer" in out  # the text a user searches for
    assert "dataset 555 not found" in out
    assert "nnUNetTrainerCPS" in out and "nnUNetTrainerSSLBase" not in out

    env["nnUNet_extTrainer"] = run_script([_script("nnssl_trainer_path")]).stdout.strip()
    healthy = run_script([_script("nnssl_doctor")], env=env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "PROBLEM" not in healthy.stdout


def test_demo_refuses_a_work_dir_it_did_not_write(tmp_path):
    """--overwrite deletes only a folder the demo wrote; a user's folder is refused before anything runs."""
    user = tmp_path / "my_data"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    proc = run_script([str(Path(sys.executable).parent / "nnssl_demo"), "--work-dir", str(user), "--overwrite"])
    assert_user_error(proc, str(user), "not a folder nnssl_demo wrote")
    assert (user / "keep.txt").read_text(encoding="utf-8") == "mine"
