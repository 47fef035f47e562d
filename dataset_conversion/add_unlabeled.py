"""``nnssl_add_unlabeled DATASET FOLDER``: add extra unlabeled images (e.g. MGCC's diffusion-generated BUSI images)
to a converted dataset's ``imagesUnlabeled`` and list them as ``unlabeled`` in ``ssl_split.json``.

FOLDER holds one file per image with the dataset's file ending: ``NAME_0000<ending>`` (``_0001`` ... for further
channels) or, for single-channel datasets, plain ``NAME<ending>``. Case ids are ``PREFIX + NAME`` with characters
other than letters, digits, ``-`` and ``_`` replaced by ``_``.

File names and case ids, decided: a trailing ``_NNNN`` is always nnU-Net's channel suffix, also in a single-channel
dataset, so ``syn_0000.nii.gz`` is channel 0 of case ``syn`` (exactly what nnU-Net itself would read from
``imagesTr``), and ``scan_2019.nii.gz`` is refused as channel 2019 (rename it, e.g. ``scan-2019.nii.gz``). Nothing
happens silently: every added file is printed with its case id (``syn_0000.nii.gz -> case syn (channel 0000)``),
two files that give the same case and channel (``syn.nii.gz`` and ``syn_0000.nii.gz``, or ``a b.png`` and
``a_b.png``) are an error naming both, and so is a case id that is not a safe file name
(:func:`nnssl.split.check_case_id`), e.g. from ``--prefix ../``. Hidden files are errors naming them, except the
operating systems' own junk (``.DS_Store``, ``._*``, ``Thumbs.db``, ``desktop.ini``), which is ignored with a printed
note; subfolders are not searched, also with a note.

Checks, all before anything in the dataset changes: every file has the dataset's file ending and every case all its
channels; every file decodes completely (:func:`nnssl.verify.verify_image_file`: a truncated ``.nii.gz`` or PNG is
an error naming it, not an image with zeros); images have the dataset's dimension (2D for PNG datasets, 3D
otherwise), finite positive spacing and no NaN; 3D spacing is within a factor of ``MAX_SPACING_RATIO`` of the
labeled cases' median (catches m-vs-mm mistakes); no new id clashes with a case already in the dataset (any role or
image folder). For 2D PNG datasets RGB(A) images are converted to grayscale with the same luma weights as the BUSI
converter, since the dataset has one channel.

The new files are written to a staging folder inside the dataset, moved into ``imagesUnlabeled`` only after all
were written, and ``ssl_split.json`` is then replaced atomically, so a failure leaves the dataset unchanged.
:func:`add_cases` is this second half on its own (checks and write of given ``{case id: files}``), which
``nnssl_generate_unlabeled`` uses for the images it generates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from nnssl.errors import report_user_errors
from nnssl.split import SplitError, SSLSplit, case_id_problem, cases_in_folder, check_case_id, load_split, save_split

from .cases import Case, DatasetFormat
from .errors import ConversionError
from .raw_files import FileRef
from .readers import PngGray, SitkFile
from .writing import ROLE_FOLDERS, output_paths, run_parallel, write_case

PROG = "nnssl_add_unlabeled"
NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif")
# files the operating systems leave in folders (Finder metadata, AppleDouble forks, Windows thumbnails/settings)
OS_JUNK = re.compile(r"\.DS_Store|\._.+|Thumbs\.db|desktop\.ini", flags=re.IGNORECASE)
MAX_SPACING_RATIO = 10.0


def find_raw_dataset(dataset: str) -> Path:
    """A dataset folder from a path, a dataset id (``27``) or a folder name under ``$nnUNet_raw``."""
    if Path(dataset).is_dir():
        return Path(dataset)
    raw = os.environ.get("nnUNet_raw")
    if not raw or not Path(raw).is_dir():
        raise ConversionError(f"dataset '{dataset}' is not a folder and $nnUNet_raw is not set to a folder")
    if dataset.isdigit():
        start = f"Dataset{int(dataset):03d}_"
        matches = sorted(p for p in Path(raw).iterdir() if p.is_dir() and p.name.startswith(start))
    else:
        matches = [Path(raw) / dataset] if (Path(raw) / dataset).is_dir() else []
    if len(matches) != 1:
        found = f"found {[m.name for m in matches]}" if matches else "not found"
        raise ConversionError(f"dataset '{dataset}' in $nnUNet_raw={raw}: {found}")
    return matches[0]


def _dataset_format(dataset_dir: Path) -> DatasetFormat:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise ConversionError(f"{path}: dataset.json not found")
    try:
        dj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e
    missing = [k for k in ("channel_names", "labels") if not isinstance(dj, dict) or k not in dj]
    if missing:
        raise ConversionError(f"{path}: no {' / '.join(missing)}; is this an nnU-Net dataset.json?")
    ending = dj.get("file_ending", ".nii.gz")
    return DatasetFormat(name=dj.get("name", dataset_dir.name), channel_names=dj["channel_names"],
                         labels=dj["labels"], file_ending=ending, ndim=2 if ending in NATURAL_IMAGE_ENDINGS else 3)


def check_prefix(prefix: str) -> str:
    """``--prefix`` becomes the start of file names: the same safe characters as case ids (no '/', no leading '.')."""
    if prefix:
        problem = case_id_problem(prefix)
        if problem is not None:
            raise ConversionError(f"--prefix {prefix!r}: not allowed as the start of case ids: {problem}")
    return prefix


def list_folder(folder: Path, log: Callable[[str], None] = print) -> list[Path]:
    """The files to add; OS junk files and subfolders are skipped with a printed note, other hidden files are
    errors (a hidden ``.x_0000.nii.gz`` is most likely meant to be added, or not at all)."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: folder not found")
    files = []
    for p in sorted(folder.iterdir()):
        if OS_JUNK.fullmatch(p.name):
            log(f"ignored: {p} (operating system file)")
        elif p.name.startswith("."):
            raise ConversionError(f"{p}: hidden file or folder in the folder to add; rename it (no leading '.') "
                                  "or move it out of the folder")
        elif p.is_dir():
            log(f"ignored: {p}/ (subfolders are not searched)")
        else:
            files.append(p)
    if not files:
        raise ConversionError(f"{folder}: no files")
    return files


