"""BUSI (breast ultrasound, 2D, lesion masks) -> nnU-Net raw format as natural 2D images.

Raw layouts accepted (docs/datasets.md):

- Kaggle ``Dataset_BUSI_with_GT/{benign,malignant,normal}/``: ``benign (1).png`` with ``benign (1)_mask.png`` and,
  for multifocal lesions, ``benign (1)_mask_1.png``, ``_mask_2.png`` ...: all masks of an image are merged by
  per-pixel OR after thresholding at 127 (masks are 0/255, sometimes RGB/RGBA). Normal images (empty masks) are
  kept unless ``--exclude-normal``.
- CMU-Net / MGCC: ``images/<id>.png`` + ``masks/0/<id>.png`` (MGCC: under ``label/``; a sibling ``images/``
  folder without masks is ignored).

Output (2D, read by nnU-Net's ``NaturalImage2DIO``, so nnU-Net plans only a 2d configuration): dataset.json
``file_ending`` ".png"; images ``<case>_0000.png`` single-channel 8-bit grayscale (RGB PNGs are converted with the
ITU-R 601 luma weights, which leaves BUSI's grey-in-RGB images unchanged); labels ``<case>.png`` 8-bit with values
0/1 (1 = lesion). Case ids are the raw names with non-alphanumerics replaced: ``benign (301)`` -> ``benign_301``.
This is the same convention as the project's synthetic 2D dataset.

Random mode holds out 30 % as test set (MGCC's ``test_size=0.3``). ``--split paper`` uses the MGCC author's lists
(``--paper mgcc1|mgcc2|mgcc3``, one per published fold, default mgcc1): the first half of
``busi_train<fold>.txt`` labeled (MGCC's ``semi_percent`` 0.5; ``--labeled-fraction`` changes it),
``busi_val<fold>.txt`` as the test set; normal images are not in these lists and are not converted.
Generated images (MGCC's LDM samples) are added afterwards with ``nnssl_add_unlabeled``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from nnssl.split import SSLSplit

from .cases import Case, DatasetFormat
from .command import dataset_command
from .dataset import convert_download
from .errors import ConversionError
from .options import ConversionOptions, SplitOptions
from .published import PaperSplit, first_n_labeled, read_published_list
from .raw_files import FileRef, pair_files, walk_raw_tree
from .readers import PngGray, PngMaskUnion
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "BUSI breast ultrasound (2D PNG): Kaggle or CMU-Net/MGCC layout, multiple masks merged"
LABELS = {"background": 0, "lesion": 1}
FORMAT = DatasetFormat(name="BUSI", channel_names={"0": "ultrasound"}, labels=LABELS, file_ending=".png", ndim=2,
                       description="Breast Ultrasound Images (BUSI, Al-Dhabyani et al. 2020): benign/malignant "
                                   "lesions, normal images", reference="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset")
FOLDS = (1, 2, 3)
_MASK = re.compile(r"(.+?)_mask(?:_\d+)?\.png", flags=re.IGNORECASE)


def case_id_of(name: str) -> str:
    """``benign (301)`` / ``benign (301).png`` -> ``benign_301`` (no spaces or parentheses in file names)."""
    stem = re.sub(r"\.png$", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^0-9A-Za-z]+", "_", stem).strip("_")


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    fold = int(options.paper[-1]) if options.paper else 1
    train = read_published_list(splits_dir, f"MGCC/busi/busi_train{fold}.txt")
    default = max(1, int(round(0.5 * len(train))))
    labeled, unlabeled, n_pool = first_n_labeled(train, options, default, f"--split paper (mgcc fold {fold})")
    return PaperSplit(labeled=labeled, unlabeled=unlabeled, test=read_published_list(splits_dir,
                      f"MGCC/busi/busi_val{fold}.txt"), origin=f"paper:MGCC/busi/fold{fold}",
                      labeled_fraction=len(labeled) / n_pool)


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.3, normalize_id=case_id_of, paper_split=_paper_split)


def _add_case(cases: dict[str, Case], raw_name: str, image: FileRef, masks: tuple[FileRef, ...]) -> None:
    case_id = case_id_of(raw_name)
    if not case_id:
        raise ConversionError(f"{image}: cannot make a case id from the file name")
    if case_id in cases:
        raise ConversionError(f"two images map to case id '{case_id}': {cases[case_id].images[0]} and {image}")
    cases[case_id] = Case(case_id, (PngGray(image),), PngMaskUnion(masks))


def _masks0_layout(refs: list[FileRef]) -> dict[str, Case]:
    """CMU-Net/MGCC: ``<root>/images/<id>.png`` with ``<root>/masks/0/<id>.png``."""
    cases: dict[str, Case] = {}
    roots = sorted({r.folders[:-2] for r in refs
                    if len(r.folders) >= 2 and r.folders[-2].lower() == "masks" and r.folders[-1] == "0"})
    for root in roots:
        images = {r.name[:-4]: r for r in refs if r.folders == root + ("images",) and r.name.lower().endswith(".png")}
        masks = {r.name[:-4]: r for r in refs if r.folders == root + ("masks", "0") and r.name.lower().endswith(".png")}
        pair_files(images, masks, f"BUSI images/ and masks/0/ under '{'/'.join(root) or '.'}'")
        for name in sorted(images):
            _add_case(cases, name, images[name], (masks[name],))
    return cases


def _kaggle_layout(refs: list[FileRef]) -> dict[str, Case]:
    """Kaggle: ``<class>/<class> (n).png`` with ``<class> (n)_mask.png`` and optional ``_mask_k.png``."""
    pngs = [r for r in refs if r.name.lower().endswith(".png")]
    mask_folders = {r.folders for r in pngs if _MASK.fullmatch(r.name)}
    images: dict[tuple, FileRef] = {}
    masks: dict[tuple, list[FileRef]] = {}
    for r in pngs:
        if r.folders not in mask_folders:
            continue
        m = _MASK.fullmatch(r.name)
        if m:
            masks.setdefault((r.folders, m.group(1)), []).append(r)
        else:
            images[(r.folders, r.name[:-4])] = r
    def key(k: tuple) -> str:
        return "/".join(k[0] + (k[1],))

    pair_files({key(k): v for k, v in images.items()}, {key(k): v[0] for k, v in masks.items()},
               "BUSI images and masks")
    cases: dict[str, Case] = {}
    for k in sorted(images):
        _add_case(cases, k[1], images[k], tuple(sorted(masks[k], key=lambda r: r.name)))
    return cases


def build_catalogue(raw_dir: str | os.PathLike, exclude_normal: bool = False) -> Catalogue:
    refs = walk_raw_tree(raw_dir)
    cases = _masks0_layout(refs) or _kaggle_layout(refs)
    if not cases:
        raise ConversionError(f"{raw_dir}: no BUSI images with masks found (expected '<class>/<class> (n).png' + "
                              "'<class> (n)_mask.png', or images/ + masks/0/)")
    if exclude_normal:
        cases = {k: v for k, v in cases.items() if not k.lower().startswith("normal")}
    return Catalogue(labeled=cases)


def convert_busi(raw_dir: str | os.PathLike, output_dir: str | os.PathLike, options: ConversionOptions | None = None,
                 exclude_normal: bool = False) -> SSLSplit:
    """Convert a BUSI download (Kaggle or CMU-Net/MGCC layout) into ``output_dir`` as 2D PNGs."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir, exclude_normal))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exclude-normal", action="store_true",
                        help="drop the normal (lesion-free) images, as CMU-Net does (647 images remain)")


COMMAND = dataset_command(convert_busi, FORMAT, SUMMARY, papers=(f"mgcc{f}" for f in FOLDS),
                          add_arguments=_add_arguments, keyword_arguments=("exclude_normal",))
