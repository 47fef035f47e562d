"""``nnssl_plan_and_preprocess``: nnU-Net's fingerprint, planning and preprocessing, then the unlabeled cases.

nnU-Net's own steps see ``imagesTr`` only, which by the raw-format contract holds the labeled cases only, so
neither the fingerprint (intensity statistics, spacings) nor the plans can leak anything of unlabeled or test
cases. The split file is validated first, so a case listed as unlabeled that also sits in imagesTr is refused.

Before nnU-Net reads anything, every labeled image and label (and every validation case) is decoded completely and
checked (label values within dataset.json, label size/spacing/origin/direction equal to the image's, channel files):
see :mod:`nnssl.preprocessing.integrity`. A problem stops the run with one message naming the files.

The fingerprint is tied to the labeled cases it was computed from (``nnssl_fingerprint_source.json`` next to
nnU-Net's ``dataset_fingerprint.json``): when the labeled cases, their files or dataset.json changed since (e.g.
``nnssl_convert --seed 1 --overwrite`` chose another labeled subset), the fingerprint is recomputed (nnU-Net's
``clean=True``) instead of planning from statistics of cases that may now be unlabeled.

Folds: when ``ssl_split.json`` has a ``val`` list (published splits; the cases live in ``imagesVal``/``labelsVal``),
those cases are preprocessed with the plans after planning (they never enter the fingerprint) into nnU-Net's
configuration folders, their labels into ``gt_segmentations``, and ``splits_final.json`` gets one fold: fold 0 =
train on every labeled case, validate on ``val``. Without ``val``, nnU-Net's own 5-fold split applies (the nnssl
trainers refuse numbered folds when there are fewer than 5 labeled cases and no ``splits_final.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

from nnssl.errors import InputError, report_user_errors
from nnssl.io import atomic_write_json
from nnssl.preprocessing.integrity import (
    FINGERPRINT_SOURCE_FILE,
    check_channel_files,
    check_labeled_cases,
    fingerprint_source,
    stored_fingerprint_source,
)
from nnssl.preprocessing.unlabeled import preprocess_unlabeled
from nnssl.split import ROLES, SPLIT_FILE_NAME, SplitError, check_case_id, load_and_validate

PROG = "nnssl_plan_and_preprocess"
SPLITS_FILE = "splits_final.json"
VAL_FOLDERS = ("imagesVal", "labelsVal")


def _n_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def _load_dataset_json(raw_dir: Path) -> dict:
    path = raw_dir / "dataset.json"
    if not path.is_file():
        raise InputError(f"{path}: dataset.json not found")
    try:
        dj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in ("labels", "file_ending") if k not in dj]
    if not isinstance(dj, dict) or missing or not _n_channels(dj):
        raise InputError(f"{path}: needs 'channel_names', 'labels' and 'file_ending' (missing: "
                         f"{missing or ['channel_names']})")
    return dj


def val_ids(split, split_file: Path | str = SPLIT_FILE_NAME) -> list[str]:
    """The split's ``val`` list (validated: ids, no overlap with the other roles)."""
    if split is None:
        return []
    val = split.extra.get("val", [])
    source = f"{split_file} 'val'"
    if not isinstance(val, list):
        raise SplitError(f"{source} must be a list of case id strings")
    for case in val:
        check_case_id(case, source)
    both = sorted(set(val) & {i for role in ROLES for i in getattr(split, role)})
    if both:
        raise SplitError(f"{split_file}: ids in both 'val' and another role: {both[:10]}")
    return list(val)


