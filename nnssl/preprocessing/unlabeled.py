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
``.pkl`` records (and its withheld label, when it has one, loads completely with that shape). Memory is bounded by
``num_processes`` cases at a time.

Every image (and withheld label) of a case still to do is decoded completely and checked before anything is
written (:mod:`nnssl.preprocessing.integrity`); a corrupt file stops the run with a message naming it.

Each folder records the preprocessing parameters it was made with (``nnssl_preprocessing_source.json``: the
configuration's spacing, normalisation, resampling, the fingerprint's intensity statistics, dataset.json's channels
and labels). When they differ (new plans, or a new fingerprint after the labeled cases changed), nnssl rebuilds the
folder it created; cases that ``ssl_split.json`` no longer lists as unlabeled are removed. Both print a note. Each
case's ``.pkl`` also records a digest of those parameters; a case made with other ones does not count as done.

Parts (``-num_parts N -part_id i``, :mod:`nnssl.parts`): part ``i`` preprocesses only its cases, through its own
temporary folder, and neither rebuilds the folder nor removes cases (another part may be writing there); its cases
made with other parameters are recomputed because of their digest. Run the command without parts when every part
has finished: it checks every case (computing what is missing) and removes stale ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np
from tqdm import tqdm

from nnssl.errors import InputError, report_user_errors
from nnssl.io import atomic_write_json
from nnssl.parts import Part, add_part_arguments
from nnssl.split import SPLIT_FILE_NAME

PROG = "nnssl_preprocess_unlabeled"
UNLABELED_SUFFIX = "_unlabeled"
WITHHELD_SUFFIX = "_unlabeled_withheld_labels"
SHAPE_KEY = "nnssl_preprocessed_shape"
DIGEST_KEY = "nnssl_preprocessing_digest"
SOURCE_FILE = "nnssl_preprocessing_source.json"
# what the preprocessor reads from a configuration (architecture, patch and batch size do not change the arrays)
_PREPROCESSING_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                       "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                       "resampling_fn_seg_kwargs")


def unlabeled_folder(preprocessed_dataset_dir: str | os.PathLike, data_identifier: str) -> Path:
    """Where the unlabeled cases of one configuration live (found by the configuration's data identifier)."""
    return Path(preprocessed_dataset_dir) / f"{data_identifier}{UNLABELED_SUFFIX}"


def withheld_labels_folder(preprocessed_dataset_dir: str | os.PathLike, data_identifier: str) -> Path:
    """Preprocessed ``labelsUnlabeled`` (diagnostics only: the pseudo-label Dice). Training never reads it."""
    return Path(preprocessed_dataset_dir) / f"{data_identifier}{WITHHELD_SUFFIX}"


def _withheld_folder_of(folder: Path) -> Path:
    return folder.parent / (folder.name[:-len(UNLABELED_SUFFIX)] + WITHHELD_SUFFIX)


def is_case_done(folder: Path, case: str, has_withheld_label: bool = False, digest: str | None = None) -> bool:
    """The case's ``.pkl`` exists, its arrays open with the shape it records, with ``has_withheld_label`` its
    withheld label ``.npy`` loads completely with that spatial shape and, with ``digest``, the ``.pkl`` records
    that digest of the preprocessing parameters."""
    folder = Path(folder)
    pkl = folder / f"{case}.pkl"
    if not pkl.is_file():
        return False
    try:
        with open(pkl, "rb") as f:
            props = pickle.load(f)
        expected = tuple(props[SHAPE_KEY])
        if digest is not None and props.get(DIGEST_KEY) != digest:
            return False
        data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r")
        seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")
        if tuple(data.shape) != expected or tuple(seg.shape[1:]) != expected[1:]:
            return False
        if has_withheld_label:
            label = np.load(_withheld_folder_of(folder) / f"{case}.npy")  # reads it to the last byte
            if tuple(label.shape) != (1, *expected[1:]):
                return False
        return True
    except Exception:  # any unreadable or truncated file means "not done": it is simply recomputed
        return False


