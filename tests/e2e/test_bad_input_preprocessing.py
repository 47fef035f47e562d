"""Bad inputs to ``nnssl_plan_and_preprocess`` and ``nnssl_preprocess_unlabeled`` (issue 13 items 1, 5, 6, 7, 10),
each run through the console script in a subprocess: exit 1, one message naming the file/id and the problem, no
traceback, nothing written or deleted. Plus the stale-fingerprint re-plan, the withheld-label check and the folds
that fit the split (splits_final.json from a 'val' list; a clear stop with < 5 labeled cases)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bad_input import TRACEBACK, assert_unchanged, assert_user_error, run_script, tree_snapshot
from e2e_utils import fold_dir, nnunet_env, run_cli

DATASET_ID = 561
PLAN = "nnssl_plan_and_preprocess"
UNLABELED = "nnssl_preprocess_unlabeled"


def _make_raw(root: Path) -> Path:
    """3 labeled, 3 unlabeled (withheld labels), 1 test and 2 'val' cases (imagesVal/labelsVal)."""
    from nnssl.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(root / "raw", DATASET_ID, "3d", n_labeled=3, n_unlabeled=3, n_test=3, seed=4,
                                 name="BadInput")
    split = json.loads((raw / "ssl_split.json").read_text(encoding="utf-8"))
    val, split["test"] = split["test"][:2], split["test"][2:]
    (raw / "imagesVal").mkdir()
    (raw / "labelsVal").mkdir()
    for case in val:
        shutil.move(raw / "imagesTs" / f"{case}_0000.nii.gz", raw / "imagesVal" / f"{case}_0000.nii.gz")
        shutil.move(raw / "labelsTs" / f"{case}.nii.gz", raw / "labelsVal" / f"{case}.nii.gz")
    split["val"] = val
    (raw / "ssl_split.json").write_text(json.dumps(split, indent=2))
    return raw


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """A raw dataset planned and preprocessed once (3d_fullres); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("badinput")
    _make_raw(root)
    run_cli([PLAN, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], nnunet_env(root, nnUNet_n_proc_DA="1"))
    return root


def _copy(planned: Path, tmp_path: Path, with_preprocessed: bool = True) -> tuple[Path, Path, dict]:
    root = tmp_path / "root"
    shutil.copytree(planned / "raw", root / "raw")
    if with_preprocessed:
        shutil.copytree(planned / "preprocessed", root / "preprocessed")
    raw = next((root / "raw").iterdir())
    return root, raw, nnunet_env(root, nnUNet_n_proc_DA="1")