def labeled_cases(raw_dir: Path, dataset_json: dict) -> dict[str, dict]:
    """nnU-Net's own list of the training cases (``imagesTr``/``labelsTr`` or dataset.json's ``dataset``), after the
    channel files of imagesTr were checked."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ending = dataset_json["file_ending"]
    if "dataset" not in dataset_json:
        from nnssl.split import cases_in_folder

        check_channel_files(raw_dir / "imagesTr", sorted(cases_in_folder(raw_dir / "imagesTr", ending)),
                            _n_channels(dataset_json), ending)
    cases = get_filenames_of_train_images_and_targets(str(raw_dir), dict(dataset_json))
    if not cases:
        raise InputError(f"{raw_dir / 'imagesTr'}: no labeled case (expected CASE_0000{ending} files)")
    return cases


def _val_files(raw_dir: Path, val: list[str], dataset_json: dict) -> dict[str, tuple[list[str], str]]:
    ending = dataset_json["file_ending"]
    images = check_channel_files(raw_dir / VAL_FOLDERS[0], val, _n_channels(dataset_json), ending)
    return {c: (images[c], str(raw_dir / VAL_FOLDERS[1] / f"{c}{ending}")) for c in val}


def _fingerprint_is_current(pp_dir: Path, source: dict) -> tuple[bool, str]:
    if not (pp_dir / "dataset_fingerprint.json").is_file():
        return True, ""  # nnU-Net computes it anyway
    stored = stored_fingerprint_source(pp_dir)
    if stored is None:
        return False, (f"{pp_dir / 'dataset_fingerprint.json'} exists but no {FINGERPRINT_SOURCE_FILE} says which "
                       f"labeled cases it was computed from")
    if stored.get("hash") != source["hash"]:
        old, new = set(stored.get("labeled", [])), set(source["labeled"])
        if old != new:
            why = (f"the labeled cases changed ({len(old - new)} no longer labeled, {len(new - old)} newly labeled; "
                   f"{len(new)} labeled now)")
        else:
            why = "the labeled image/label files or dataset.json changed"
        return False, f"{pp_dir / 'dataset_fingerprint.json'} was computed from another version of the dataset: {why}"
    return True, ""


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _preprocess_val_case(job: tuple) -> str:
    case, image_files, label_file, out_dir, plans, configuration, dataset_json = job
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    # nnU-Net's own per-case preprocessing of a labeled case (class locations for oversampling included)
    preprocessor.run_case_save(os.path.join(out_dir, case), image_files, label_file, plans_manager, cm, dataset_json)
    return case


def preprocess_val_cases(pp_dir: Path, val_files: dict[str, tuple[list[str], str]], configurations: list[str],
                         plans_identifier: str, num_processes: int) -> None:
    """The ``val`` cases, preprocessed with the finished plans into nnU-Net's configuration folders (labels
    included, as nnU-Net's validation needs), and their labels copied into ``gt_segmentations``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((pp_dir / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((pp_dir / "dataset.json").read_text(encoding="utf-8"))
    jobs = []
    for configuration in configurations:
        out_dir = pp_dir / PlansManager(plans).get_configuration(configuration).data_identifier
        out_dir.mkdir(parents=True, exist_ok=True)
        jobs += [(c, imgs, lab, str(out_dir), plans, configuration, dataset_json) for c, (imgs, lab)
                 in val_files.items()]
    print(f"preprocessing {len(val_files)} validation case(s) ('val' of {SPLIT_FILE_NAME}) for "
          f"{', '.join(configurations)}")
    if num_processes <= 1 or len(jobs) < 4:
        for job in jobs:
            _preprocess_val_case(job)
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            pool.map(_preprocess_val_case, jobs, chunksize=1)
    gt = pp_dir / "gt_segmentations"
    gt.mkdir(exist_ok=True)
    for _, label in val_files.values():
        shutil.copyfile(label, gt / Path(label).name)


def write_splits(pp_dir: Path, labeled: list[str], val: list[str]) -> None:
    """``splits_final.json`` that fits the split file (see the module docstring). A file nnssl wrote before is
    replaced; another one is kept when it lists exactly the current labeled (and val) cases, else it is stale (it
    names cases that are no longer labeled, or misses new ones) and is moved aside to ``splits_final.stale.json``."""
    path = pp_dir / SPLITS_FILE
    source_file = pp_dir / FINGERPRINT_SOURCE_FILE
    record = stored_fingerprint_source(pp_dir) or {}
    desired = [{"train": sorted(labeled), "val": sorted(val)}] if val else None
    if path.is_file():
        ours = record.get("splits_final_sha256") == _file_sha256(path)
        if not ours:
            try:
                folds = json.loads(path.read_text(encoding="utf-8"))
                listed = {i for fold in folds for key in ("train", "val") for i in fold[key]}
            except (ValueError, TypeError, KeyError):
                listed = None
            allowed = set(labeled) | set(val)
            if listed is not None and listed <= allowed and set(labeled) <= listed and \
                    (not val or set(val) <= listed):
                print(f"note: keeping your {path} (it lists exactly the current labeled"
                      f"{' and val' if val else ''} cases)")
                return
            stale = path.with_name("splits_final.stale.json")
            os.replace(path, stale)
            print(f"note: {path} did not match the labeled cases of {SPLIT_FILE_NAME} (it was made for another "
                  f"split); moved it to {stale}")
        elif desired is None:
            path.unlink()
    if desired is not None:
        atomic_write_json(path, desired)
        record["splits_final_sha256"] = _file_sha256(path)
        atomic_write_json(source_file, record)
        print(f"{path}: fold 0 = train on the {len(labeled)} labeled cases, validate on the {len(val)} 'val' cases")
    elif len(labeled) < 5 and not path.is_file():
        print(f"note: only {len(labeled)} labeled case(s): nnU-Net's 5-fold cross-validation needs 5. Train with "
              f"fold 'all', or write your own {path}")