def completed_cases(folder: str | os.PathLike) -> list[str]:
    """Identifiers of cases whose preprocessing finished (``.pkl`` written last marks completion)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-4] for p in folder.iterdir() if p.suffix == ".pkl")


def _preprocess_one(args: tuple) -> str:
    case, image_files, withheld_label, out_folder, plans, configuration, dataset_json, digest, partial_name = args
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
    props[DIGEST_KEY] = digest
    props["class_locations"] = {}  # no label: there is nothing to oversample
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)

    out_folder = Path(out_folder)
    if withheld_label is not None:
        # a separate pass with the label, so the unlabeled files above are exactly what a case without any label
        # gives; only the label map is kept, in its own folder, for the pseudo-label quality diagnostic
        _, label, _ = preprocessor.run_case(image_files, withheld_label, plans_manager, cm, dataset_json)
        withheld = _withheld_folder_of(out_folder)
        withheld.mkdir(exist_ok=True)
        tmp = withheld / f".{case}.npy.tmp"  # not *.npy: the trainer lists *.npy
        with open(tmp, "wb") as f:
            np.save(f, label.astype(np.int16, copy=False))
        os.replace(tmp, withheld / f"{case}.npy")
    partial = out_folder / partial_name
    partial.mkdir(exist_ok=True)
    tmp_trunc = str(partial / case)
    nnUNetDatasetBlosc2.save_case(data, seg, props, tmp_trunc, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # .pkl last: it marks the case as complete
        os.replace(tmp_trunc + suffix, out_folder / f"{case}{suffix}")
    return case


def unlabeled_image_files(raw_dataset_dir: Path, cases: Sequence[str], dataset_json: dict) -> dict[str, list[str]]:
    """The channel files of each case; :class:`InputError` naming the file when one is missing or a file in
    imagesUnlabeled has a channel index the dataset does not have."""
    from nnssl.preprocessing.integrity import check_channel_files

    n_channels = len(dataset_json["channel_names"])
    return check_channel_files(Path(raw_dataset_dir) / "imagesUnlabeled", cases, n_channels,
                               dataset_json["file_ending"])


def unlabeled_case_ids(raw_dataset_dir: Path, dataset_json: dict) -> list[str]:
    """Unlabeled ids from ssl_split.json when present (validated), else every case in imagesUnlabeled."""
    from nnssl.split import SPLIT_FILE_NAME, cases_in_folder, load_and_validate

    if (raw_dataset_dir / SPLIT_FILE_NAME).is_file():
        return list(load_and_validate(raw_dataset_dir).unlabeled)
    return sorted(cases_in_folder(raw_dataset_dir / "imagesUnlabeled", dataset_json["file_ending"]))


def preprocessing_signature(plans: dict, configuration: str, dataset_json: dict) -> dict:
    """Everything that determines the arrays of an unlabeled case (see the module docstring)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration).configuration
    signature = {k: cm.get(k) for k in _PREPROCESSING_KEYS}
    signature.update({k: plans.get(k) for k in ("transpose_forward", "foreground_intensity_properties_per_channel")})
    signature.update({k: dataset_json.get(k) for k in ("channel_names", "labels", "file_ending")})
    return json.loads(json.dumps(signature))  # as it reads back from the file (tuples become lists)


