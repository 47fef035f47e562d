"""Pseudo-labeling end to end through the console scripts (docs/methods/pseudolabel.md): train a short first model,
nnssl_pseudolabel (selection checked against voxel counts and confidences recomputed from the written predictions), the
new dataset's roles and files, resumability of the prediction cache, planning with the source's plans, fine-tuning
from the first model with -pretrained_weights, and a second pseudo-labeling round on the new dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from e2e_utils import fold_dir, load_checkpoint, run_cli

pytestmark = pytest.mark.slow

SOURCE_TRAINER = "nnUNetTrainerSupervised"
FINETUNE_TRAINER = "nnUNetTrainerPseudoLabelFinetune_plWeight05"
FOLD = "2"  # a fold no other test trains with these trainers
NEW_ID, ROUND2_ID, PARTS_ID = 601, 602, 604
SHORT = {"NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "2", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1"}
FOREGROUND = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def source_model(synthetic3d) -> Path:
    ds = synthetic3d
    run_cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", FOLD, "-tr", SOURCE_TRAINER, "-device", "cpu"],
            {**ds.env, **SHORT})
    fold = fold_dir(ds.env, ds.name, SOURCE_TRAINER, "3d_fullres", FOLD)
    assert (fold / "checkpoint_final.pth").is_file()
    return fold


def _pseudolabel(ds, new_id: int, *extra: str, dataset: int | None = None, trainer: str = SOURCE_TRAINER,
                 expect_ok: bool = True):
    return run_cli(["nnssl_pseudolabel", "-d", str(dataset or ds.dataset_id), "-c", "3d_fullres", "-f", FOLD,
                    "-tr", trainer, "-o", str(new_id), "-device", "cpu", "--disable-tta", "--no-progress", *extra],
                   ds.env, expect_ok=expect_ok)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _hand_stats(cache: Path, case: str) -> tuple[np.ndarray, float]:
    """Voxel counts of the written pseudo-label and its mean max-probability over predicted foreground."""
    label = _read(cache / f"{case}.nii.gz")
    confidence = np.load(cache / f"{case}_confidence.npz")["confidence"].astype(np.float64)
    assert confidence.shape == label.shape and 0 <= confidence.min() and confidence.max() <= 1 + 1e-3
    counts = np.bincount(label.reshape(-1), minlength=5)
    foreground = label > 0
    return counts, float(confidence[foreground].mean() if foreground.any() else confidence.mean())


def test_pseudolabel_select_build_resume_finetune_iterate(synthetic3d, source_model):
    ds = synthetic3d
    raw_root = ds.raw.parent
    split = json.loads((ds.raw / "ssl_split.json").read_text(encoding="utf-8"))
    unlabeled = sorted(split["unlabeled"])

    # --- first run: keep everything (threshold 0), store confidence maps
    proc = _pseudolabel(ds, NEW_ID, "--min-voxels", "0", "--save-confidence", "-npp", "0", "-nps", "0")
    assert f"0/{len(unlabeled)} unlabeled cases already predicted" in proc.stdout
    new_dir = next(raw_root.glob(f"Dataset{NEW_ID}_*"))
    assert new_dir.name == f"Dataset{NEW_ID}_{ds.name.split('_', 1)[1]}PL"
    report = json.loads((new_dir / "pseudolabel_report.json").read_text(encoding="utf-8"))
    cache = Path(report["cache_dir"])
    assert cache == source_model.parent / "pseudolabels" / f"fold_{FOLD}__checkpoint_final"
    assert report["num_selected"] == len(unlabeled) == report["num_predicted"]

    hand = {case: _hand_stats(cache, case) for case in unlabeled}
    by_case = {c["case_id"]: c for c in report["cases"]}
    for case, (counts, confidence) in hand.items():
        assert list(by_case[case]["voxel_counts"].values()) == counts.tolist()  # report == files, exactly
        assert by_case[case]["selection_confidence"] == pytest.approx(confidence, abs=2e-3)  # float16 map
        assert set(by_case[case]["dice_vs_withheld_label"]) == {"liver", "spleen", "kidney", "adrenal"}

    # --- a threshold between the observed per-case minima, so that the rule must separate cases
    minima = {case: int(counts[FOREGROUND].min()) for case, (counts, _) in hand.items()}
    threshold = sorted(minima.values())[len(minima) // 2]
    passing = sorted(c for c in unlabeled if minima[c] >= threshold)
    max_cases = max(1, len(passing) - 1)  # the cap must drop one passing case when it can

    # --- an interrupted cache: one case lost its record (written last), one has a damaged label
    lost, damaged = unlabeled[0], unlabeled[1]
    (cache / f"{lost}.json").unlink()
    (cache / f"{damaged}.nii.gz").write_bytes(b"not a nifti")
    untouched = {c: (cache / f"{c}.nii.gz").stat().st_mtime_ns for c in unlabeled[2:]}

    refused = _pseudolabel(ds, NEW_ID, "--min-voxels", str(threshold), expect_ok=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    proc = _pseudolabel(ds, NEW_ID, "--min-voxels", str(threshold), "--max-cases", str(max_cases), "--overwrite",
                        "--preprocess", "-npp", "1", "-nps", "1")  # nnU-Net's worker processes this time
    assert f"{len(unlabeled) - 2}/{len(unlabeled)} unlabeled cases already predicted" in proc.stdout
    assert {c: (cache / f"{c}.nii.gz").stat().st_mtime_ns for c in unlabeled[2:]} == untouched
    for case in (lost, damaged):  # predicted again, by the same model and settings: the same pseudo-label
        assert _hand_stats(cache, case)[0].tolist() == hand[case][0].tolist()

    # --- the selection and the report: size rule, then the most confident max_cases
    report = json.loads((new_dir / "pseudolabel_report.json").read_text(encoding="utf-8"))
    confidence_of = {c["case_id"]: c["selection_confidence"] for c in report["cases"]}
    assert confidence_of == pytest.approx({c: hand[c][1] for c in unlabeled}, abs=2e-3)
    expected = sorted(sorted(passing, key=lambda c: (-confidence_of[c], c))[:max_cases])
    assert 1 <= len(expected) < len(unlabeled)
    assert report["selected"] == expected
    for case in report["cases"]:
        assert case["selected"] == (case["case_id"] in expected)
        if minima[case["case_id"]] < threshold:
            assert any(f"< {threshold} voxels" in r for r in case["reasons"])
    table = (new_dir / "pseudolabel_report.md").read_text(encoding="utf-8")
    assert all(f"| {c} | yes | pl_{c} |" in table for c in expected)

    # --- the new dataset: roles, files, provenance; never a withheld label in labelsTr
    new_split = json.loads((new_dir / "ssl_split.json").read_text(encoding="utf-8"))
    pl_ids = [f"pl_{c}" for c in expected]
    assert new_split["labeled"] == split["labeled"] + pl_ids and new_split["pseudo_labeled"] == pl_ids
    assert new_split["unlabeled"] == [c for c in split["unlabeled"] if c not in expected]
    assert new_split["test"] == split["test"]
    model = new_split["pseudo_label_rounds"][-1]["model"]
    assert (model["trainer"], model["configuration"], model["folds"]) == (SOURCE_TRAINER, "3d_fullres", [FOLD])
    assert new_split["pseudo_label_rounds"][-1]["selection"]["min_voxels"] == threshold
    for case in expected:
        written = (new_dir / "labelsTr" / f"pl_{case}.nii.gz").read_bytes()
        assert written == (cache / f"{case}.nii.gz").read_bytes()
        assert not np.array_equal(_read(new_dir / "labelsTr" / f"pl_{case}.nii.gz"),
                                  _read(ds.raw / "labelsUnlabeled" / f"{case}.nii.gz"))
    assert sorted(p.name for p in (new_dir / "labelsUnlabeled").iterdir()) == \
        sorted(f"{c}.nii.gz" for c in new_split["unlabeled"])
    new_dataset_json = json.loads((new_dir / "dataset.json").read_text(encoding="utf-8"))
    assert new_dataset_json["numTraining"] == len(new_split["labeled"])

    # --- planned with the source's plans, so -pretrained_weights fits
    new_pp = ds.preprocessed.parent / new_dir.name
    source_plans = json.loads((ds.preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    new_plans = json.loads((new_pp / "nnUNetPlans.json").read_text(encoding="utf-8"))
    assert new_plans["configurations"]["3d_fullres"] == source_plans["configurations"]["3d_fullres"]
    assert new_plans["dataset_name"] == new_dir.name

    # --- fine-tune from the first model (one Adam step of lr 5e-5 at most moves a weight by ~5e-5)
    source_ckpt = source_model / "checkpoint_final.pth"
    env = {**ds.env, **SHORT, "NNSSL_ITERATIONS_PER_EPOCH": "1"}
    run_cli(["nnUNetv2_train", str(NEW_ID), "3d_fullres", FOLD, "-tr", FINETUNE_TRAINER, "-device", "cpu",
             "-pretrained_weights", str(source_ckpt)], env)
    fine = fold_dir(env, new_dir.name, FINETUNE_TRAINER, "3d_fullres", FOLD)
    log = "".join(p.read_text(encoding="utf-8") for p in fine.glob("training_log_*.txt"))
    assert "segmentation heads" in log and "restored" in log
    before, after = load_checkpoint(source_ckpt)["network_weights"], load_checkpoint(fine / "checkpoint_final.pth")
    assert after["init_args"]["dataset_json"]["name"] == new_dir.name.split("_", 1)[1]
    group = after["optimizer_state"]["param_groups"][0]
    assert "betas" in group and group["lr"] == pytest.approx(5e-5) and group["weight_decay"] == 0  # Table 3
    after = after["network_weights"]
    assert before.keys() == after.keys() and any(".seg_layers." in k for k in after)
    worst = max(float((after[k].float() - before[k].float()).abs().max()) for k in after)
    assert 0 < worst < 2e-4, f"the fine-tuned model must start from the first one (max change {worst})"
    splits = json.loads((new_pp / "splits_final.json").read_text(encoding="utf-8"))
    source_splits = json.loads((ds.preprocessed / "splits_final.json").read_text(encoding="utf-8"))
    assert splits[int(FOLD)]["val"] == source_splits[int(FOLD)]["val"]  # validated on real labels only
    assert set(pl_ids) <= set(splits[int(FOLD)]["train"])

    # --- a second round on the new dataset, with the fine-tuned model
    _pseudolabel(ds, ROUND2_ID, "--min-voxels", "0", "-npp", "0", "-nps", "0", dataset=NEW_ID,
                 trainer=FINETUNE_TRAINER)
    round2 = next(raw_root.glob(f"Dataset{ROUND2_ID}_*"))
    assert round2.name.endswith("PL2")
    split2 = json.loads((round2 / "ssl_split.json").read_text(encoding="utf-8"))
    assert split2["unlabeled"] == [] and len(split2["pseudo_label_rounds"]) == 2
    assert split2["pseudo_labeled"] == pl_ids + [f"pl_{c}" for c in new_split["unlabeled"]]
    assert split2["pseudo_label_rounds"][1]["model"]["trainer"] == FINETUNE_TRAINER
    shutil.rmtree(round2)  # not planned: keep the shared raw folder tidy for other tests


def test_clear_errors(synthetic3d, source_model):
    ds = synthetic3d
    proc = _pseudolabel(ds, 603, "-chk", "checkpoint_nope.pth", expect_ok=False)
    assert proc.returncode == 1 and "checkpoint_nope.pth" in proc.stderr and "checkpoint_final.pth" in proc.stderr
    proc = _pseudolabel(ds, ds.dataset_id, expect_ok=False)
    assert proc.returncode == 1 and "id of the source dataset" in proc.stderr
    assert not list(ds.raw.parent.glob("Dataset603_*"))


def test_pseudolabel_in_two_concurrent_parts_equals_one_run(synthetic3d, source_model, tmp_path):
    """-num_parts 2 -part_id 0/1 at once into one cache, then the command without parts: the same pseudo-labels and
    the same dataset as one run; a part refuses a cache of another model instead of discarding it."""
    import subprocess

    ds = synthetic3d
    unlabeled = sorted(json.loads((ds.raw / "ssl_split.json").read_text(encoding="utf-8"))["unlabeled"])
    one_cache, parts_cache = tmp_path / "one", tmp_path / "parts"
    args = ["--min-voxels", "0", "-npp", "0", "-nps", "0"]
    _pseudolabel(ds, PARTS_ID, *args, "--cache-dir", str(one_cache))
    one_report_file = next(ds.raw.parent.glob(f"Dataset{PARTS_ID}_*")) / "pseudolabel_report.json"
    one_report = json.loads(one_report_file.read_text(encoding="utf-8"))

    cmd = ["nnssl_pseudolabel", "-d", str(ds.dataset_id), "-c", "3d_fullres", "-f", FOLD, "-tr", SOURCE_TRAINER,
           "-o", str(PARTS_ID), "-device", "cpu", "--disable-tta", "--no-progress", *args, "--cache-dir",
           str(parts_cache), "-num_parts", "2"]
    procs = [subprocess.Popen([*cmd, "-part_id", str(i)], env=ds.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, encoding="utf-8", errors="replace") for i in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    halves = (len(unlabeled) + 1) // 2, len(unlabeled) // 2
    for i, (out, n) in enumerate(zip(outputs, halves)):
        assert f"0/{n} unlabeled cases (part {i} of 2) already predicted" in out
        assert f"part {i} of 2: {n} unlabeled cases predicted" in out and "without -num_parts" in out
    assert sorted(p.stem for p in parts_cache.glob("*.json") if p.name != "pseudolabel_cache.json") == unlabeled
    assert not list(parts_cache.glob(".partial*"))
    for case in unlabeled:
        assert np.array_equal(_read(parts_cache / f"{case}.nii.gz"), _read(one_cache / f"{case}.nii.gz")), case

    proc = _pseudolabel(ds, PARTS_ID, *args, "--cache-dir", str(parts_cache), "--overwrite")
    assert f"{len(unlabeled)}/{len(unlabeled)} unlabeled cases already predicted" in proc.stdout
    new_dir = next(ds.raw.parent.glob(f"Dataset{PARTS_ID}_*"))
    report = json.loads((new_dir / "pseudolabel_report.json").read_text(encoding="utf-8"))
    for key in ("selected", "num_selected", "num_predicted"):
        assert report[key] == one_report[key], key
    assert [c["voxel_counts"] for c in report["cases"]] == [c["voxel_counts"] for c in one_report["cases"]]

    manifest = parts_cache / "pseudolabel_cache.json"
    old_manifest = json.loads(manifest.read_text(encoding="utf-8"))
    manifest.write_text(json.dumps({**old_manifest, "checkpoint_sha256": ["another model"]}))
    refused = run_cli([*cmd, "-part_id", "0"], ds.env, expect_ok=False)
    assert refused.returncode == 1 and "pseudolabel_cache.json" in refused.stderr and "--cache-dir" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(list(parts_cache.glob("*.nii.gz"))) == len(unlabeled)  # nothing discarded
    shutil.rmtree(new_dir)  # not planned: keep the shared raw folder tidy for other tests
