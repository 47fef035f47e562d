"""LA (2018 Atrial Segmentation Challenge, LGE-MRI, left atrium) -> nnU-Net raw format.

Two raw layouts are accepted (docs/datasets.md), both with one folder per case named by its 20-character id:

- the challenge download: ``Training Set/<ID>/lgemri.nrrd`` + ``laendo.nrrd`` (label 255 -> 1; the folder may also
  be spelled ``2018LA_Seg_Training Set``, ``2018LA_Seg_TrainingSet``, ...; extra files such as ``desktop.ini`` or
  ``lawall.nrrd`` are ignored). Geometry comes from the NRRD headers.
- the preprocessed UA-MT/SSL4MIS/SDCL layout: ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with ``image``
  (z-scored, cropped) and ``label`` (0/1), both in pynrrd (x, y, z) order. The h5 files store no geometry: they are
  written with the challenge's 0.625 mm isotropic spacing (``H5_SPACING_MM``) and zero origin.

Cases under a ``Testing Set`` folder with labels become the test set; without labels they are skipped. Random mode
otherwise holds out 20 % (the papers' 80/20). ``--split paper`` uses the UA-MT list (first 16 of 80 labeled;
``--paper bcp``/``sdcl``: same 80/20 lists, first 8 labeled by default); ``--labeled-count 8`` gives the 10 %
setting.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit, first_n_labeled, read_published_list
from .raw_files import FileRef, walk_raw_tree
from .readers import SitkFile
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "LA 2018 atrial segmentation LGE-MRI: nrrd (label 255 -> 1) or preprocessed mri_norm2.h5"
LABELS = {"background": 0, "left atrium": 1}
FORMAT = DatasetFormat(name="LA", channel_names={"0": "LGE-MRI"}, labels=LABELS, label_remap={255: 1},
                       description="2018 Atrial Segmentation Challenge, LGE-MRI, left atrium cavity",
                       reference="http://atriaseg2018.cardiacatlas.org/")
H5_SPACING_MM = (0.625, 0.625, 0.625)
# paper -> (folder, train list, test list, default number of labeled cases)
PAPERS = {
    "uamt": ("UA-MT/la", "train.list", "test.list", 16),
    "bcp": ("BCP/la", "train.list", "test.list", 8),
    "sdcl": ("SDCL/la", "train.txt", "test.txt", 8),
}
SOURCES = ("auto", "nrrd", "h5")


@dataclass(frozen=True)
class H5Volume:
    """One array of a preprocessed ``mri_norm2.h5`` file, (x, y, z) on disk, returned as an image with
    ``spacing``."""

    ref: FileRef
    key: str
    spacing: tuple[float, float, float] = H5_SPACING_MM

    def __str__(self) -> str:
        return f"{self.ref}[{self.key}]"

    def read(self) -> sitk.Image:
        import h5py

        with self.ref.local_path() as path:
            try:
                with h5py.File(path, "r") as f:
                    if self.key not in f:
                        raise ConversionError(f"{self}: no '{self.key}' dataset in the h5 file (has {list(f)})")
                    arr = np.asarray(f[self.key])
            except OSError as e:
                raise ConversionError(f"{self.ref}: unreadable or corrupt h5 file ({e})") from e
        if arr.ndim != 3:
            raise ConversionError(f"{self}: array is {arr.ndim}D (shape {arr.shape}), expected 3D")
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # (x,y,z) -> SimpleITK (z,y,x)
        image.SetSpacing(self.spacing)
        return image


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    paper = options.paper or "uamt"
    folder, train_file, test_file, default_n = PAPERS[paper]
    train = read_published_list(splits_dir, f"{folder}/{train_file}")
    labeled, unlabeled, n_pool = first_n_labeled(train, options, default_n, f"--split paper ({paper})")
    test = read_published_list(splits_dir, f"{folder}/{test_file}")
    return PaperSplit(labeled=labeled, unlabeled=unlabeled, test=test, origin=f"paper:{folder}",
                      labeled_fraction=len(labeled) / n_pool)


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.2, paper_split=_paper_split)


def build_catalogue(raw_dir: str | os.PathLike, source: str = "auto") -> Catalogue:
    if source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    refs = walk_raw_tree(raw_dir)
    by_case: dict[tuple, dict[str, FileRef]] = {}
    for r in refs:
        if r.name.lower() in ("lgemri.nrrd", "laendo.nrrd", "mri_norm2.h5") and r.folders:
            by_case.setdefault(r.folders, {})[r.name.lower()] = r
    has_nrrd = any("lgemri.nrrd" in f or "laendo.nrrd" in f for f in by_case.values())
    has_h5 = any("mri_norm2.h5" in f for f in by_case.values())
    if source == "auto":
        if has_nrrd and has_h5:
            raise ConversionError(f"{raw_dir}: holds both raw nrrd cases and preprocessed mri_norm2.h5 cases; "
                                  "choose one with --source nrrd|h5")
        source = "h5" if has_h5 else "nrrd"
    catalogue = Catalogue()
    for folders, files in sorted(by_case.items()):
        case_id = folders[-1]
        if source == "h5":
            if "mri_norm2.h5" not in files:
                continue
            h5 = files["mri_norm2.h5"]
            image, label = H5Volume(h5, "image"), H5Volume(h5, "label")
        else:
            if "lgemri.nrrd" not in files and "laendo.nrrd" not in files:
                continue
            if "lgemri.nrrd" not in files:
                raise ConversionError(f"label without image: {files['laendo.nrrd']} (no lgemri.nrrd next to it)")
            image = SitkFile(files["lgemri.nrrd"])
            label = SitkFile(files["laendo.nrrd"]) if "laendo.nrrd" in files else None
        is_test = any(f.lower().replace("_", " ").replace(" ", "").endswith("testingset") for f in folders)
        if label is None and not is_test:
            raise ConversionError(f"image without label: {files['lgemri.nrrd']} (no laendo.nrrd next to it)")
        target = catalogue.test if is_test else catalogue.labeled
        if case_id in catalogue.labeled or case_id in catalogue.test:
            raise ConversionError(f"LA case {case_id} found twice (second copy in {'/'.join(folders)})")
        if label is not None:
            target[case_id] = Case(case_id, (image,), label)
    if not catalogue.labeled:
        raise ConversionError(f"{raw_dir}: no LA training cases found (expected 'Training Set/<ID>/lgemri.nrrd' + "
                              "'laendo.nrrd' or '<ID>/mri_norm2.h5')")
    return catalogue


def convert_la(raw_dir: str | os.PathLike, output_dir: str | os.PathLike, options: ConversionOptions | None = None,
               source: str = "auto") -> SSLSplit:
    """Convert an LA download (``source``: "nrrd", "h5" or "auto" = whichever is present) into ``output_dir``."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir, source))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="raw challenge nrrd files or the preprocessed mri_norm2.h5 files (default: whichever "
                             "is present)")


COMMAND = dataset_command(convert_la, FORMAT, SUMMARY, PAPERS, add_arguments=_add_arguments,
                          keyword_arguments=("source",))