def signature_digest(signature: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def _read_signature(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_case(folder: Path, case: str) -> None:
    for name in (f"{case}.pkl", f"{case}.b2nd", f"{case}_seg.b2nd"):  # .pkl first: the case stops counting as done
        (folder / name).unlink(missing_ok=True)
    (_withheld_folder_of(folder) / f"{case}.npy").unlink(missing_ok=True)


def preprocess_unlabeled(
    dataset_name_or_id: str | int,
    configurations: Sequence[str] = ("3d_fullres",),
    plans_identifier: str = "nnUNetPlans",
    num_processes: int = 4,
    show_progress_bar: bool = True,
    part: Part = Part(),
) -> dict[str, Path]:
    """Preprocess every unlabeled case (of ``part``) for each configuration; skips cases already done. Returns the
    folders."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl.preprocessing.integrity import check_labeled_cases, verify_files

    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    raw_dir = Path(nnUNet_raw.require()) / dataset_name
    pp_dir = Path(nnUNet_preprocessed.require()) / dataset_name
    plans_file = pp_dir / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise InputError(f"{plans_file} not found: {dataset_name} was not planned with these plans; plan it first "
                         f"(nnssl_plan_and_preprocess -d {dataset_name_or_id})")
    plans = load_json(str(plans_file))
    if not (pp_dir / "dataset.json").is_file():
        raise InputError(f"{pp_dir / 'dataset.json'} not found: plan the dataset first "
                         f"(nnssl_plan_and_preprocess -d {dataset_name_or_id})")
    dataset_json = load_json(str(pp_dir / "dataset.json"))
    unknown = [c for c in configurations if c not in plans["configurations"]]
    if unknown:
        raise InputError(f"configuration(s) {unknown} not in {plans_file}; available: "
                         f"{sorted(plans['configurations'])}")
    all_cases = unlabeled_case_ids(raw_dir, dataset_json)
    cases = part.select(all_cases)
    files = unlabeled_image_files(raw_dir, cases, dataset_json)
    labels_dir = raw_dir / "labelsUnlabeled"
    ending = dataset_json["file_ending"]

    def withheld(case: str) -> str | None:
        f = labels_dir / f"{case}{ending}"
        return str(f) if f.is_file() else None

    # what each configuration needs; nothing is written before every file to be read has been checked
    work = []
    for configuration in configurations:
        signature = preprocessing_signature(plans, configuration, dataset_json)
        digest = signature_digest(signature)
        out = unlabeled_folder(pp_dir, PlansManager(plans).get_configuration(configuration).data_identifier)
        done_before = completed_cases(out)
        # a part never deletes (other parts write into the same folder): the digests make it recompute its cases
        rebuild = part.is_whole and bool(done_before) and _read_signature(out) != signature
        stale = [] if rebuild or not part.is_whole else sorted(set(done_before) - set(all_cases))
        todo = list(cases) if rebuild else [c for c in cases
                                            if not is_case_done(out, c, withheld(c) is not None, digest)]
        work.append((configuration, out, signature, digest, rebuild, stale, todo))
    to_check = sorted({c for *_, todo in work for c in todo})
    with_label = {c: (files[c], withheld(c)) for c in to_check if withheld(c) is not None}
    check_labeled_cases(with_label, dataset_json, num_processes, what="unlabeled (withheld label)")
    verify_files([f for c in to_check if c not in with_label for f in files[c]], num_processes)

    outputs = {}
    partial_name = part.partial_dir_name()
    for configuration, out, signature, digest, rebuild, stale, todo in work:
        if rebuild:
            print(f"note: {out} was made with other preprocessing parameters (new plans, or a new fingerprint "
                  f"after the labeled cases changed); rebuilding it")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(_withheld_folder_of(out), ignore_errors=True)
        if stale:
            print(f"note: removing {len(stale)} case(s) from {out} that {SPLIT_FILE_NAME} no longer lists as "
                  f"unlabeled: {stale[:10]}")
            for case in stale:
                _remove_case(out, case)
        out.mkdir(parents=True, exist_ok=True)
        if _read_signature(out) != signature:
            atomic_write_json(out / SOURCE_FILE, signature)
        jobs = [(c, files[c], withheld(c), str(out), plans, configuration, dataset_json, digest, partial_name)
                for c in todo]
        desc = f"Unlabeled {configuration}{part.describe()} ({len(cases) - len(todo)}/{len(cases)} already done)"
        with tqdm(total=len(jobs), desc=desc, disable=not show_progress_bar) as bar:
            if num_processes <= 1:
                for job in jobs:
                    _preprocess_one(job)
                    bar.update()
            else:
                with multiprocessing.get_context("spawn").Pool(num_processes, maxtasksperchild=50) as pool:
                    for _ in pool.imap_unordered(_preprocess_one, jobs, chunksize=1):
                        bar.update()
        shutil.rmtree(out / partial_name, ignore_errors=True)
        if part.is_whole:  # run after the parts: what a killed part left behind
            for leftover in out.glob(f"{partial_name}-part*"):
                shutil.rmtree(leftover, ignore_errors=True)
        outputs[configuration] = out
    return outputs


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Preprocess imagesUnlabeled of a planned dataset with its nnU-Net plans (resumable).")
    parser.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    parser.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=4, help="worker processes (default: 4)")
    add_part_arguments(parser)
    args = parser.parse_args(argv)
    part = Part(args.num_parts, args.part_id)
    for d in args.d:
        for cfg, folder in preprocess_unlabeled(d, args.c, args.plans_name, args.np, part=part).items():
            print(f"{d} {cfg}: unlabeled cases{part.describe()} in {folder}")
    if not part.is_whole:
        print(f"when every part has finished, run {PROG} without -num_parts: it checks that every case is done "
              f"and removes cases no longer listed as unlabeled")


if __name__ == "__main__":
    main()