def _split(raw: Path) -> dict:
    return json.loads((raw / "ssl_split.json").read_text(encoding="utf-8"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_label(path: Path, change) -> None:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    new_arr, geometry_change = change(arr)
    out = sitk.GetImageFromArray(new_arr)
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    if geometry_change:
        geometry_change(out)
    sitk.WriteImage(out, str(path))


def _plan_fails(root: Path, env: dict, *fragments: str) -> str:
    before = tree_snapshot(root)
    proc = run_script([PLAN, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env=env)
    line = assert_user_error(proc, *fragments)
    assert_unchanged(before, root)
    print(f"\n[bad input] exit {proc.returncode}: {line}")  # shown with pytest -s (the report's table)
    return line


def _unlabeled_fails(root: Path, env: dict, *fragments: str, dataset: str = str(DATASET_ID)) -> str:
    before = tree_snapshot(root)
    proc = run_script([UNLABELED, "-d", dataset, "-c", "3d_fullres", "-np", "1"], env=env)
    line = assert_user_error(proc, *fragments)
    assert_unchanged(before, root)
    print(f"\n[bad input] exit {proc.returncode}: {line}")  # shown with pytest -s (the report's table)
    return line


# ----------------------------------------------------------------------------------------------- plan: raw checks
# These fail before nnU-Net reads anything, so the raw dataset is enough (no planning needed).


@pytest.fixture
def raw_only(tmp_path):
    root = tmp_path / "root"
    raw = _make_raw(root)
    return root, raw, nnunet_env(root, nnUNet_n_proc_DA="1")


def test_plan_truncated_labeled_image(raw_only):
    root, raw, env = raw_only
    bad = raw / "imagesTr" / f"{_split(raw)['labeled'][0]}_0000.nii.gz"
    _truncate(bad)
    _plan_fails(root, env, str(bad), "truncated")


def test_plan_truncated_label(raw_only):
    root, raw, env = raw_only
    bad = raw / "labelsTr" / f"{_split(raw)['labeled'][1]}.nii.gz"
    _truncate(bad)
    _plan_fails(root, env, str(bad), "truncated")


def test_plan_truncated_val_label(raw_only):
    root, raw, env = raw_only
    bad = raw / "labelsVal" / f"{_split(raw)['val'][0]}.nii.gz"
    _truncate(bad)
    _plan_fails(root, env, str(bad), "truncated")


def test_plan_label_value_not_in_dataset_json(raw_only):
    root, raw, env = raw_only
    case = _split(raw)["labeled"][0]
    bad = raw / "labelsTr" / f"{case}.nii.gz"

    def nine(arr):
        arr = arr.copy()
        arr[0, 0, 0] = 9
        return arr, None

    _rewrite_label(bad, nine)
    line = _plan_fails(root, env, str(bad), "label value(s) 9", "not in dataset.json labels",
                       f"{case}_0000.nii.gz")
    assert "error" in line


def test_plan_label_of_wrong_size(raw_only):
    root, raw, env = raw_only
    case = _split(raw)["labeled"][2]
    bad = raw / "labelsTr" / f"{case}.nii.gz"
    _rewrite_label(bad, lambda arr: (arr[:-1], None))
    _plan_fails(root, env, str(bad), "label size (31, 48, 48) differs", str(raw / "imagesTr" / f"{case}_0000.nii.gz"))


def test_plan_label_with_other_spacing(raw_only):
    root, raw, env = raw_only
    case = _split(raw)["labeled"][0]
    bad = raw / "labelsTr" / f"{case}.nii.gz"
    _rewrite_label(bad, lambda arr: (arr, lambda im: im.SetSpacing([s * 1.5 for s in im.GetSpacing()])))
    _plan_fails(root, env, str(bad), "label spacing", "differs", f"{case}_0000.nii.gz")


def test_plan_label_with_other_origin(raw_only):
    root, raw, env = raw_only
    case = _split(raw)["labeled"][1]
    bad = raw / "labelsTr" / f"{case}.nii.gz"
    _rewrite_label(bad, lambda arr: (arr, lambda im: im.SetOrigin([o + 5.0 for o in im.GetOrigin()])))
    _plan_fails(root, env, str(bad), "label origin", "differs", f"{case}_0000.nii.gz")


def test_plan_extra_channel_file_in_one_channel_dataset(raw_only):
    root, raw, env = raw_only
    case = _split(raw)["labeled"][0]
    extra = raw / "imagesTr" / f"{case}_0001.nii.gz"
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", extra)
    _plan_fails(root, env, str(extra), "channel 0001", "1 channel")


def test_plan_split_with_unknown_id(raw_only):
    root, raw, env = raw_only
    split = _split(raw)
    split["labeled"].append("no_such_case")
    (raw / "ssl_split.json").write_text(json.dumps(split))
    _plan_fails(root, env, "ssl_split.json", "no_such_case")


def test_plan_split_invalid_json(raw_only):
    root, raw, env = raw_only
    (raw / "ssl_split.json").write_text('{"labeled": [')
    _plan_fails(root, env, "ssl_split.json", "not valid JSON")


def test_plan_split_id_in_two_roles(raw_only):
    root, raw, env = raw_only
    split = _split(raw)
    split["unlabeled"].append(split["labeled"][0])
    (raw / "ssl_split.json").write_text(json.dumps(split))
    _plan_fails(root, env, "ssl_split.json", split["labeled"][0], "both 'labeled' and 'unlabeled'")


def test_plan_val_id_also_labeled(raw_only):
    root, raw, env = raw_only
    split = _split(raw)
    split["val"].append(split["labeled"][0])
    (raw / "ssl_split.json").write_text(json.dumps(split))
    _plan_fails(root, env, "'val'", split["labeled"][0])


def test_plan_unknown_dataset(raw_only):
    root, _, env = raw_only
    before = tree_snapshot(root)
    proc = run_script([PLAN, "-d", "555", "-c", "3d_fullres"], env=env)
    assert_user_error(proc, "555")
    assert_unchanged(before, root)


# ----------------------------------------------------------------------------------------------- preprocess_unlabeled


def test_unlabeled_unknown_dataset(raw_only):
    root, _, env = raw_only
    _unlabeled_fails(root, env, "555", dataset="555")


def test_unlabeled_dataset_never_planned(raw_only):
    root, raw, env = raw_only
    _unlabeled_fails(root, env, "nnUNetPlans.json not found", raw.name, "nnssl_plan_and_preprocess")


def _reset_unlabeled(root: Path, raw: Path, case: str) -> None:
    """Make ``case`` one that still needs preprocessing (as if it had just been added)."""
    pp = root / "preprocessed" / raw.name
    for suffix in (".pkl", ".b2nd", "_seg.b2nd"):
        (pp / "nnUNetPlans_3d_fullres_unlabeled" / f"{case}{suffix}").unlink()
    (pp / "nnUNetPlans_3d_fullres_unlabeled_withheld_labels" / f"{case}.npy").unlink()


def test_unlabeled_truncated_image(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    case = _split(raw)["unlabeled"][0]
    _reset_unlabeled(root, raw, case)
    bad = raw / "imagesUnlabeled" / f"{case}_0000.nii.gz"
    _truncate(bad)
    _unlabeled_fails(root, env, str(bad), "truncated")


def test_unlabeled_unreadable_image(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    case = _split(raw)["unlabeled"][1]
    _reset_unlabeled(root, raw, case)
    bad = raw / "imagesUnlabeled" / f"{case}_0000.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not an image"))
    _unlabeled_fails(root, env, str(bad))


def test_unlabeled_truncated_withheld_label(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    case = _split(raw)["unlabeled"][2]
    _reset_unlabeled(root, raw, case)
    bad = raw / "labelsUnlabeled" / f"{case}.nii.gz"
    _truncate(bad)
    _unlabeled_fails(root, env, str(bad), "truncated")


def test_unlabeled_extra_channel_file(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    case = _split(raw)["unlabeled"][0]
    extra = raw / "imagesUnlabeled" / f"{case}_0001.nii.gz"
    shutil.copy(raw / "imagesUnlabeled" / f"{case}_0000.nii.gz", extra)
    _unlabeled_fails(root, env, str(extra), "channel 0001", "1 channel")


def test_unlabeled_missing_channel_file(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    case = _split(raw)["unlabeled"][0]
    missing = raw / "imagesUnlabeled" / f"{case}_0000.nii.gz"
    missing.unlink()
    _unlabeled_fails(root, env, str(missing), case, "missing")


def test_unlabeled_unknown_configuration(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    before = tree_snapshot(root)
    proc = run_script([UNLABELED, "-d", str(DATASET_ID), "-c", "3d_lowres_nope", "-np", "1"], env=env)
    assert_user_error(proc, "3d_lowres_nope", "nnUNetPlans.json")
    assert_unchanged(before, root)


def test_truncated_withheld_npy_makes_the_case_redone(planned, tmp_path):
    from nnssl.preprocessing.unlabeled import is_case_done

    root, raw, env = _copy(planned, tmp_path)
    pp = root / "preprocessed" / raw.name
    folder = pp / "nnUNetPlans_3d_fullres_unlabeled"
    cases = _split(raw)["unlabeled"]
    npy = pp / "nnUNetPlans_3d_fullres_unlabeled_withheld_labels" / f"{cases[0]}.npy"
    assert is_case_done(folder, cases[0], has_withheld_label=True)
    full = npy.read_bytes()
    npy.write_bytes(full[: len(full) // 2])
    assert not is_case_done(folder, cases[0], has_withheld_label=True)
    proc = run_cli([UNLABELED, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    assert f"{len(cases) - 1}/{len(cases)} already done" in proc.stdout + proc.stderr
    assert npy.read_bytes() == full and is_case_done(folder, cases[0], has_withheld_label=True)


def _case_arrays(folder: Path, withheld: Path, case: str) -> dict:
    import pickle

    import blosc2

    from nnssl.preprocessing.unlabeled import DIGEST_KEY

    props = pickle.loads((folder / f"{case}.pkl").read_bytes())
    props.pop(DIGEST_KEY)
    return {"data": blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[:],
            "seg": blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:],
            "withheld": np.load(withheld / f"{case}.npy"), "props": props}


def test_unlabeled_preprocessing_in_two_concurrent_parts_equals_one_run(planned, tmp_path):
    """-num_parts 2: both parts at once into one folder give the arrays of one run; the run without parts then
    finds every case done; a case made with other parameters (its digest) is redone by its part only."""
    import pickle
    import subprocess

    from e2e_utils import assert_nested_equal

    from nnssl.preprocessing.unlabeled import DIGEST_KEY

    root, raw, env = _copy(planned, tmp_path)
    pp = root / "preprocessed" / raw.name
    folder, withheld = pp / "nnUNetPlans_3d_fullres_unlabeled", pp / "nnUNetPlans_3d_fullres_unlabeled_withheld_labels"
    cases = sorted(_split(raw)["unlabeled"])
    reference = {c: _case_arrays(folder, withheld, c) for c in cases}  # made by nnssl_plan_and_preprocess
    shutil.rmtree(folder)
    shutil.rmtree(withheld)

    cmd = [UNLABELED, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-num_parts", "2"]
    procs = [subprocess.Popen([*cmd, "-part_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              encoding="utf-8", errors="replace") for i in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "(part 0 of 2) (0/2 already done)" in outputs[0] and "(part 1 of 2) (0/1 already done)" in outputs[1]
    assert "without -num_parts" in outputs[0]
    assert sorted(p.stem for p in folder.glob("*.pkl")) == cases
    for case in cases:
        assert_nested_equal(_case_arrays(folder, withheld, case), reference[case])
    assert not list(folder.glob(".partial*"))

    proc = run_cli([UNLABELED, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    assert f"({len(cases)}/{len(cases)} already done)" in proc.stdout + proc.stderr

    # a case whose .pkl records other preprocessing parameters is redone, by the part it belongs to
    stale = cases[1]  # part 1 of 2
    props = pickle.loads((folder / f"{stale}.pkl").read_bytes())
    (folder / f"{stale}.pkl").write_bytes(pickle.dumps({**props, DIGEST_KEY: "made-with-other-plans"}))
    proc = run_cli([*cmd, "-part_id", "0"], env)
    assert "(part 0 of 2) (2/2 already done)" in proc.stdout + proc.stderr
    proc = run_cli([*cmd, "-part_id", "1"], env)
    assert "(part 1 of 2) (0/1 already done)" in proc.stdout + proc.stderr
    assert_nested_equal(_case_arrays(folder, withheld, stale), reference[stale])

    before = tree_snapshot(root)
    proc = run_script([*cmd, "-part_id", "2"], env=env)
    assert_user_error(proc, "-part_id", "0..1")
    assert_unchanged(before, root)


# ----------------------------------------------------------------------------------------------- item 5 and 10


@pytest.mark.slow
def test_changed_split_recomputes_fingerprint_and_rebuilds_unlabeled(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    pp = root / "preprocessed" / raw.name
    old_fp = json.loads((pp / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(old_fp["spacings"]) == 3
    # a reconversion with another seed: one labeled case becomes unlabeled, one unlabeled case becomes test
    split = _split(raw)
    moved, gone = split["labeled"].pop(0), split["unlabeled"].pop(0)
    split["unlabeled"].append(moved)
    split["test"].append(gone)
    shutil.move(raw / "imagesTr" / f"{moved}_0000.nii.gz", raw / "imagesUnlabeled" / f"{moved}_0000.nii.gz")
    shutil.move(raw / "labelsTr" / f"{moved}.nii.gz", raw / "labelsUnlabeled" / f"{moved}.nii.gz")
    shutil.move(raw / "imagesUnlabeled" / f"{gone}_0000.nii.gz", raw / "imagesTs" / f"{gone}_0000.nii.gz")
    shutil.move(raw / "labelsUnlabeled" / f"{gone}.nii.gz", raw / "labelsTs" / f"{gone}.nii.gz")
    (raw / "ssl_split.json").write_text(json.dumps(split, indent=2))
    dj = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    dj["numTraining"] = len(split["labeled"])
    (raw / "dataset.json").write_text(json.dumps(dj, indent=2))

    proc = run_cli([PLAN, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    out = proc.stdout + proc.stderr
    assert TRACEBACK not in out
    assert "recomputing the fingerprint" in out and "the labeled cases changed" in out
    new_fp = json.loads((pp / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(new_fp["spacings"]) == len(split["labeled"]) == 2
    assert new_fp["foreground_intensity_properties_per_channel"] != \
        old_fp["foreground_intensity_properties_per_channel"]
    source = json.loads((pp / "nnssl_fingerprint_source.json").read_text(encoding="utf-8"))
    assert source["labeled"] == sorted(split["labeled"])
    assert "rebuilding it" in out  # new fingerprint -> new normalisation -> the unlabeled cases are redone
    unl = pp / "nnUNetPlans_3d_fullres_unlabeled"
    assert sorted(p.stem for p in unl.glob("*.pkl")) == sorted(split["unlabeled"])
    withheld = pp / "nnUNetPlans_3d_fullres_unlabeled_withheld_labels"
    assert sorted(p.stem for p in withheld.glob("*.npy")) == sorted(split["unlabeled"])
    labeled_pp = {p.name[:-5] for p in (pp / "nnUNetPlans_3d_fullres").glob("*.b2nd") if "_seg" not in p.name}
    assert labeled_pp == set(split["labeled"]) | set(split["val"])
    assert not (pp / "gt_segmentations" / f"{moved}.nii.gz").exists()
    assert json.loads((pp / "splits_final.json").read_text(encoding="utf-8")) == [{"train": sorted(split["labeled"]),
                                                                   "val": sorted(split["val"])}]

    # unchanged split: the fingerprint is kept, unlabeled cases are reused
    proc = run_cli([PLAN, "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    assert "recomputing the fingerprint" not in proc.stdout and "rebuilding" not in proc.stdout
    assert f"{len(split['unlabeled'])}/{len(split['unlabeled'])} already done" in proc.stdout + proc.stderr


def test_val_cases_preprocessed_after_planning_with_splits(planned):
    raw = next((planned / "raw").iterdir())
    pp = planned / "preprocessed" / raw.name
    split = _split(raw)
    assert json.loads((pp / "splits_final.json").read_text(encoding="utf-8")) == [{"train": sorted(split["labeled"]),
                                                                   "val": sorted(split["val"])}]
    fingerprint = json.loads((pp / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(fingerprint["spacings"]) == len(split["labeled"])  # val cases never enter the fingerprint
    cfg = pp / "nnUNetPlans_3d_fullres"
    for case in split["val"]:
        assert (cfg / f"{case}.pkl").is_file() and (cfg / f"{case}_seg.b2nd").is_file()
        assert (pp / "gt_segmentations" / f"{case}.nii.gz").read_bytes() == \
            (raw / "labelsVal" / f"{case}.nii.gz").read_bytes()


@pytest.mark.slow
def test_fold0_trains_on_labeled_and_validates_on_val(planned, tmp_path):
    root, raw, env = _copy(planned, tmp_path)
    env = {**env, "NNSSL_NUM_EPOCHS": "1", "NNSSL_ITERATIONS_PER_EPOCH": "1", "NNSSL_VAL_ITERATIONS_PER_EPOCH": "1"}
    from nnssl.plans_tools import shrink_network

    shrink_network(root / "preprocessed" / raw.name / "nnUNetPlans.json", base_features=4, max_features=32)
    run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerSupervised", "-device",
             "cpu"], env)
    fold = fold_dir(env, raw.name, "nnUNetTrainerSupervised", "3d_fullres", "0")
    split = _split(raw)
    assert sorted(p.name for p in (fold / "validation").glob("*.nii.gz")) == \
        sorted(f"{c}.nii.gz" for c in split["val"])
    log = "".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    assert f"This split has {len(split['labeled'])} training and {len(split['val'])} validation cases" in log


def _without_val(planned: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    """The planned dataset as if its split had no 'val' list (3 labeled cases, no splits_final.json)."""
    root, raw, env = _copy(planned, tmp_path)
    pp = root / "preprocessed" / raw.name
    split = _split(raw)
    for case in split.pop("val"):
        for f in (pp / "nnUNetPlans_3d_fullres").glob(f"{case}[._]*"):
            f.unlink()
    for folder in (raw, pp):
        (folder / "ssl_split.json").write_text(json.dumps(split))
    (pp / "splits_final.json").unlink()
    return root, raw, env


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["nnUNetTrainerSupervised", "nnUNetTrainerMeanTeacher"])
def test_fold0_with_three_labeled_cases_stops_clearly(planned, tmp_path, trainer):
    root, raw, env = _without_val(planned, tmp_path)
    proc = run_script(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                      env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and TRACEBACK not in out, out[-3000:]
    assert "only 3 labeled case(s)" in out and "fold 'all'" in out and "splits_final.json" in out
    assert "n_splits" not in out
    assert not (root / "preprocessed" / raw.name / "splits_final.json").exists()


def test_plan_without_val_and_few_labeled_writes_no_splits(planned, tmp_path):
    from nnssl.cli.plan_and_preprocess import write_splits

    root, raw, _ = _without_val(planned, tmp_path)
    pp = root / "preprocessed" / raw.name
    write_splits(pp, _split(raw)["labeled"], [])
    assert not (pp / "splits_final.json").exists()
    # a stale nnU-Net 5-fold file made for other labeled cases is moved aside, not used
    stale = [{"train": ["old_1", "old_2"], "val": ["old_3"]}]
    (pp / "splits_final.json").write_text(json.dumps(stale))
    write_splits(pp, _split(raw)["labeled"], [])
    assert not (pp / "splits_final.json").exists()
    assert json.loads((pp / "splits_final.stale.json").read_text(encoding="utf-8")) == stale


def test_integrity_check_accepts_the_synthetic_dataset(raw_only):
    """No false alarm on a valid dataset (label values, geometry and channels as the converters write them)."""
    from nnssl.cli.plan_and_preprocess import labeled_cases
    from nnssl.preprocessing.integrity import check_labeled_cases

    _, raw, _ = raw_only
    dj = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    cases = labeled_cases(raw, dj)
    check_labeled_cases({c: (v["images"], v["label"]) for c, v in cases.items()}, dj)
    assert np.array_equal(sorted(cases), sorted(_split(raw)["labeled"]))


def test_fold_all_leaves_val_cases_out_of_training(tmp_path):
    """``val`` cases sit in the configuration folder (for fold 0's validation); fold 'all' must not train on them."""
    from nnssl.training.folds import FoldsFromSplitFile

    class NnunetDoSplit:  # nnU-Net's do_split for fold 'all': every case of the configuration folder
        def do_split(self):
            return ["a", "b", "c", "v1"], ["a", "b", "c", "v1"]

    class Trainer(FoldsFromSplitFile, NnunetDoSplit):
        fold = "all"
        preprocessed_dataset_folder_base = str(tmp_path)

        def print_to_log_file(self, *args):
            self.logged = " ".join(map(str, args))

    (tmp_path / "ssl_split.json").write_text(json.dumps({"labeled": ["a", "b", "c"], "unlabeled": [], "val": ["v1"]}))
    trainer = Trainer()
    assert trainer.do_split() == (["a", "b", "c"], ["a", "b", "c"])
    assert "left out" in trainer.logged
