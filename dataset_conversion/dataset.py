"""The whole dataset: check the output folder, then convert a catalogue into it atomically.

:func:`check_output_dir` runs before anything is touched (and before the download is even listed): the output
folder must not be, contain or lie inside the raw input, and ``--overwrite`` only replaces a dataset folder nnssl
wrote (:data:`NNSSL_DATASET_MARKERS`: dataset.json + ssl_split.json). :func:`convert_dataset` assigns the roles,
writes every case in parallel into a temporary folder (:func:`nnssl.io.atomic_output_dir`), writes dataset.json
and ssl_split.json, validates them with :func:`nnssl.split.validate_split_against_raw` and only then moves the
folder into place, so a failed conversion never leaves a half-written dataset. :func:`convert_download` is the
body of every ``convert_<dataset>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from nnssl.io import atomic_output_dir
from nnssl.split import SSLSplit, save_split, validate_split_against_raw

from .errors import ConversionError
from .options import ConversionOptions
from .roles import Catalogue, DatasetRules, assign_roles
from .writing import output_paths, run_parallel, write_case, write_dataset_json

# A folder with both files is a dataset nnssl wrote; --overwrite replaces nothing else.
NNSSL_DATASET_MARKERS = ("dataset.json", "ssl_split.json")


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, raw_dir: str | os.PathLike | None = None,
                     ) -> Path:
    """Fail before any work (and before anything is touched) when the output folder

    - is, contains or lies inside the raw input ``raw_dir`` (symlinks resolved): ``--overwrite`` would delete the
      download, and an output inside it would be read as raw data next time;
    - exists and ``overwrite`` is not set, or exists and is not a dataset nnssl wrote (``NNSSL_DATASET_MARKERS``):
      ``--overwrite`` never replaces an arbitrary folder of the user;
    - cannot be created (a parent that is a file, a read-only location).
    """
    output_dir = Path(output_dir)
    if raw_dir is not None:
        check_output_outside_raw(output_dir, raw_dir)
    if output_dir.exists() or output_dir.is_symlink():
        if not overwrite:
            raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
        check_replaceable(output_dir)
    else:
        check_creatable(output_dir)
    return output_dir


def check_output_outside_raw(output_dir: Path, raw_dir: str | os.PathLike) -> None:
    out, raw = output_dir.resolve(), Path(raw_dir).resolve()
    if out == raw:
        relation = "is the raw input folder"
    elif raw in out.parents:
        relation = f"lies inside the raw input folder {raw_dir}"
    elif out in raw.parents:
        relation = f"contains the raw input folder {raw_dir}"
    else:
        return
    raise ConversionError(f"output folder {output_dir} {relation}; choose an output folder outside the raw data "
                          "(e.g. -d ID, which writes to $nnUNet_raw)")


def check_replaceable(output_dir: Path) -> None:
    """``--overwrite`` replaces only a dataset folder that nnssl wrote (it has dataset.json and ssl_split.json)."""
    missing = [m for m in NNSSL_DATASET_MARKERS if not (output_dir / m).is_file()]
    if missing:
        raise ConversionError(f"{output_dir} exists and is not a dataset written by nnssl (no "
                              f"{' + '.join(missing)}); --overwrite only replaces such a folder: remove it yourself "
                              "or choose another output folder")


def check_creatable(output_dir: Path) -> None:
    """The nearest existing parent of ``output_dir`` is a writable folder (checked without writing anything)."""
    parent = output_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"cannot create the output folder {output_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot create the output folder {output_dir}: {parent} is not writable "
                              "(read-only folder or file system?)")


def convert_dataset(catalogue: Catalogue, rules: DatasetRules, output_dir: str | os.PathLike,
                    options: ConversionOptions, raw_dir: str | os.PathLike | None = None) -> SSLSplit:
    """Assign roles, write all cases in parallel into a temporary folder, write dataset.json and ssl_split.json,
    validate, then move the folder to ``output_dir``. Returns the written split. Temporary folders of
    ``output_dir`` left by a killed conversion are removed first (only those: ``.NAME.partial.*``)."""
    output_dir = check_output_dir(output_dir, options.overwrite, raw_dir)
    assignment = assign_roles(catalogue, rules, options.split)
    cases = catalogue.all_cases()
    fmt = rules.fmt
    try:
        with atomic_output_dir(output_dir, overwrite=options.overwrite, replace_only_with=NNSSL_DATASET_MARKERS,
                               clean_stale=True) as tmp:
            tasks = [output_paths(cases[i], tmp, role, fmt, with_label=True)
                     for role in ("labeled", "unlabeled", "test", "val") for i in getattr(assignment, role)]
            run_parallel(write_case, tasks, options.num_processes, f"{fmt.name}", options.progress)
            write_dataset_json(tmp, fmt, len(assignment.labeled))
            extra: dict = {"dataset": fmt.name}
            if assignment.val:
                extra["val"] = assignment.val
            if assignment.not_converted:
                extra["not_converted"] = assignment.not_converted
            if rules.group_of is not None:
                extra["labeled_" + rules.unit] = sorted({rules.group_of(i) for i in assignment.labeled})
            split = SSLSplit(labeled=assignment.labeled, unlabeled=assignment.unlabeled, test=assignment.test,
                             labeled_fraction=assignment.labeled_fraction, seed=assignment.seed,
                             origin=assignment.origin, extra=extra)
            save_split(split, tmp / "ssl_split.json")
            validate_split_against_raw(split, tmp, strict=True)
    except FileExistsError as e:
        raise ConversionError(str(e)) from e
    return split


def convert_download(raw_dir: str | os.PathLike, output_dir: str | os.PathLike, options: ConversionOptions | None,
                     rules: DatasetRules, build_catalogue: Callable[[], Catalogue]) -> SSLSplit:
    """The body of every ``convert_<dataset>``: check the output folder before the download is even listed (a
    wrong ``-o`` fails in a second, not after minutes of reading), list it with ``build_catalogue``, convert."""
    options = options or ConversionOptions()
    check_output_dir(output_dir, options.overwrite, raw_dir)
    return convert_dataset(build_catalogue(), rules, output_dir, options, raw_dir)
