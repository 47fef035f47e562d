"""The pseudo-labeled nnU-Net raw dataset (docs/methods/pseudolabel.md: labeled + selected pseudo-labeled cases).

Layout of the new dataset ``Dataset<NEW_ID>_<OldName>PL`` (the raw-format contract of :mod:`nnssl.split`)::

    imagesTr/, labelsTr/   the source's labeled cases (same ids, real labels) + every selected unlabeled case under
                           the id ``pl_<unlabeled id>`` with its pseudo-label, so nobody mistakes one for the other
    imagesTs/, labelsTs/   the source's test set, unchanged
    imagesUnlabeled/       the source's unlabeled cases that were not selected (same ids); the selected ones now
                           live in imagesTr only, so a case is never both labeled and unlabeled
    labelsUnlabeled/       the withheld labels of those remaining unlabeled cases, if the source had them. Withheld
                           labels are never copied into labelsTr; those of selected cases are dropped (the report
                           keeps their Dice against the pseudo-label)
    dataset.json           the source's, with the new name and numTraining = labeled + pseudo-labeled
    ssl_split.json         labeled (real + pl_), unlabeled (remaining), test; ``pseudo_labeled`` (every pl_ id,
                           earlier rounds included) and ``pseudo_label_rounds`` (per round: source dataset, model,
                           checkpoint, selection rule, pl_ id -> unlabeled id)
    pseudolabel_report.json, pseudolabel_report.md   the decision and its reasons for every predicted case

Because the new dataset has imagesUnlabeled and an ssl_split.json, it is itself a valid input of
``nnssl_pseudolabel`` (pseudo-label -> fine-tune -> pseudo-label again). Files are hard-linked when source and
destination share a file system (raw files are never modified in place by nnU-Net) and copied otherwise; the
whole folder is written with :func:`nnssl.io.atomic_output_dir`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnssl.io import atomic_output_dir, atomic_write_json, atomic_write_text
from nnssl.split import (
    SPLIT_FILE_NAME,
    SplitError,
    SSLSplit,
    cases_in_folder,
    load_and_validate,
    save_split,
    validate_split_against_raw,
)

PSEUDO_PREFIX = "pl_"
REPORT_JSON = "pseudolabel_report.json"
REPORT_MD = "pseudolabel_report.md"
# keys of ssl_split.json this module owns; everything else of the source split is carried over
SPLIT_KEYS = ("pseudo_labeled", "pseudo_label_rounds")


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset in the nnssl contract, with its roles."""

    root: Path
    name: str
    dataset_json: dict[str, Any]
    split: SSLSplit

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {"0": None})))

    def image_files(self, folder: str, case_id: str) -> list[Path]:
        return [self.root / folder / f"{case_id}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]

    def pseudo_labeled(self) -> list[str]:
        return list(self.split.extra.get("pseudo_labeled", []))

    def class_names(self) -> dict[int, str]:
        """label value -> name (region-based label definitions are refused where they matter)."""
        return {int(v): k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}


def load_raw_dataset(root: str | os.PathLike) -> RawDataset:
    """Read a raw dataset; roles come from ssl_split.json (validated against the files), or, without one, from the
    folders themselves (imagesTr labeled, imagesUnlabeled unlabeled, imagesTs test)."""
    root = Path(root)
    ds_json = root / "dataset.json"
    if not ds_json.is_file():
        raise FileNotFoundError(f"{ds_json} not found: {root} is not an nnU-Net raw dataset")
    dataset_json = json.loads(ds_json.read_text(encoding="utf-8"))
    if (root / SPLIT_FILE_NAME).is_file():
        split = load_and_validate(root)
    else:
        ending = dataset_json["file_ending"]
        split = SSLSplit(labeled=sorted(cases_in_folder(root / "imagesTr", ending)),
                         unlabeled=sorted(cases_in_folder(root / "imagesUnlabeled", ending)),
                         test=sorted(cases_in_folder(root / "imagesTs", ending)), origin="folders")
        print(f"note: {root / SPLIT_FILE_NAME} not found; roles taken from imagesTr / imagesUnlabeled / imagesTs")
    if not split.unlabeled:
        raise SplitError(f"{root}: no unlabeled case (imagesUnlabeled is empty or missing): nothing to pseudo-label")
    return RawDataset(root, root.name, dataset_json, split)


def pseudo_id(case_id: str) -> str:
    return f"{PSEUDO_PREFIX}{case_id}"


def is_pseudo_id(case_id: str) -> bool:
    return case_id.startswith(PSEUDO_PREFIX)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def default_new_name(source_name: str) -> str:
    """``Dataset501_Abdomen`` -> ``AbdomenPL``; a later round ``AbdomenPL`` -> ``AbdomenPL2`` -> ``AbdomenPL3``."""
    base = re.sub(r"^Dataset\d+_", "", source_name)
    match = re.fullmatch(r"(.*)PL(\d*)", base)
    if match is None:
        return f"{base}PL"
    return f"{match.group(1)}PL{int(match.group(2) or 1) + 1}"


def check_new_dataset_id(new_id: int, new_name: str, source_name: str, overwrite: bool) -> None:
    """Refuse ids nnU-Net could not tell apart: the source's id, or an id already taken by a dataset of another
    name (raw, preprocessed or results), or an existing NEW dataset without ``overwrite``."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results

    if not 1 <= new_id <= 999:
        raise ValueError(f"-o {new_id}: nnU-Net dataset ids are 1..999")
    if source_name.startswith(f"Dataset{new_id:03d}_"):
        raise ValueError(f"-o {new_id} is the id of the source dataset {source_name}; choose a new id")
    wanted = dataset_folder_name(new_id, new_name)
    for base in (nnUNet_raw, nnUNet_preprocessed, nnUNet_results):
        if not base or not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            if entry.startswith(f"Dataset{new_id:03d}_") and entry != wanted:
                raise FileExistsError(f"-o {new_id}: {os.path.join(base, entry)} already uses dataset id {new_id}; "
                                      f"choose another id (nnU-Net needs ids to be unique)")
    if (Path(nnUNet_raw) / wanted).exists() and not overwrite:
        raise FileExistsError(f"{Path(nnUNet_raw) / wanted} already exists; pass --overwrite to replace it")


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found")
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(src, dst)


def _copy_case(source: RawDataset, src_folder: str, case_id: str, dst_root: Path, dst_folder: str,
               new_id: str | None = None) -> None:
    (dst_root / dst_folder).mkdir(exist_ok=True)
    new_id = new_id or case_id
    for c, src in enumerate(source.image_files(src_folder, case_id)):
        _link_or_copy(src, dst_root / dst_folder / f"{new_id}_{c:04d}{source.file_ending}")


def _copy_label(src: Path, dst_root: Path, dst_folder: str, new_id: str, file_ending: str) -> None:
    (dst_root / dst_folder).mkdir(exist_ok=True)
    _link_or_copy(src, dst_root / dst_folder / f"{new_id}{file_ending}")


def copy_test_set(source: RawDataset, dst_root: Path) -> None:
    """The source's test cases (and their labels where it has them) into a derived dataset, unchanged."""
    for case_id in source.split.test:
        _copy_case(source, "imagesTs", case_id, dst_root, "imagesTs")
        truth = source.root / "labelsTs" / f"{case_id}{source.file_ending}"
        if truth.is_file():
            _copy_label(truth, dst_root, "labelsTs", case_id, source.file_ending)


def write_derived_dataset_json(source: RawDataset, destination: Path, split: SSLSplit, dst_root: Path,
                               description: str) -> None:
    """The source's dataset.json with the derived dataset's name, case counts and ``description``."""
    dataset_json = dict(source.dataset_json)
    dataset_json["name"] = Path(destination).name.split("_", 1)[-1]
    dataset_json["numTraining"] = len(split.labeled)
    for key, ids in (("numUnlabeled", split.unlabeled), ("numTest", split.test)):
        if key in dataset_json:  # optional counts some converters add
            dataset_json[key] = len(ids)
    dataset_json["description"] = description
    atomic_write_json(dst_root / "dataset.json", dataset_json)


def new_split(source: RawDataset, selected: Sequence[str], round_info: dict[str, Any]) -> SSLSplit:
    """The new roles: labeled + pl_<selected>, remaining unlabeled, same test; provenance appended."""
    chosen = set(selected)
    new_ids = [pseudo_id(c) for c in selected]
    clash = sorted(set(new_ids) & set(source.split.labeled + source.split.test))
    if clash:
        raise SplitError(f"{source.root}: pseudo-label ids {clash[:5]} already exist as labeled/test ids")
    extra = {k: v for k, v in source.split.extra.items() if k not in SPLIT_KEYS}
    extra["pseudo_labeled"] = source.pseudo_labeled() + new_ids
    extra["pseudo_label_rounds"] = list(source.split.extra.get("pseudo_label_rounds", [])) + [round_info]
    return SSLSplit(labeled=list(source.split.labeled) + new_ids,
                    unlabeled=[c for c in source.split.unlabeled if c not in chosen],
                    test=list(source.split.test),
                    labeled_fraction=source.split.labeled_fraction,  # the fraction of *real* annotations
                    seed=source.split.seed,
                    origin=f"pseudolabel:{source.name}",
                    extra=extra)


def write_pseudo_labeled_dataset(source: RawDataset, destination: str | os.PathLike, selected: Sequence[str],
                                 pseudo_label_files: dict[str, Path], round_info: dict[str, Any],
                                 report: dict[str, Any], report_markdown: str, overwrite: bool = False) -> SSLSplit:
    """Write the new raw dataset at ``destination`` atomically and return its split (validated against it)."""
    destination = Path(destination)
    unknown = sorted(set(selected) - set(source.split.unlabeled))
    if unknown:
        raise SplitError(f"selected cases {unknown[:5]} are not unlabeled cases of {source.root}")
    split = new_split(source, selected, round_info)
    ending = source.file_ending
    with atomic_output_dir(destination, overwrite=overwrite,
                           replace_only_with=("dataset.json", "ssl_split.json"), clean_stale=True) as tmp:
        for case_id in source.split.labeled:
            _copy_case(source, "imagesTr", case_id, tmp, "imagesTr")
            _copy_label(source.root / "labelsTr" / f"{case_id}{ending}", tmp, "labelsTr", case_id, ending)
        for case_id in selected:
            _copy_case(source, "imagesUnlabeled", case_id, tmp, "imagesTr", pseudo_id(case_id))
            _copy_label(pseudo_label_files[case_id], tmp, "labelsTr", pseudo_id(case_id), ending)
        copy_test_set(source, tmp)
        for case_id in split.unlabeled:
            _copy_case(source, "imagesUnlabeled", case_id, tmp, "imagesUnlabeled")
            withheld = source.root / "labelsUnlabeled" / f"{case_id}{ending}"
            if withheld.is_file():
                _copy_label(withheld, tmp, "labelsUnlabeled", case_id, ending)
        (tmp / "imagesUnlabeled").mkdir(exist_ok=True)  # may be empty when every case was selected

        write_derived_dataset_json(source, destination, split, tmp,
                                   f"{source.name} + {len(selected)} pseudo-labeled cases (ids {PSEUDO_PREFIX}*) "
                                   f"made by nnssl_pseudolabel; see {REPORT_MD}")
        save_split(split, tmp / SPLIT_FILE_NAME)
        atomic_write_json(tmp / REPORT_JSON, report)
        atomic_write_text(tmp / REPORT_MD, report_markdown)
        validate_split_against_raw(split, tmp, strict=True)
    return split


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float | None]:
    """Dice of every label between two label maps; None when the label is in neither (undefined)."""
    out: dict[int, float | None] = {}
    for k in labels:
        p, t = prediction == k, truth == k
        denominator = int(p.sum()) + int(t.sum())
        out[k] = None if denominator == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denominator
    return out


