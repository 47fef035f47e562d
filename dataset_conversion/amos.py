"""AMOS22 (abdominal CT + MRI, 15 organs) -> nnU-Net raw format, with the unlabeled CT release when present.

Raw layout (docs/datasets.md), folders found anywhere under RAW_DIR, extracted or zipped (``amos22.zip``)::

    amos22/imagesTr/amos_0001.nii.gz + labelsTr/amos_0001.nii.gz   training pool (200 CT + 40 MRI)
    amos22/imagesVa/ [+ labelsVa/]                                 validation release -> test set
    amos22/imagesTs/                                               no labels: not converted
    amos22_unlabeled_ct_5000_5399[.zip]/.../amos_5000.nii.gz       unlabeled CT release (any folder or archive
                                                                    whose name contains "unlabeled")

Modality by id as the AMOS readme states (ids <= 500 CT, > 500 MRI; the unlabeled release is CT):
``--modality ct`` (default), ``mri`` or ``all``. The channel name is "CT" for ct (nnU-Net's CT normalisation),
"MRI" for mri and "CT_or_MRI" for all (per-case z-score normalisation, since HU windows make no sense for MRI).
Labels keep the AMOS values with the upstream misspellings fixed in the names ("arota" -> aorta, "postcava" ->
inferior vena cava, "gall bladder" -> gallbladder).

``--split paper``: ``dhc`` (default; 216 train / 24 val / 120 test = imagesVa, CT and MRI, so ``--modality all`` is
implied; ``--labeled-fraction 0.02|0.05|0.1``; DHC's 20 % lists are inconsistent and refused) or ``guidednet``
(CT only: 180 train / 60 val / 60 test drawn from imagesTr and imagesVa; first 10 % labeled by default, 50 % with
``--labeled-fraction 0.5``). Paper mode converts only the listed cases (no unlabeled release).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit, first_n_labeled, read_published_list
from .raw_files import FileRef, match_files, pair_files, walk_raw_tree
from .readers import SitkFile
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "AMOS22 abdominal CT/MRI, 15 organs: imagesTr pool, imagesVa test, unlabeled CT release"
LABELS = {
    "background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9, "pancreas": 10, "right adrenal gland": 11,
    "left adrenal gland": 12, "duodenum": 13, "bladder": 14, "prostate/uterus": 15,
}
MODALITIES = ("ct", "mri", "all")
CHANNEL_NAMES = {"ct": "CT", "mri": "MRI", "all": "CT_or_MRI"}
LAST_CT_ID = 500
PAPERS = ("dhc", "guidednet")
_DHC_FRACTIONS = {0.02: "2p", 0.05: "5p", 0.1: "10p"}
_CASE = r"(amos_\d{4})\.nii\.gz"


def dataset_format(modality: str) -> DatasetFormat:
    return DatasetFormat(
        name="AMOS22",
        channel_names={"0": CHANNEL_NAMES[modality]},
        labels=LABELS,
        description=f"AMOS 2022 abdominal multi-organ segmentation, 15 organs, modality: {modality}",
        reference="https://amos22.grand-challenge.org/",
        licence="CC BY 4.0",
    )


def is_ct(case_id: str) -> bool:
    return int(case_id.split("_")[1]) <= LAST_CT_ID


def _dhc_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    lists = {f: read_published_list(splits_dir, f"DHC/amos/labeled_{tag}.txt") for f, tag in _DHC_FRACTIONS.items()}
    if options.labeled_count is not None:
        fraction = next((f for f, ids in lists.items() if len(ids) == options.labeled_count), None)
    else:
        fraction = next((f for f in lists if options.labeled_fraction is not None
                         and abs(f - options.labeled_fraction) < 1e-6), None)
    if fraction is None:
        available = ", ".join(f"{f:g} ({len(ids)} cases)" for f, ids in lists.items())
        raise ConversionError(f"--split paper (dhc): DHC publishes AMOS labeled lists for fractions {available} "
                              "(its 20 % lists do not match its train list); pass --labeled-fraction or "
                              "--labeled-count accordingly")
    tag = _DHC_FRACTIONS[fraction]
    return PaperSplit(labeled=read_published_list(splits_dir, f"DHC/amos/labeled_{tag}.txt"),
                      unlabeled=read_published_list(splits_dir, f"DHC/amos/unlabeled_{tag}.txt"),
                      test=read_published_list(splits_dir, "DHC/amos/test.txt"),
                      val=read_published_list(splits_dir, "DHC/amos/eval.txt"),
                      origin=f"paper:DHC/amos/labeled_{tag}", labeled_fraction=fraction)


def _guidednet_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    train = read_published_list(splits_dir, "GuidedNet/amos/train.txt")
    default = int(round(0.1 * len(train)))
    labeled, unlabeled, n_pool = first_n_labeled(train, options, default, "--split paper (guidednet)")
    return PaperSplit(labeled=labeled, unlabeled=unlabeled,
                      test=read_published_list(splits_dir, "GuidedNet/amos/test.txt"),
                      val=read_published_list(splits_dir, "GuidedNet/amos/val.txt"),
                      origin="paper:GuidedNet/amos", labeled_fraction=len(labeled) / n_pool)


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    return _guidednet_split(splits_dir, options) if options.paper == "guidednet" else _dhc_split(splits_dir, options)


def rules(modality: str) -> DatasetRules:
    return DatasetRules(fmt=dataset_format(modality), default_test_fraction=0.2, paper_split=_paper_split)


def _folder_cases(refs: list[FileRef], image_folder: str, label_folder: str, keep, labels_required: bool,
                  ) -> dict[str, Case]:
    def in_folder(name: str):
        return lambda r: bool(r.folders) and r.folders[-1].lower() == name.lower() and not _is_unlabeled_release(r)

    images = {k: v for k, v in match_files(refs, _CASE, where=in_folder(image_folder)).items() if keep(k)}
    labels = {k: v for k, v in match_files(refs, _CASE, where=in_folder(label_folder)).items() if keep(k)}
    if labels or labels_required:
        pair_files(images, labels, f"AMOS {image_folder}/{label_folder}")
    return {k: Case(k, (SitkFile(images[k]),), SitkFile(labels[k]) if k in labels else None) for k in images}


def _is_unlabeled_release(r: FileRef) -> bool:
    return any("unlabeled" in f.lower() for f in r.folders)


def build_catalogue(raw_dir: str | os.PathLike, modality: str = "ct") -> Catalogue:
    if modality not in MODALITIES:
        raise ConversionError(f"--modality must be one of {MODALITIES}, got {modality!r}")
    refs = walk_raw_tree(raw_dir)

    def keep(case_id: str) -> bool:
        return modality == "all" or is_ct(case_id) == (modality == "ct")

    catalogue = Catalogue(
        labeled=_folder_cases(refs, "imagesTr", "labelsTr", keep, labels_required=True),
        test=_folder_cases(refs, "imagesVa", "labelsVa", keep, labels_required=False),
    )
    if not catalogue.labeled:
        raise ConversionError(f"{raw_dir}: no AMOS22 {modality} training cases found (expected "
                              "imagesTr/amos_XXXX.nii.gz and labelsTr/amos_XXXX.nii.gz)")
    if modality != "mri":
        unlabeled = match_files(refs, _CASE, where=_is_unlabeled_release)
        clash = sorted(set(unlabeled) & set(catalogue.all_cases()))
        if clash:
            raise ConversionError(f"unlabeled release case {unlabeled[clash[0]]} has the id of a labeled case")
        catalogue.unlabeled = {k: Case(k, (SitkFile(v),)) for k, v in unlabeled.items()}
    return catalogue


def convert_amos(raw_dir: str | os.PathLike, output_dir: str | os.PathLike, options: ConversionOptions | None = None,
                 modality: str | None = None) -> SSLSplit:
    """Convert an AMOS22 download into ``output_dir``. ``modality`` None: "all" for DHC's paper split (its lists mix
    CT and MRI), otherwise "ct"."""
    options = options or ConversionOptions()
    if modality is None:
        dhc = options.split.split == "paper" and (options.split.paper or "dhc") == "dhc"
        modality = "all" if dhc else "ct"
    return convert_download(raw_dir, output_dir, options, rules(modality), lambda: build_catalogue(raw_dir, modality))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", choices=MODALITIES, default=None,
                        help="which scans to convert (default: ct; all with --split paper --paper dhc)")


COMMAND = dataset_command(convert_amos, dataset_format("ct"), SUMMARY, PAPERS, add_arguments=_add_arguments,
                          keyword_arguments=("modality",))
