"""FLARE22 (MICCAI FLARE 2022, abdominal CT, 13 organs) -> nnU-Net raw format with 2000 real unlabeled CTs.

Raw layout (docs/datasets.md), found by file name anywhere under RAW_DIR, so every folder-name variant works
(``FLARE22_LabeledCase50``, ``FLARE_LabeledCase50``, Google-Drive ``...-20220324T003930Z-001``,
``FLARE22_UnlabeledCase1-1000``, ``Training/Unlabeled``, ...), extracted or still zipped
(``images.zip``/``labels.zip``, ``Training/*.zip``)::

    FLARE22_Tr_0001_0000.nii.gz + FLARE22_Tr_0001.nii.gz     labeled training cases (50)
    Case_00001_0000.nii.gz                                   unlabeled training cases (2000)
    Tuning|Validation|ValidationSet/FLARETs_0001_0000.nii.gz the 50 validation cases -> test set (labels
                                                             FLARETs_0001.nii.gz used when present)

``Testing/`` (200 hidden-label cases) is not converted. Case ids keep the official names (``FLARE22_Tr_0001``,
``Case_00001``, ``FLARETs_0001``). Labels keep the FLARE order (liver 1 ... left kidney 13).

Splits: by default all 50 labeled cases are labeled and the 2000 unlabeled CTs form the unlabeled pool
(``--unlabeled-count`` keeps a seeded subset); ``--labeled-count/--labeled-fraction`` withholds the labels of the
other training cases (written to ``labelsUnlabeled``). ``--split paper`` is refused: GuidedNet's published FLARE22
lists use renamed ids (``train_000`` ...) whose mapping to the official names is not published.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit
from .raw_files import FileRef, match_files, pair_files, walk_raw_tree
from .readers import SitkFile
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "FLARE22 abdominal CT: 50 labeled + 2000 unlabeled, Tuning/Validation as test set"
LABELS = {
    "background": 0, "liver": 1, "right kidney": 2, "spleen": 3, "pancreas": 4, "aorta": 5,
    "inferior vena cava": 6, "right adrenal gland": 7, "left adrenal gland": 8, "gallbladder": 9,
    "esophagus": 10, "stomach": 11, "duodenum": 12, "left kidney": 13,
}
FORMAT = DatasetFormat(name="FLARE22", channel_names={"0": "CT"}, labels=LABELS,
                       description="MICCAI FLARE 2022 abdominal organ segmentation: 50 labeled + 2000 unlabeled CTs",
                       reference="https://flare22.grand-challenge.org/")
# The 50 validation cases were renamed "Tuning" after the challenge; the first folder that holds them is used.
TEST_FOLDERS = ("tuning", "validation", "validation[ _]?set")


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    raise ConversionError("--split paper is not available for FLARE22: GuidedNet's lists (splits/GuidedNet/flare22) "
                          "use renamed ids (train_000 ...) without a published mapping to the official case names; "
                          "use --labeled-count/--labeled-fraction or --split-file")


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.0, paper_split=_paper_split)


def _test_cases(refs: list[FileRef]) -> dict[str, Case]:
    for folder in TEST_FOLDERS:
        def in_test_folder(r: FileRef, folder: str = folder) -> bool:
            return r.in_folder(folder)

        images = match_files(refs, r"(FLARETs_\d{4})_0000\.nii\.gz", where=in_test_folder)
        if not images:
            continue
        labels = match_files(refs, r"(FLARETs_\d{4})\.nii\.gz", where=in_test_folder)
        if labels:
            pair_files(images, labels, f"FLARE22 validation cases (folder '{folder}')")
        return {k: Case(k, (SitkFile(images[k]),), SitkFile(labels[k]) if k in labels else None) for k in images}
    return {}


def build_catalogue(raw_dir: str | os.PathLike) -> Catalogue:
    refs = walk_raw_tree(raw_dir)
    images = match_files(refs, r"(FLARE22_Tr_\d{4})_0000\.nii\.gz")
    labels = match_files(refs, r"(FLARE22_Tr_\d{4})\.nii\.gz")
    if not images and not labels:
        raise ConversionError(f"{raw_dir}: no FLARE22 labeled cases found (expected FLARE22_Tr_XXXX_0000.nii.gz and "
                              "FLARE22_Tr_XXXX.nii.gz, e.g. in Training/FLARE22_LabeledCase50/images and labels)")
    pair_files(images, labels, "FLARE22 labeled cases")
    unlabeled = match_files(refs, r"(Case_\d{5})_0000\.nii\.gz")
    return Catalogue(
        labeled={k: Case(k, (SitkFile(images[k]),), SitkFile(labels[k])) for k in images},
        unlabeled={k: Case(k, (SitkFile(v),)) for k, v in unlabeled.items()},
        test=_test_cases(refs),
    )


def convert_flare22(raw_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    options: ConversionOptions | None = None) -> SSLSplit:
    """Convert a FLARE22 download (any variant in docs/datasets.md) into ``output_dir``; returns the written split."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir))


COMMAND = dataset_command(convert_flare22, FORMAT, SUMMARY)