def plan_and_preprocess(
    dataset_id: int,
    configurations: list[str],
    num_processes: int = 4,
    verify_dataset_integrity: bool = False,
    planner: str = "ExperimentPlanner",
    gpu_memory_target: float | None = None,
    plans_name: str | None = None,
) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset_name = maybe_convert_to_dataset_name(dataset_id)
    raw_dir = Path(nnUNet_raw.require()) / dataset_name
    split_file = raw_dir / SPLIT_FILE_NAME
    split = None
    if split_file.is_file():
        split = load_and_validate(raw_dir)
        print(f"{split_file}: {len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, "
              f"{len(split.test)} test (origin: {split.origin})")
    else:
        print(f"note: {split_file} not found; every case in imagesUnlabeled is used as unlabeled")
    dataset_json = _load_dataset_json(raw_dir)
    val = val_ids(split, split_file)

    # every check before nnU-Net reads a file or anything is written
    labeled = labeled_cases(raw_dir, dataset_json)
    check_labeled_cases({c: (v["images"], v["label"]) for c, v in labeled.items()}, dataset_json, num_processes)
    val_files = _val_files(raw_dir, val, dataset_json) if val else {}
    check_labeled_cases(val_files, dataset_json, num_processes, what="val")

    pp_dir = Path(nnUNet_preprocessed.require()) / dataset_name
    source = fingerprint_source(raw_dir, labeled, split.to_dict() if split else None)
    current, why = _fingerprint_is_current(pp_dir, source)
    # which splits_final.json nnssl wrote (so that it may replace it), kept across a new fingerprint
    source["splits_final_sha256"] = (stored_fingerprint_source(pp_dir) or {}).get("splits_final_sha256")
    if not current:
        print(f"note: {why}; recomputing the fingerprint from the {len(labeled)} labeled cases")
        (pp_dir / FINGERPRINT_SOURCE_FILE).unlink(missing_ok=True)
        # labels of cases that are no longer labeled must not stay in the preprocessed folder either
        shutil.rmtree(pp_dir / "gt_segmentations", ignore_errors=True)
    extract_fingerprints([dataset_id], num_processes=num_processes,
                         check_dataset_integrity=verify_dataset_integrity, clean=not current, verbose=False)
    atomic_write_json(pp_dir / FINGERPRINT_SOURCE_FILE, source)

    plans_identifier = plan_experiments([dataset_id], planner, gpu_memory_target_in_gb=gpu_memory_target,
                                        overwrite_plans_name=plans_name)
    plans_identifier = plans_identifier or plans_name or "nnUNetPlans"
    planned = json.loads((pp_dir / f"{plans_identifier}.json").read_text(encoding="utf-8"))["configurations"]
    skipped = [c for c in configurations if c not in planned]
    if skipped:  # e.g. 3d_fullres for a 2D PNG dataset: nnU-Net plans only '2d' there
        print(f"note: nnU-Net planned no {skipped} for {dataset_name}; preprocessing {sorted(planned)} only")
    configurations = [c for c in configurations if c in planned]
    preprocess([dataset_id], plans_identifier, configurations=configurations,
               num_processes=[num_processes] * len(configurations), verbose=False)
    if val_files:  # after fingerprint and plans, which therefore never see them
        preprocess_val_cases(pp_dir, val_files, configurations, plans_identifier, num_processes)
    write_splits(pp_dir, sorted(labeled), val)
    if split_file.is_file():
        shutil.copyfile(split_file, pp_dir / SPLIT_FILE_NAME)  # trainers read roles without needing nnUNet_raw
    preprocess_unlabeled(dataset_id, configurations, plans_identifier, num_processes)


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="nnU-Net fingerprint + planning + preprocessing of the labeled cases, then preprocessing of "
                    "imagesUnlabeled with the same plans (for the nnssl trainers).")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    parser.add_argument("-c", nargs="+", default=["2d", "3d_fullres"],
                        help="configurations to preprocess (default: 2d 3d_fullres)")
    parser.add_argument("-np", type=int, default=4, help="worker processes (default: 4)")
    parser.add_argument("-pl", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    parser.add_argument("-gpu_memory_target", type=float, default=None)
    parser.add_argument("-overwrite_plans_name", default=None)
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="also run nnU-Net's own verify_dataset_integrity (nnssl's checks always run)")
    args = parser.parse_args(argv)
    for d in args.d:
        plan_and_preprocess(d, args.c, args.np, args.verify_dataset_integrity, args.pl, args.gpu_memory_target,
                            args.overwrite_plans_name)


if __name__ == "__main__":
    main()