def withheld_label_dice(source: RawDataset, pseudo_label_files: dict[str, Path]) -> dict[str, dict[int, float | None]]:
    """Diagnostics only, never used for selection: Dice of each pseudo-label against the withheld true label of
    the same case (labelsUnlabeled), for the cases that have one."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    labels = sorted(k for k in source.class_names() if k > 0)
    out: dict[str, dict[int, float | None]] = {}
    reader = None
    for case_id, pred_file in sorted(pseudo_label_files.items()):
        truth_file = source.root / "labelsUnlabeled" / f"{case_id}{source.file_ending}"
        if not truth_file.is_file():
            continue
        if reader is None:
            reader = determine_reader_writer_from_dataset_json(source.dataset_json, str(truth_file))()
        truth, _ = reader.read_seg(str(truth_file))
        prediction, _ = reader.read_seg(str(pred_file))
        if truth.shape != prediction.shape:
            raise ValueError(f"{pred_file} has shape {prediction.shape} but the withheld label {truth_file} has "
                             f"{truth.shape}")
        out[case_id] = dice_per_class(prediction, truth, labels)
    return out


def preprocess_with_source_plans(new_dataset_id: int, source_dataset: str, plans_identifier: str,
                                 configurations: Sequence[str], num_processes: int = 2) -> Path:
    """Make the new dataset trainable with the *source's* plans, so that ``-pretrained_weights`` of the source
    model fits (same architecture, patch size, spacing and intensity normalisation). These are nnU-Net's own
    steps, in the order its CLIs would need them:

    1. ``nnUNetv2_extract_fingerprint -d NEW`` (nnU-Net's trainer copies the fingerprint into its output);
    2. ``nnUNetv2_move_plans_between_datasets -s OLD -t NEW -sp P -tp P`` (the plans, renamed to NEW);
    3. the raw dataset.json next to them (nnU-Net's planner would have copied it; the plans are not re-planned);
    4. ``nnUNetv2_preprocess -d NEW -plans_name P -c ...``; then ``ssl_split.json`` is copied along, as
       ``nnssl_plan_and_preprocess`` does. Returns the preprocessed folder.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets,
    )
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    source_name = maybe_convert_to_dataset_name(source_dataset)
    source_plans = Path(nnUNet_preprocessed.require()) / source_name / f"{plans_identifier}.json"
    if not source_plans.is_file():
        raise FileNotFoundError(f"{source_plans} not found: the source dataset must be planned with plans "
                                f"{plans_identifier!r} (the plans its model was trained with, -p)")
    planned = json.loads(source_plans.read_text(encoding="utf-8"))["configurations"]
    unknown = [c for c in configurations if c not in planned]
    if unknown:
        raise ValueError(f"configuration(s) {unknown} are not in {source_plans} (planned: {sorted(planned)})")
    new_name = maybe_convert_to_dataset_name(new_dataset_id)
    raw = Path(nnUNet_raw.require()) / new_name
    out = Path(nnUNet_preprocessed.require()) / new_name
    extract_fingerprints([new_dataset_id], num_processes=max(1, num_processes), clean=True, verbose=False)
    move_plans_between_datasets(source_name, new_name, plans_identifier, plans_identifier)
    shutil.copyfile(raw / "dataset.json", out / "dataset.json")
    preprocess([new_dataset_id], plans_identifier, configurations=list(configurations),
               num_processes=[max(1, num_processes)] * len(configurations))
    shutil.copyfile(raw / SPLIT_FILE_NAME, out / SPLIT_FILE_NAME)
    return out


def discard_stale_derived_data(dataset_folder_name: str) -> None:
    """After ``--overwrite`` replaced a raw dataset: its preprocessed folder was derived from the old version (its
    splits_final.json lists the old pl_ ids, its cases the old selection), so it is removed; trained models are
    the user's results and only get a warning."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    if nnUNet_preprocessed and (Path(str(nnUNet_preprocessed)) / dataset_folder_name).is_dir():
        stale = Path(str(nnUNet_preprocessed)) / dataset_folder_name
        shutil.rmtree(stale)
        print(f"note: removed {stale}: it was preprocessed from the dataset that --overwrite replaced")
    if nnUNet_results and (Path(str(nnUNet_results)) / dataset_folder_name).is_dir():
        print(f"warning: {Path(str(nnUNet_results)) / dataset_folder_name} holds models trained on the replaced "
              f"version of {dataset_folder_name}")


# ------------------------------------------------------------------ folds of a derived dataset


def derive_splits(source_pp: Path, new_pp: Path, added: list[str]) -> bool:
    """Fold k of the new dataset = fold k of the source with ``added`` joined to its training cases (validation
    unchanged), so a numbered fold compares like with like. Returns False when the source has no
    ``splits_final.json`` (fold ``all``, or nnU-Net has not split it yet): nnU-Net's own split then applies."""
    source_file = source_pp / "splits_final.json"
    if not source_file.is_file():
        return False
    folds = json.loads(source_file.read_text(encoding="utf-8"))
    atomic_write_json(new_pp / "splits_final.json", [{"train": sorted(set(f["train"]) | set(added)), "val": f["val"]}
                                             for f in folds])
    return True


def link_validation_cases(source_pp: Path, new_pp: Path, plans_identifier: str, configuration: str,
                          val: list[str]) -> None:
    """``val`` cases of the source's ssl_split.json live in imagesVal, which the new raw dataset does not copy: their
    preprocessed files (same plans, so the same preprocessing) and reference labels are linked over instead."""
    plans = json.loads((source_pp / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    identifier = plans["configurations"][configuration]["data_identifier"]
    new_plans = json.loads((new_pp / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    new_identifier = new_plans["configurations"][configuration]["data_identifier"]
    for sub_src, sub_dst in ((identifier, new_identifier), ("gt_segmentations", "gt_segmentations")):
        for case_id in val:
            for src in [*(source_pp / sub_src).glob(f"{case_id}.*"), *(source_pp / sub_src).glob(f"{case_id}_seg.*")]:
                dst = new_pp / sub_dst / src.name
                if not dst.exists():
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
