"""The fully supervised reference of ``nnssl_benchmark``: the source's labeled cases plus its unlabeled cases with
their withheld true labels (``labelsUnlabeled``), as one labeled raw dataset planned with the *source's* plans.

Layout of ``Dataset<NEW_ID>_<OldName>Full`` (the raw-format contract of :mod:`nnssl.split`)::

    imagesTr/, labelsTr/   every labeled case (real label) + every unlabeled case under its own id with its withheld
                           label, so nnU-Net trains on all of them
    imagesTs/, labelsTs/   the source's test set, unchanged (the benchmark predicts the source's imagesTs anyway)
    dataset.json           the source's, with the new name and numTraining = labeled + unlabeled
    ssl_split.json         labeled = all of them, unlabeled = [], test unchanged; ``full_reference_of`` (source
                           name) and ``withheld_labels_used`` (the ids whose label came from labelsUnlabeled)

Only this dataset ever reads labelsUnlabeled: the SSL rows train on the source dataset, whose labelsUnlabeled
nnU-Net never sees. The plans are the source's (``nnUNetv2_move_plans_between_datasets``, as the pseudo-label row
does), so architecture, patch size, spacing and intensity normalisation are those of the labeled-only row. A
numbered fold keeps its meaning: fold k of the new dataset trains on fold k's training cases of the source plus
every formerly unlabeled case, and validates on the same cases (``splits_final.json`` derived from the source's).

Run as ``python -m nnssl.benchmark.full_reference -s SOURCE_ID -t NEW_ID -c CFG`` (nnssl_benchmark does, in a
subprocess, so that nnU-Net's paths come from that run's environment).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from nnssl.io import atomic_output_dir
from nnssl.pseudolabel.dataset import (
    SPLIT_KEYS as PSEUDO_LABEL_SPLIT_KEYS,
)
from nnssl.pseudolabel.dataset import (
    RawDataset,
    _copy_case,
    _copy_label,
    check_new_dataset_id,
    copy_test_set,
    derive_splits,
    discard_stale_derived_data,
    link_validation_cases,
    preprocess_with_source_plans,
    write_derived_dataset_json,
)
from nnssl.split import SPLIT_FILE_NAME, SSLSplit, load_and_validate, save_split, validate_split_against_raw

FULL_SUFFIX = "Full"
WITHHELD_FOLDER = "labelsUnlabeled"
SPLITS_FILE = "splits_final.json"


def missing_withheld_labels(raw: str | os.PathLike) -> str | None:
    """Why the fully supervised reference cannot be built from the raw dataset ``raw``, or None when it can: it needs
    a withheld label in ``labelsUnlabeled`` for every unlabeled case of ``ssl_split.json``."""
    raw = Path(raw)
    if not (raw / WITHHELD_FOLDER).is_dir():
        return "no labelsUnlabeled: the fully supervised reference needs the withheld labels"
    if not (raw / SPLIT_FILE_NAME).is_file():
        return f"no {SPLIT_FILE_NAME}: the fully supervised reference needs to know which cases are unlabeled"
    ending = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))["file_ending"]
    unlabeled = json.loads((raw / SPLIT_FILE_NAME).read_text(encoding="utf-8")).get("unlabeled", [])
    if not unlabeled:
        return f"{SPLIT_FILE_NAME} lists no unlabeled case: the fully supervised reference would be labeled-only"
    missing = [c for c in unlabeled if not (raw / WITHHELD_FOLDER / f"{c}{ending}").is_file()]
    if missing:
        return (f"labelsUnlabeled lacks {len(missing)} of {len(unlabeled)} withheld labels (e.g. {missing[0]}): the "
                f"fully supervised reference needs every one")
    return None


def full_split(source: RawDataset) -> SSLSplit:
    """labeled = the source's labeled + unlabeled cases, unlabeled = [], test unchanged; provenance in extra."""
    extra = {k: v for k, v in source.split.extra.items() if k not in PSEUDO_LABEL_SPLIT_KEYS}
    extra["full_reference_of"] = source.name
    extra["withheld_labels_used"] = list(source.split.unlabeled)
    return SSLSplit(labeled=list(source.split.labeled) + list(source.split.unlabeled), unlabeled=[],
                    test=list(source.split.test), labeled_fraction=1.0, seed=source.split.seed,
                    origin=f"full_reference:{source.name}", extra=extra)


