"""NIH Pancreas-CT (TCIA, 80 of 82 cases, binary pancreas) as used by CoraNet/BCP/SDCL -> nnU-Net raw format.

Raw layouts accepted (docs/datasets.md), files found by name anywhere under RAW_DIR:

- images as DICOM series ``Pancreas-CT/PANCREAS_0001/<study>/<series>/*.dcm`` (NBIA download, read with
  SimpleITK's GDCM series reader; one series per case), or as NIfTI ``data/PANCREAS_0001.nii.gz``;
- labels ``label0001.nii.gz`` in ``TCIA_pancreas_labels-02-05-2017/``, ``Pancreas-CT-Label/`` or ``label/``.

The labels were made on the DICOM grid but are often stored with other axis orientations (the pitfall nnU-Net's
Task062 works around by reorienting both). Here a label whose voxel grid is the image's grid in another orientation
is permuted/flipped onto the image grid exactly (no resampling); any other mismatch is an error naming both files.
Case ids are ``pancreas_XXXX``; published ids ``0001.h5`` (BCP), ``data0001`` (SDCL) and ``PANCREAS_0001`` map to it.

Random mode holds out 22.5 % as test set (18 of 80, as SDCL). ``--split paper``: ``sdcl`` (default) or ``bcp``,
62 train cases of which the first 12 are labeled (``--labeled-count`` changes N), 18 test cases.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit, first_n_labeled, read_published_list
from .raw_files import FileRef, match_files, pair_files, walk_raw_tree
from .readers import SitkFile, verify_raw_file
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "NIH Pancreas-CT (TCIA DICOM or NIfTI + TCIA labels) as used by CoraNet/BCP/SDCL"
LABELS = {"background": 0, "pancreas": 1}
FORMAT = DatasetFormat(name="PancreasCT", channel_names={"0": "CT"}, labels=LABELS,
                       description="NIH Pancreas-CT (TCIA), portal-venous CT with pancreas labels",
                       reference="https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU")
LABEL_FOLDERS = ("TCIA_pancreas_labels-02-05-2017", "Pancreas-CT-Label", "label")
# paper -> (folder, labeled list, unlabeled list, test list)
PAPERS = {
    "sdcl": ("SDCL/pancreas", "train_lab.txt", "train_unlab.txt", "test.txt"),
    "bcp": ("BCP/pancreas", "train_lab.txt", "train_unlab.txt", "test.txt"),
}


def normalize_id(list_id: str) -> str:
    m = re.fullmatch(r"(?:data|label|PANCREAS_|pancreas_)?(\d{4})(?:\.h5|\.nii\.gz)?", list_id.strip())
    return f"pancreas_{m.group(1)}" if m else list_id


@dataclass(frozen=True)
class DicomSeries:
    """A DICOM series folder read as one 3D image (slices sorted by GDCM along the slice normal)."""

    folder: Path

    def __str__(self) -> str:
        return str(self.folder)

    def read(self) -> sitk.Image:
        # GDCM leaves a truncated or corrupt slice file out of the series without an error (the volume then silently
        # lacks a slice), so every slice is decoded on its own first, and every .dcm file must be in the series.
        slices = sorted(p for p in self.folder.iterdir()
                        if p.name.lower().endswith(".dcm") and not p.name.startswith("."))
        for path in slices:
            try:
                verify_raw_file(FileRef(path), path)
            except ConversionError as e:  # GDCM's own message only says that no reader fits the file
                raise ConversionError(f"{path}: corrupt or truncated DICOM file (GDCM cannot read it; an incomplete "
                                      "download?)") from e
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(self.folder))
        if len(series) != 1:
            raise ConversionError(f"{self.folder}: expected one DICOM series, found {len(series)}")
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(self.folder), series[0])
        left_out = sorted({p.name for p in slices} - {Path(n).name for n in names})
        if left_out:
            raise ConversionError(f"{self.folder / left_out[0]}: DICOM file is not part of the folder's series "
                                  f"{series[0]} ({len(left_out)} such file(s)); keep one series per folder")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        try:
            return reader.Execute()
        except RuntimeError as e:
            raise ConversionError(f"{self.folder}: unreadable DICOM series ({str(e).splitlines()[-1]})") from e


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    paper = options.paper or "sdcl"
    folder, lab_file, unlab_file, test_file = PAPERS[paper]
    published_labeled = read_published_list(splits_dir, f"{folder}/{lab_file}")
    train = published_labeled + read_published_list(splits_dir, f"{folder}/{unlab_file}")
    labeled, unlabeled, n_pool = first_n_labeled(train, options, len(published_labeled), f"--split paper ({paper})")
    test = read_published_list(splits_dir, f"{folder}/{test_file}")
    return PaperSplit(labeled=labeled, unlabeled=unlabeled, test=test, origin=f"paper:{folder}",
                      labeled_fraction=len(labeled) / n_pool)


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.225, normalize_id=normalize_id, paper_split=_paper_split)


def _dicom_cases(refs: list[FileRef]) -> dict[str, DicomSeries]:
    series: dict[str, set[Path]] = {}
    for r in refs:
        if not r.name.lower().endswith(".dcm"):
            continue
        case = next((m.group(1) for f in reversed(r.folders) if (m := re.fullmatch(r"PANCREAS_(\d{4})", f, re.I))),
                    None)
        if case is None:
            continue
        if r.member is not None:
            raise ConversionError(f"{r.path}: DICOM inside zip archives is not supported; extract it first")
        series.setdefault(case, set()).add(r.path.parent)
    for case, folders in series.items():
        if len(folders) > 1:
            raise ConversionError(f"PANCREAS_{case}: DICOM files in several folders {sorted(map(str, folders))}; "
                                  "keep one series per case")
    return {case: DicomSeries(next(iter(folders))) for case, folders in series.items()}


def _expected_label(raw_dir: str | os.PathLike, labels: dict[str, FileRef]):
    """Describes the missing label of case ``key``: its file name and the folder where the other labels are."""
    folders = sorted({str(r).rsplit("/", 1)[0] if r.member else str(r.path.parent) for r in labels.values()})
    where = folders[0] if len(folders) == 1 else f"a label folder ({', '.join(LABEL_FOLDERS)}) under {raw_dir}"

    def describe(key: str) -> str:
        return f"label{key}.nii.gz in {where}"

    return describe


def build_catalogue(raw_dir: str | os.PathLike) -> Catalogue:
    refs = walk_raw_tree(raw_dir)
    nifti = match_files(refs, r"PANCREAS_(\d{4})\.nii(?:\.gz)?")
    dicom = _dicom_cases(refs)
    both = sorted(set(nifti) & set(dicom))
    if both:
        raise ConversionError(f"PANCREAS_{both[0]}: found as NIfTI ({nifti[both[0]]}) and as DICOM "
                              f"({dicom[both[0]]}); keep one")
    images: dict[str, object] = {**{k: SitkFile(v) for k, v in nifti.items()}, **dicom}
    labels = match_files(refs, r"label(\d{4})\.nii(?:\.gz)?")
    if not images and not labels:
        raise ConversionError(f"{raw_dir}: no NIH Pancreas-CT cases found (expected "
                              "Pancreas-CT/PANCREAS_XXXX/.../*.dcm or PANCREAS_XXXX.nii.gz, and "
                              "TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz)")
    pair_files({k: FileRef(Path(str(v))) for k, v in images.items()}, labels, "NIH Pancreas-CT cases",
               expected_label=_expected_label(raw_dir, labels))
    return Catalogue(labeled={f"pancreas_{k}": Case(f"pancreas_{k}", (images[k],), SitkFile(labels[k]))
                              for k in sorted(images)})


def convert_pancreas(raw_dir: str | os.PathLike, output_dir: str | os.PathLike,
                     options: ConversionOptions | None = None) -> SSLSplit:
    """Convert an NIH Pancreas-CT download (DICOM or NIfTI images + TCIA NIfTI labels) into ``output_dir``."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir))


COMMAND = dataset_command(convert_pancreas, FORMAT, SUMMARY, PAPERS)
