"""``nnssl_plan_and_preprocess``: nnU-Net's fingerprint, planning and preprocessing, then the unlabeled cases.

nnU-Net's own steps see ``imagesTr`` only, which by the raw-format contract holds the labeled cases only, so
neither the fingerprint (intensity statistics, spacings) nor the plans can leak anything of unlabeled or test
cases. The split file is validated first, so a case listed as unlabeled that also sits in imagesTr is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from nnssl.preprocessing.unlabeled import preprocess_unlabeled
from nnssl.split import SPLIT_FILE_NAME, load_and_validate


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
    if split_file.is_file():
        split = load_and_validate(raw_dir)
        print(f"{split_file}: {len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, "
              f"{len(split.test)} test (origin: {split.origin})")
    else:
        print(f"note: {split_file} not found; every case in imagesUnlabeled is used as unlabeled")

    extract_fingerprints([dataset_id], num_processes=num_processes,
                         check_dataset_integrity=verify_dataset_integrity, clean=False, verbose=False)
    plans_identifier = plan_experiments([dataset_id], planner, gpu_memory_target_in_gb=gpu_memory_target,
                                        overwrite_plans_name=plans_name)
    plans_identifier = plans_identifier or plans_name or "nnUNetPlans"
    pp_dir = Path(nnUNet_preprocessed.require()) / dataset_name
    planned = json.loads((pp_dir / f"{plans_identifier}.json").read_text())["configurations"]
    skipped = [c for c in configurations if c not in planned]
    if skipped:  # e.g. 3d_fullres for a 2D PNG dataset: nnU-Net plans only '2d' there
        print(f"note: nnU-Net planned no {skipped} for {dataset_name}; preprocessing {sorted(planned)} only")
    configurations = [c for c in configurations if c in planned]
    preprocess([dataset_id], plans_identifier, configurations=configurations,
               num_processes=[num_processes] * len(configurations), verbose=False)
    if split_file.is_file():
        shutil.copyfile(split_file, pp_dir / SPLIT_FILE_NAME)  # trainers read roles without needing nnUNet_raw
    preprocess_unlabeled(dataset_id, configurations, plans_identifier, num_processes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="nnU-Net fingerprint + planning + preprocessing of the labeled cases, then preprocessing of "
                    "imagesUnlabeled with the same plans (for the nnssl trainers).")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    parser.add_argument("-c", nargs="+", default=["2d", "3d_fullres"],
                        help="configurations to preprocess (default: 2d 3d_fullres)")
    parser.add_argument("-np", type=int, default=4, help="worker processes (default: 4)")
    parser.add_argument("-pl", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    parser.add_argument("-gpu_memory_target", type=float, default=None)
    parser.add_argument("-overwrite_plans_name", default=None)
    parser.add_argument("--verify_dataset_integrity", action="store_true")
    args = parser.parse_args(argv)
    for d in args.d:
        plan_and_preprocess(d, args.c, args.np, args.verify_dataset_integrity, args.pl, args.gpu_memory_target,
                            args.overwrite_plans_name)


if __name__ == "__main__":
    main()
