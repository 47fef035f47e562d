"""``nnssl_convert DATASET RAW_DIR -d ID [options]``: public datasets -> nnU-Net raw format + ssl_split.json.

One sub-command per dataset (``nnssl_convert acdc --help`` lists its options); the work is done by each dataset's
Python API (``dataset_conversion.<dataset>.convert_<dataset>``), this module only parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnssl.errors import report_user_errors
from nnssl.split import SplitError

from . import acdc, amos, busi, flare22, la, pancreas, synapse
from .command import DatasetCommand
from .dataset import check_output_dir
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions

DATASETS: dict[str, DatasetCommand] = {m.COMMAND.name: m.COMMAND for m in (flare22, amos, acdc, la, busi, synapse,
                                                                            pancreas)}
PROG = "nnssl_convert"


def _default_processes() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _add_common_arguments(parser: argparse.ArgumentParser, command: DatasetCommand) -> None:
    parser.add_argument("raw_dir", metavar="RAW_DIR", type=Path, help="the downloaded (extracted or zipped) dataset")
    out = parser.add_argument_group("output")
    out.add_argument("-d", "--dataset-id", type=int, metavar="ID",
                     help="nnU-Net dataset id: writes $nnUNet_raw/DatasetID_NAME")
    out.add_argument("--name", default=command.default_dataset_name,
                     help=f"dataset name in the folder name (default {command.default_dataset_name})")
    out.add_argument("-o", "--output", type=Path, metavar="FOLDER", help="write to this folder instead")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument("-np", "--num-processes", type=int, default=_default_processes(), metavar="N",
                     help="parallel worker processes (default %(default)s)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    split = parser.add_argument_group("split")
    amount = split.add_mutually_exclusive_group()
    amount.add_argument("--labeled-fraction", type=float, metavar="F",
                        help="fraction of the training pool that keeps its labels (default: all)")
    amount.add_argument("--labeled-count", type=int, metavar="N", help="number of labeled training cases"
                        + (" (ACDC: patients)" if command.name == "acdc" else ""))
    split.add_argument("--seed", type=int, default=0, help="seed of the labeled choice (default 0)")
    split.add_argument("--split", choices=("random", "paper"), default="random",
                       help="random (seeded) or a paper's published lists (default random)")
    if command.papers:
        split.add_argument("--paper", choices=command.papers, default=None,
                           help=f"which published split with --split paper (default {command.papers[0]})")
    split.add_argument("--split-file", type=Path, metavar="PATH",
                       help="your own split: a JSON file with labeled/unlabeled/test[/val] lists, or a text file "
                            "listing the labeled ids")
    split.add_argument("--splits-dir", type=Path, metavar="DIR",
                       help="folder of published split lists (default: $NNSSL_SPLITS_DIR, else the lists that ship "
                            "with nnssl)")
    split.add_argument("--test-fraction", type=float, metavar="T",
                       help="random mode: share of the labeled pool held out as test set (default: the dataset's "
                            "own test set if it has one, else the papers' share)")
    split.add_argument("--test-seed", type=int, default=0, help="seed of the test hold-out (default 0)")
    split.add_argument("--unlabeled-count", type=int, metavar="N",
                       help="keep a seeded subset of N real unlabeled images (FLARE22, AMOS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a public dataset into nnU-Net's raw format plus ssl_split.json (labeled in "
                    "imagesTr/labelsTr, unlabeled in imagesUnlabeled, withheld labels in labelsUnlabeled, test in "
                    "imagesTs/labelsTs).",
        epilog=f"Run '{PROG} DATASET --help' for a dataset's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, cmd in DATASETS.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common_arguments(p, cmd)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
    return parser


def resolve_output_dir(dataset_id: int | None, name: str, output: Path | None) -> Path:
    """``output`` if given, else ``$nnUNet_raw/DatasetXXX_NAME``; refuses an id already used by another name."""
    if output is not None:
        return output
    if dataset_id is None:
        raise ConversionError("-d/--dataset-id ID is required (or give -o FOLDER)")
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"-d/--dataset-id must be in 1..999, got {dataset_id}")
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ConversionError("$nnUNet_raw is not set: export it or give -o FOLDER")
    if Path(raw).exists() and not Path(raw).is_dir():
        raise ConversionError(f"$nnUNet_raw={raw} is not a folder")
    folder = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    if Path(raw).is_dir():
        clash = sorted(p.name for p in Path(raw).iterdir()
                       if p.is_dir() and p.name.startswith(f"Dataset{dataset_id:03d}_") and p.name != folder.name)
        if clash:
            raise ConversionError(f"dataset id {dataset_id} is already used by {Path(raw) / clash[0]}; choose another")
    return folder


def options_from_args(args: argparse.Namespace) -> ConversionOptions:
    if args.split == "paper" and args.split_file is not None:
        raise ConversionError("--split paper and --split-file exclude each other")
    if args.num_processes < 1:
        raise ConversionError(f"-np must be >= 1, got {args.num_processes}")
    split = SplitOptions(
        split="file" if args.split_file is not None else args.split,
        labeled_count=args.labeled_count,
        labeled_fraction=args.labeled_fraction,
        seed=args.seed,
        test_fraction=args.test_fraction,
        test_seed=args.test_seed,
        unlabeled_count=args.unlabeled_count,
        split_file=args.split_file,
        splits_dir=args.splits_dir,
        paper=getattr(args, "paper", None),
    )
    return ConversionOptions(split=split, overwrite=args.overwrite, num_processes=args.num_processes,
                             progress=not args.no_progress)


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    """Other errors a user can cause (a read-only output location) are one-line errors too, via
    ``report_user_errors``; bugs keep their traceback."""
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        output_dir = resolve_output_dir(args.dataset_id, args.name, args.output)
        # before the raw data is even listed: never write into (or --overwrite) the raw input
        check_output_dir(output_dir, options.overwrite, args.raw_dir)
        split = DATASETS[args.dataset].run(args, output_dir, options)
    except (ConversionError, SplitError) as e:
        print(f"{PROG} {args.dataset}: error: {e}", file=sys.stderr)
        return 1
    val = split.extra.get("val", [])
    print(f"wrote {output_dir}: {len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled, "
          f"{len(split.test)} test" + (f", {len(val)} val" if val else "") + f" cases ({split.origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