def _channel_of(f: Path, stem: str, fmt: DatasetFormat) -> tuple[str, int | None]:
    """``(name, channel)`` of a file stem: ``NAME_NNNN`` is nnU-Net's channel naming, else channel None."""
    n_channels = len(fmt.channel_names)
    m = re.fullmatch(r"(.+)_(\d{4})", stem)
    if m is None:
        if n_channels > 1:
            raise ConversionError(f"{f}: the dataset has {n_channels} channels; name files NAME_0000{fmt.file_ending}"
                                  f" ... NAME_{n_channels - 1:04d}{fmt.file_ending}")
        return stem, None
    channel = int(m.group(2))
    if channel >= n_channels:
        raise ConversionError(
            f"{f}: the name ends in '_{m.group(2)}', nnU-Net's suffix for channel {channel}, but the dataset has "
            f"{n_channels} channel(s) (dataset.json channel_names); name the files "
            + (f"NAME{fmt.file_ending} or NAME_0000{fmt.file_ending}" if n_channels == 1 else
               f"NAME_0000{fmt.file_ending} ... NAME_{n_channels - 1:04d}{fmt.file_ending}"))
    return m.group(1), channel


def collect_cases(folder: Path, fmt: DatasetFormat, prefix: str,
                  log: Callable[[str], None] = print) -> dict[str, list[Path]]:
    """``{case id: channel files}`` of the folder; any file that does not fit is an error naming it. Every file is
    logged with the case id it becomes (see the module docstring: nnU-Net's ``_NNNN`` channel suffix)."""
    n_channels = len(fmt.channel_names)
    cases: dict[str, dict[int, Path]] = {}
    mapping = []
    for f in list_folder(folder, log):
        if not f.name.endswith(fmt.file_ending):
            raise ConversionError(f"{f}: file ending does not match the dataset's '{fmt.file_ending}'")
        name, channel = _channel_of(f, f.name[: -len(fmt.file_ending)], fmt)
        case_id = check_case_id(prefix + re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_"), str(f))
        if (channel or 0) in cases.setdefault(case_id, {}):
            other = cases[case_id][channel or 0]
            raise ConversionError(f"{f} and {other} both give case '{case_id}' channel {channel or 0} "
                                  f"(a '_{channel or 0:04d}' suffix is nnU-Net's channel naming); rename one")
        cases[case_id][channel or 0] = f
        mapping.append(f"{f.name} -> case {case_id}" + (f" (channel {channel:04d})" if channel is not None else ""))
    for case_id, channels in cases.items():
        missing = sorted(set(range(n_channels)) - set(channels))
        if missing:
            raise ConversionError(f"case '{case_id}' in {folder} lacks channel(s) {missing}")
    for line in mapping:
        log(line)
    return {k: [v[c] for c in range(n_channels)] for k, v in sorted(cases.items())}


def _existing_ids(dataset_dir: Path, fmt: DatasetFormat, split_roles: dict[str, list[str]]) -> set[str]:
    ids = {i for ids in split_roles.values() for i in ids}
    for img_dir, _ in ROLE_FOLDERS.values():
        ids |= cases_in_folder(dataset_dir / img_dir, fmt.file_ending)
    return ids


def _median_spacing(dataset_dir: Path, fmt: DatasetFormat) -> np.ndarray | None:
    reader = sitk.ImageFileReader()
    spacings = []
    for f in sorted((dataset_dir / "imagesTr").glob(f"*_0000{fmt.file_ending}"))[:20]:
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        spacings.append(reader.GetSpacing())
    return np.median(np.array(spacings), axis=0) if spacings else None


def _check_spacing(path: Path, reference: np.ndarray | None) -> None:
    if reference is None:
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"{path}: unreadable or corrupt image file ({str(e).strip().splitlines()[-1]})") from e
    spacing = np.array(reader.GetSpacing())
    if spacing.shape != reference.shape:
        raise ConversionError(f"{path}: image is {len(spacing)}D but the dataset's images are {len(reference)}D")
    ratio = spacing / reference
    if np.any(ratio > MAX_SPACING_RATIO) or np.any(ratio < 1 / MAX_SPACING_RATIO):
        raise ConversionError(f"{path}: spacing {tuple(spacing)} is far from the labeled cases' median "
                              f"{tuple(reference)} (more than {MAX_SPACING_RATIO:g}x); wrong units?")


