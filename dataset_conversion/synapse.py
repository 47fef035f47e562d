"""Synapse multi-organ CT (BTCV "Beyond the Cranial Vault", 13 organs as in DHC) -> nnU-Net raw format.

Raw layouts accepted (docs/datasets.md), files found by name anywhere under RAW_DIR, zipped or not:

- ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz`` (30 cases, 0001-0010 and
  0021-0040); ``RawData/Testing/img`` or ``Test/img`` (20 cases without labels) is not converted;
- DHC's renamed layout ``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``.

Case ids are ``synapse_XXXX``; published ids ``0001``, ``img0001`` and ``label0001`` all map to it. Labels as
BTCV/DHC (1 spleen ... 10 portal and splenic vein, 11 pancreas ... 13 left adrenal gland).

Random mode holds out 20 % as test set (DHC: 6 of 30). ``--split paper``: ``genericssl`` (default; the only
published lists consistent with DHC's current test set: 20 train, 4 labeled = 20 %, 4 val, 6 test) or ``dhc``
(DHC's deleted 3a09c34 lists: ``--labeled-fraction 0.1|0.2|0.4``). Validation ids go to ``imagesVal`` (``val``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit, read_published_list
from .raw_files import FileRef, match_files, pair_files, walk_raw_tree
from .readers import SitkFile
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "Synapse/BTCV abdominal CT, 13 organs (DHC): RawData/Training or imagesTr/labelsTr"
LABELS = {
    "background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9, "portal vein and splenic vein": 10,
    "pancreas": 11, "right adrenal gland": 12, "left adrenal gland": 13,
}
FORMAT = DatasetFormat(name="Synapse", channel_names={"0": "CT"}, labels=LABELS,
                       description="Synapse multi-organ CT (MICCAI 2015 BTCV Multi-Atlas Labeling Beyond the Cranial "
                                   "Vault), 13 organs", reference="https://www.synapse.org/#!Synapse:syn3193805")
# paper -> (folder, {labeled fraction: (labeled file, unlabeled file)})
PAPERS = {
    "genericssl": ("GenericSSL/synapse", {0.2: ("labeled_0.2.txt", "unlabeled_0.2.txt")}),
    "dhc": ("DHC/synapse_deleted_3a09c34",
            {p / 100: (f"labeled_{p}p.txt", f"unlabeled_{p}p.txt") for p in (10, 20, 40)}),
}
TEST_FOLDER = r"testing|test|imagests"


def normalize_id(list_id: str) -> str:
    m = re.fullmatch(r"(?:img|label|synapse_)?(\d{4})(?:\.nii\.gz|\.npy)?", list_id.strip())
    return f"synapse_{m.group(1)}" if m else list_id


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    paper = options.paper or "genericssl"
    folder, files = PAPERS[paper]
    train = read_published_list(splits_dir, f"{folder}/train.txt")
    if options.labeled_count is not None:
        fraction = options.labeled_count / len(train)
    else:
        fraction = options.labeled_fraction if options.labeled_fraction is not None else (0.2 if len(files) == 1 else
                                                                                          None)
    match = [f for f in files if fraction is not None and abs(f - fraction) < 1e-6]
    if not match:
        available = ", ".join(f"{f:g} ({int(round(f * len(train)))} cases)" for f in sorted(files))
        raise ConversionError(f"--split paper ({paper}): published labeled fractions are {available}; "
                              "pass one with --labeled-fraction or --labeled-count")
    lab_file, unlab_file = files[match[0]]
    return PaperSplit(labeled=read_published_list(splits_dir, f"{folder}/{lab_file}"),
                      unlabeled=read_published_list(splits_dir, f"{folder}/{unlab_file}"),
                      test=read_published_list(splits_dir, f"{folder}/test.txt"),
                      val=read_published_list(splits_dir, f"{folder}/eval.txt"),
                      origin=f"paper:{folder}/{lab_file}", labeled_fraction=match[0])


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.2, normalize_id=normalize_id, paper_split=_paper_split)


def build_catalogue(raw_dir: str | os.PathLike) -> Catalogue:
    refs = walk_raw_tree(raw_dir)

    def training(r: FileRef) -> bool:
        return not r.in_folder(TEST_FOLDER)

    images = match_files(refs, r"img(\d{4})\.nii\.gz", where=training)
    labels = match_files(refs, r"label(\d{4})\.nii\.gz", where=training)
    if not images and not labels:
        raise ConversionError(f"{raw_dir}: no Synapse/BTCV training cases found (expected "
                              "RawData/Training/img/imgXXXX.nii.gz and label/labelXXXX.nii.gz)")
    pair_files(images, labels, "Synapse training cases")
    return Catalogue(labeled={f"synapse_{k}": Case(f"synapse_{k}", (SitkFile(images[k]),), SitkFile(labels[k]))
                              for k in images})


def convert_synapse(raw_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    options: ConversionOptions | None = None) -> SSLSplit:
    """Convert a BTCV RawData download (or DHC's imagesTr/labelsTr copy) into ``output_dir``."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir))


COMMAND = dataset_command(convert_synapse, FORMAT, SUMMARY, PAPERS)
