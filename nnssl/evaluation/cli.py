"""``nnssl_evaluate PRED_DIR GT_DIR -d ID``: Dice, NSD, HD95 and ASD per case and class.

Writes ``summary.json`` and ``per_case.csv`` into ``-o`` (default: a new ``PRED_DIR/nnssl_evaluation/`` folder,
so nnU-Net's own ``summary.json`` of a validation folder is never replaced) and prints a per-class table. Existing
results are only replaced with ``--overwrite``; an output folder inside a raw dataset (swapped arguments: the
labels folder given as PRED_DIR) is refused. Metric definitions and the empty-mask convention:
:mod:`nnssl.evaluation.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnssl.errors import InputError, NnsslError, OutputExistsError, report_user_errors
from nnssl.evaluation.evaluate import (
    PER_CASE_FILE_NAME,
    SUMMARY_FILE_NAME,
    evaluate_folders,
    format_summary_table,
    write_outputs,
)

DEFAULT_OUTPUT_SUBFOLDER = "nnssl_evaluation"


def dataset_json_path(dataset_name_or_id: str) -> Path:
    """``$nnUNet_raw/DatasetXXX_Name/dataset.json`` for a dataset id or name."""
    if not nnUNet_raw.is_set():
        raise ValueError("-d needs the nnUNet_raw environment variable; set it or pass --dataset-json PATH")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"-d {dataset_name_or_id}: {error}") from error
    path = Path(nnUNet_raw.get()) / dataset_name / "dataset.json"
    if not path.is_file():
        raise ValueError(f"-d {dataset_name_or_id}: {path} does not exist")
    return path


def raw_dataset_containing(folder: Path) -> Path | None:
    """The raw nnU-Net dataset folder (one with ``dataset.json`` and ``imagesTr``) that ``folder`` lies in, if any."""
    folder = folder.resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / "dataset.json").is_file() and (candidate / "imagesTr").is_dir():
            return candidate
    return None


def output_folder(pred_dir: Path, output_dir: Path | None, overwrite: bool) -> Path:
    """Where the results go; refuses a raw dataset folder and existing results without ``overwrite``."""
    out = output_dir if output_dir is not None else pred_dir / DEFAULT_OUTPUT_SUBFOLDER
    raw = raw_dataset_containing(out)
    if raw is not None:
        hint = ("PRED_DIR is inside a raw dataset: are PRED_DIR and GT_DIR swapped?" if output_dir is None
                else "choose a folder outside the raw data")
        raise InputError(f"{out}: refusing to write evaluation results into the raw dataset {raw} ({hint})")
    existing = [out / name for name in (SUMMARY_FILE_NAME, PER_CASE_FILE_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite to replace it or -o to write "
                                "elsewhere")
    return out


def load_dataset_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read dataset.json {path}: {error}") from error
    for key in ("labels", "file_ending"):
        if key not in content:
            raise ValueError(f"dataset.json {path} has no {key!r} entry")
    return content


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnssl_evaluate",
        description="Evaluate predicted segmentations against references: Dice, NSD (surface Dice at a tolerance "
        "in mm), HD95 and ASD per case and class. Files are paired by name; spacing is read from the files.",
    )
    parser.add_argument("pred_dir", type=Path, help="folder with the predicted label maps (CASE<file_ending>)")
    parser.add_argument("gt_dir", type=Path, help="folder with the reference label maps, e.g. labelsTs")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", dest="dataset", help="dataset name or id; reads $nnUNet_raw/DatasetXXX_*/dataset.json")
    source.add_argument("--dataset-json", type=Path, help="path to the dataset.json with labels and file_ending")
    parser.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default: 1)")
    parser.add_argument("-np", dest="num_processes", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument(
        "-o", dest="output_dir", type=Path,
        help=f"where to write summary.json and per_case.csv (default: PRED_DIR/{DEFAULT_OUTPUT_SUBFOLDER})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing summary.json / per_case.csv")
    parser.add_argument(
        "--only-predicted",
        action="store_true",
        help="evaluate only the references that have a prediction (e.g. one fold's validation)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


@report_user_errors("nnssl_evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = output_folder(args.pred_dir, args.output_dir, args.overwrite)  # before the work, not after
        json_path = args.dataset_json if args.dataset_json is not None else dataset_json_path(args.dataset)
        dataset_json = load_dataset_json(json_path)
        reader_writer = None
        if dataset_json.get("overwrite_image_reader_writer", "None") != "None":
            reader_writer = recursive_find_reader_writer_by_name(dataset_json["overwrite_image_reader_writer"])
        summary = evaluate_folders(
            args.pred_dir,
            args.gt_dir,
            dataset_json["labels"],
            tolerance_mm=args.tolerance,
            num_processes=args.num_processes,
            file_ending=dataset_json["file_ending"],
            reader_writer=reader_writer,
            only_predicted=args.only_predicted,
            progress=not args.no_progress,
        )
        summary_path, csv_path = write_outputs(summary, out)
    except (NnsslError, ValueError, FileNotFoundError) as error:
        print(f"nnssl_evaluate: error: {error}", file=sys.stderr)
        return 1
    print(format_summary_table(summary))
    if summary["references_without_prediction"]:
        print(f"{len(summary['references_without_prediction'])} reference(s) without prediction were skipped")
    print(f"wrote {summary_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