def add_unlabeled(dataset_dir: str | os.PathLike, folder: str | os.PathLike, prefix: str = "",
                  num_processes: int = 1, progress: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Add the images of ``folder`` to ``dataset_dir`` as unlabeled cases; returns the new case ids. ``log`` gets
    one line per added file (``file -> case id``) and per ignored file."""
    dataset_dir, folder = Path(dataset_dir), Path(folder)
    check_prefix(prefix)
    fmt = _dataset_format(dataset_dir)
    load_split(dataset_dir / "ssl_split.json")  # a broken split file is reported before the folder is read
    new = collect_cases(folder, fmt, prefix, log)
    return add_cases(dataset_dir, new, str(folder), num_processes=num_processes, progress=progress)


def add_cases(dataset_dir: str | os.PathLike, new: dict[str, list[Path]], source: str,
              provenance: dict[str, dict] | None = None, num_processes: int = 1, progress: bool = True) -> list[str]:
    """Add ``{case id: channel files}`` to ``dataset_dir`` as unlabeled cases (the checks and the atomic write of
    the module docstring); shared by ``nnssl_add_unlabeled`` and ``nnssl_generate_unlabeled``.

    ``source`` is counted under ``added_unlabeled`` in ssl_split.json; ``provenance`` (``{case id: {...}}``, e.g.
    ``{"source": "generated", "model": ..., "seed": ...}``) is recorded under its ``provenance`` key."""
    dataset_dir = Path(dataset_dir)
    fmt = _dataset_format(dataset_dir)
    split = load_split(dataset_dir / "ssl_split.json")
    roles = {"labeled": split.labeled, "unlabeled": split.unlabeled, "test": split.test,
             "val": list(split.extra.get("val", []))}
    for case_id, paths in new.items():
        check_case_id(case_id, str(paths[0]))
    clash = sorted(set(new) & _existing_ids(dataset_dir, fmt, roles))
    if clash:
        raise ConversionError(f"{new[clash[0]][0]}: case id '{clash[0]}' already exists in {dataset_dir} "
                              f"({len(clash)} clash(es)); use --prefix")
    reference = _median_spacing(dataset_dir, fmt) if fmt.ndim == 3 else None
    for paths in new.values():
        for p in paths:
            _check_spacing(p, reference)
    reader = PngGray if fmt.ndim == 2 and fmt.file_ending == ".png" else SitkFile
    staging = Path(tempfile.mkdtemp(prefix=".adding_unlabeled.", dir=dataset_dir))
    try:
        tasks = [output_paths(Case(k, tuple(reader(FileRef(p)) for p in paths)), staging, "unlabeled", fmt, False)
                 for k, paths in new.items()]
        run_parallel(write_case, tasks, num_processes, f"adding to {dataset_dir.name}", progress)
        target = dataset_dir / ROLE_FOLDERS["unlabeled"][0]
        target.mkdir(exist_ok=True)
        staged = sorted((staging / ROLE_FOLDERS["unlabeled"][0]).iterdir())
        for f in staged:
            if (target / f.name).exists():
                raise ConversionError(f"{target / f.name} already exists")
        for f in staged:
            os.replace(f, target / f.name)
        # labeled_fraction keeps describing the original pool (e.g. MGCC's 50 % of the real images)
        added = dict(split.extra.get("added_unlabeled", {}))
        added[source] = added.get(source, 0) + len(new)
        extra = {**split.extra, "added_unlabeled": added}
        if provenance:
            extra["provenance"] = {**split.extra.get("provenance", {}), **provenance}
        save_split(SSLSplit(labeled=split.labeled, unlabeled=list(split.unlabeled) + list(new), test=split.test,
                            labeled_fraction=split.labeled_fraction, seed=split.seed, origin=split.origin,
                            extra=extra), dataset_dir / "ssl_split.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return list(new)


@report_user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", metavar="DATASET_ID", help="dataset id, DatasetXXX_Name, or the folder itself")
    parser.add_argument("folder", metavar="FOLDER", type=Path, help="folder of images to add")
    parser.add_argument("--prefix", default="", help="prefix of the new case ids (e.g. gen_)")
    parser.add_argument("-np", "--num-processes", type=int, default=1, metavar="N", help="worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        dataset_dir = find_raw_dataset(args.dataset)
        added = add_unlabeled(dataset_dir, args.folder, args.prefix, args.num_processes, not args.no_progress)
    except (ConversionError, SplitError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"added {len(added)} unlabeled case(s) to {dataset_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