def write_full_label_dataset(source: RawDataset, destination: str | os.PathLike) -> SSLSplit:
    """Write the fully labeled raw dataset at ``destination`` atomically (replacing only an earlier one of the same
    kind) and return its split, validated against the files."""
    destination = Path(destination)
    split = full_split(source)
    ending = source.file_ending
    with atomic_output_dir(destination, overwrite=True, replace_only_with=("dataset.json", SPLIT_FILE_NAME)) as tmp:
        for case_id in source.split.labeled:
            _copy_case(source, "imagesTr", case_id, tmp, "imagesTr")
            _copy_label(source.root / "labelsTr" / f"{case_id}{ending}", tmp, "labelsTr", case_id, ending)
        for case_id in source.split.unlabeled:  # the withheld label becomes a training label, here and only here
            _copy_case(source, "imagesUnlabeled", case_id, tmp, "imagesTr")
            _copy_label(source.root / WITHHELD_FOLDER / f"{case_id}{ending}", tmp, "labelsTr", case_id, ending)
        copy_test_set(source, tmp)
        write_derived_dataset_json(source, destination, split, tmp,
                                   f"{source.name} with every unlabeled case's withheld label: the fully "
                                   f"supervised reference of nnssl_benchmark")
        save_split(split, tmp / SPLIT_FILE_NAME)
        validate_split_against_raw(split, tmp, strict=True)
    return split


def build(source_id: int, new_id: int, configuration: str, plans_identifier: str = "nnUNetPlans",
          num_processes: int = 1) -> dict:
    """Write, plan (source's plans) and preprocess the fully labeled dataset ``new_id`` of ``source_id``; returns
    what it did (for the benchmark row's notes)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    source_name = maybe_convert_to_dataset_name(source_id)
    source_root = Path(str(nnUNet_raw)) / source_name
    reason = missing_withheld_labels(source_root)
    if reason:
        raise SystemExit(f"{source_name}: {reason}")
    dataset_json = json.loads((source_root / "dataset.json").read_text(encoding="utf-8"))
    source = RawDataset(source_root, source_name, dataset_json,
                        load_and_validate(source_root))
    new_name = f"{source_name.split('_', 1)[1]}{FULL_SUFFIX}"
    folder = f"Dataset{new_id:03d}_{new_name}"
    check_new_dataset_id(new_id, new_name, source_name, overwrite=True)
    split = write_full_label_dataset(source, Path(str(nnUNet_raw)) / folder)
    discard_stale_derived_data(folder)  # preprocessed from an earlier version of this dataset
    new_pp = preprocess_with_source_plans(new_id, source_name, plans_identifier, [configuration], num_processes)
    source_pp = Path(str(nnUNet_preprocessed)) / source_name
    folds_derived = derive_splits(source_pp, new_pp, list(source.split.unlabeled))
    val = list(source.split.extra.get("val", []))
    if val:
        link_validation_cases(source_pp, new_pp, plans_identifier, configuration, val)
    return {"dataset": folder, "labeled": len(source.split.labeled),
            "withheld_labels_used": len(source.split.unlabeled), "training_cases": len(split.labeled),
            "folds_from_source": folds_derived}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the fully supervised reference dataset of nnssl_benchmark.")
    parser.add_argument("-s", type=int, required=True, help="source dataset id (with labelsUnlabeled)")
    parser.add_argument("-t", type=int, required=True, help="id of the new, fully labeled dataset")
    parser.add_argument("-c", required=True, help="configuration to preprocess")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier of the source")
    parser.add_argument("-np", type=int, default=1, help="processes for fingerprint and preprocessing")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.s, args.t, args.c, args.p, args.np)))


if __name__ == "__main__":
    main()
