"""Preprocess ``imagesUnlabeled`` with the dataset's own nnU-Net plans.

Each unlabeled case goes through the preprocessor class the plans name for the configuration (same
transpose, crop-to-nonzero, normalisation and resampling as the labeled cases) and is stored in nnU-Net's
blosc2 format in ``$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/``, a sibling of nnU-Net's
own folder, which nnU-Net deletes and rewrites whenever it preprocesses again.

No label is read. The ``_seg.b2nd`` file of an unlabeled case holds only what nnU-Net computes for any case
without a label (its nonzero mask: -1 outside the body crop, 0 elsewhere), so nnU-Net's dataset class and
data loader read unlabeled cases unchanged and the augmentation pipeline sees the same inputs as for test cases.

When the dataset has ``labelsUnlabeled`` (labels withheld to simulate a labeled fraction), each such label is
preprocessed too, in a separate pass, into ``<data_identifier>_unlabeled_withheld_labels/CASE.npy``: the trainers'
pseudo-label quality diagnostic reads it at the end of each epoch; no training code path does.

Resumable and safe to kill: a case is written into ``.partial/`` and moved into place with ``os.replace``,
its ``.pkl`` last; a case counts as done only when its ``.pkl`` exists and its arrays open with the shape the
``.pkl`` records. Memory is bounded by ``num_processes`` cases at a time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np
from tqdm import tqdm

UNLABELED_SUFFIX = "_unlabeled"
WITHHELD_SUFFIX = "_unlabeled_withheld_labels"
SHAPE_KEY = "nnssl_preprocessed_shape"


def unlabeled_folder(preprocessed_dataset_dir: str | os.PathLike, data_identifier: str) -> Path:
    """Where the unlabeled cases of one configuration live (found by the configuration's data identifier)."""
    return Path(preprocessed_dataset_dir) / f"{data_identifier}{UNLABELED_SUFFIX}"


def withheld_labels_folder(preprocessed_dataset_dir: str | os.PathLike, data_identifier: str) -> Path:
    """Preprocessed ``labelsUnlabeled`` (diagnostics only: the pseudo-label Dice). Training never reads it."""
    return Path(preprocessed_dataset_dir) / f"{data_identifier}{WITHHELD_SUFFIX}"


def is_case_done(folder: Path, case: str) -> bool:
    pkl = folder / f"{case}.pkl"
    if not pkl.is_file():
        return False
    try:
        with open(pkl, "rb") as f:
            props = pickle.load(f)
        expected = tuple(props[SHAPE_KEY])
        data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r")
        seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")
        return tuple(data.shape) == expected and tuple(seg.shape[1:]) == expected[1:]
    except Exception:  # any unreadable or truncated file means "not done": it is simply recomputed
        return False


def completed_cases(folder: str | os.PathLike) -> list[str]:
    """Identifiers of cases whose preprocessing finished (``.pkl`` written last marks completion)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-4] for p in folder.iterdir() if p.suffix == ".pkl")


def _preprocess_one(args: tuple) -> str:
    case, image_files, withheld_label, out_folder, plans, configuration, dataset_json = args
    # imported here so that spawned workers pay nnU-Net's import cost once and the module stays light
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, seg, props = preprocessor.run_case(image_files, None, plans_manager, cm, dataset_json)
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int8, copy=False)
    props[SHAPE_KEY] = tuple(int(i) for i in data.shape)
    props["class_locations"] = {}  # no label: there is nothing to oversample
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)

    out_folder = Path(out_folder)
    if withheld_label is not None:
        # a separate pass with the label, so the unlabeled files above are exactly what a case without any label
        # gives; only the label map is kept, in its own folder, for the pseudo-label quality diagnostic
        _, label, _ = preprocessor.run_case(image_files, withheld_label, plans_manager, cm, dataset_json)
        withheld = out_folder.parent / (out_folder.name[:-len(UNLABELED_SUFFIX)] + WITHHELD_SUFFIX)
        withheld.mkdir(exist_ok=True)
        tmp = withheld / f".{case}.npy"
        np.save(tmp, label.astype(np.int16, copy=False))
        os.replace(tmp, withheld / f"{case}.npy")
    partial = out_folder / ".partial"
    partial.mkdir(exist_ok=True)
    tmp_trunc = str(partial / case)
    nnUNetDatasetBlosc2.save_case(data, seg, props, tmp_trunc, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # .pkl last: it marks the case as complete
        os.replace(tmp_trunc + suffix, out_folder / f"{case}{suffix}")
    return case


def unlabeled_image_files(raw_dataset_dir: Path, cases: Sequence[str], dataset_json: dict) -> dict[str, list[str]]:
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    files = {}
    missing = []
    for case in cases:
        fs = [str(raw_dataset_dir / "imagesUnlabeled" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
        missing += [f for f in fs if not os.path.isfile(f)]
        files[case] = fs
    if missing:
        raise FileNotFoundError(f"unlabeled image files missing: {missing[:10]}")
    return files


def unlabeled_case_ids(raw_dataset_dir: Path, dataset_json: dict) -> list[str]:
    """Unlabeled ids from ssl_split.json when present (validated), else every case in imagesUnlabeled."""
    from nnssl.split import SPLIT_FILE_NAME, cases_in_folder, load_and_validate

    if (raw_dataset_dir / SPLIT_FILE_NAME).is_file():
        return list(load_and_validate(raw_dataset_dir).unlabeled)
    return sorted(cases_in_folder(raw_dataset_dir / "imagesUnlabeled", dataset_json["file_ending"]))


def preprocess_unlabeled(
    dataset_name_or_id: str | int,
    configurations: Sequence[str] = ("3d_fullres",),
    plans_identifier: str = "nnUNetPlans",
    num_processes: int = 4,
    show_progress_bar: bool = True,
) -> dict[str, Path]:
    """Preprocess every unlabeled case for each configuration; skips cases already done. Returns the folders."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    raw_dir = Path(nnUNet_raw.require()) / dataset_name
    pp_dir = Path(nnUNet_preprocessed.require()) / dataset_name
    plans_file = pp_dir / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: plan the dataset first (nnssl_plan_and_preprocess -d "
                                f"{dataset_name_or_id})")
    plans = load_json(str(plans_file))
    dataset_json = load_json(str(pp_dir / "dataset.json"))
    cases = unlabeled_case_ids(raw_dir, dataset_json)
    files = unlabeled_image_files(raw_dir, cases, dataset_json)
    outputs = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise ValueError(f"configuration '{configuration}' is not in {plans_file}; available: "
                             f"{sorted(plans['configurations'])}")
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
        out = unlabeled_folder(pp_dir, data_identifier)
        out.mkdir(parents=True, exist_ok=True)
        todo = [c for c in cases if not is_case_done(out, c)]
        stale = sorted(set(completed_cases(out)) - set(cases))
        if stale:
            raise RuntimeError(f"{out} holds cases that ssl_split.json no longer lists as unlabeled: {stale[:10]}. "
                               f"Delete that folder and run again.")
        labels_dir = raw_dir / "labelsUnlabeled"
        ending = dataset_json["file_ending"]

        def withheld(case: str) -> str | None:
            f = labels_dir / f"{case}{ending}"
            return str(f) if f.is_file() else None

        jobs = [(c, files[c], withheld(c), str(out), plans, configuration, dataset_json) for c in todo]
        desc = f"Unlabeled {configuration} ({len(cases) - len(todo)}/{len(cases)} already done)"
        with tqdm(total=len(jobs), desc=desc, disable=not show_progress_bar) as bar:
            if num_processes <= 1:
                for job in jobs:
                    _preprocess_one(job)
                    bar.update()
            else:
                with multiprocessing.get_context("spawn").Pool(num_processes, maxtasksperchild=50) as pool:
                    for _ in pool.imap_unordered(_preprocess_one, jobs, chunksize=1):
                        bar.update()
        shutil.rmtree(out / ".partial", ignore_errors=True)
        outputs[configuration] = out
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Preprocess imagesUnlabeled of a planned dataset with its nnU-Net plans (resumable).")
    parser.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    parser.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=4, help="worker processes (default: 4)")
    args = parser.parse_args(argv)
    for d in args.d:
        for cfg, folder in preprocess_unlabeled(d, args.c, args.plans_name, args.np).items():
            print(f"{d} {cfg}: unlabeled cases in {folder}")


if __name__ == "__main__":
    main()
