"""ACDC (cine-MRI, RV / MYO / LV) -> nnU-Net raw format, ED and ES frames, patient-level splits.

Raw layout (docs/datasets.md): ``[database/]training/patientXXX/`` (and ``testing/`` or ``testing/testing/``)
with ``Info.cfg`` (``ED: 1``, ``ES: 12``, ...), ``patientXXX_frameYY.nii.gz`` and ``patientXXX_frameYY_gt.nii.gz``;
the frame numbers come from Info.cfg, the ``_4d`` cine file is ignored. Zipped downloads are read as well.

Output: each patient gives two 3D NIfTI cases, ``patientXXX_ED`` and ``patientXXX_ES`` (labels 1 RV, 2 MYO, 3 LV).
The volumes keep their geometry (5-10 mm slices, a few slices each), which nnU-Net plans as a 2d configuration
(and a low-resolution 3d one), matching the 2D-slice training of SSL4MIS-style papers.

Splits count **patients** (``--labeled-count 3`` or ``7`` as SSL4MIS); a patient's two frames always share one
role. Random mode holds out 20 % of the training patients as test set (``--test-fraction``) unless the download
has ground truth for ``testing/`` (then those 50 patients are the test set). ``--split paper`` reproduces the
SSL4MIS (= BCP = SDCL) lists: 70 train patients (first 3/7 labeled, default 7), 20 test patients, and the
10 validation patients written to ``imagesVal/labelsVal`` and listed under ``val`` in ssl_split.json, kept out of
both training and the test metric, as the papers use them only for model selection. Published ids
``patientXXX_frame01``/``frame02`` are read as ED/ES (docs/datasets.md; the usual reading, not verifiable from the
lists).
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
from .published import PaperSplit, first_n_labeled, read_published_list
from .raw_files import FileRef, walk_raw_tree
from .readers import SitkFile
from .roles import Catalogue, DatasetRules

# the help line of this dataset's sub-command in `nnssl_convert --help` (COMMAND, at the end)
SUMMARY = "ACDC cardiac cine-MRI: ED/ES frames, patient-level splits (SSL4MIS 70/10/20 with --split paper)"
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
FORMAT = DatasetFormat(name="ACDC", channel_names={"0": "cineMRI"}, labels=LABELS,
                       description="ACDC cardiac cine-MRI, ED and ES frames; labels RV, MYO (LV myocardium), LV cavity",
                       reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/")
PAPERS = {"ssl4mis": "SSL4MIS", "bcp": "BCP", "sdcl": "SDCL"}  # identical ACDC lists (splits README)
PHASES = ("ED", "ES")
_PUBLISHED_FRAME = {"frame01": "ED", "frame02": "ES"}


def patient_of(case_id: str) -> str:
    return case_id.split("_", 1)[0]


def normalize_id(list_id: str) -> str:
    """Published/user ids to case ids: ``patient001_frame01[_slice_3]`` -> ``patient001_ED``,
    ``patient001_frame02`` -> ``patient001_ES``; ``patient001_ED`` stays; a bare ``patient001`` names its ED case
    (a text ``--split-file`` labels whole patients anyway)."""
    m = re.fullmatch(r"(patient\d{3})(?:_(frame0[12]|ED|ES))?(?:_slice_\d+)?(?:\.h5|\.nii\.gz)?", list_id.strip())
    if m is None:
        return list_id
    phase = m.group(2) or "ED"
    return f"{m.group(1)}_{_PUBLISHED_FRAME.get(phase, phase)}"


def _paper_split(splits_dir: Path, options: SplitOptions) -> PaperSplit:
    paper = options.paper or "ssl4mis"
    folder = f"{PAPERS[paper]}/acdc"
    train = [normalize_id(i) for i in read_published_list(splits_dir, f"{folder}/train.list")]
    labeled, unlabeled, n_patients = first_n_labeled(train, options, 7, f"--split paper ({paper})", patient_of)
    n_labeled = len({patient_of(i) for i in labeled})
    return PaperSplit(labeled=labeled, unlabeled=unlabeled,
                      test=read_published_list(splits_dir, f"{folder}/test.list"),
                      val=read_published_list(splits_dir, f"{folder}/val.list"),
                      origin=f"paper:{PAPERS[paper]}/acdc", labeled_fraction=n_labeled / n_patients)


RULES = DatasetRules(fmt=FORMAT, default_test_fraction=0.2, normalize_id=normalize_id, group_of=patient_of,
                     paper_split=_paper_split, unit="patients")


def parse_info_cfg(text: str, source: object) -> dict[str, str]:
    """``key: value`` lines of Info.cfg; ED and ES must be positive integers."""
    info = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    for key in PHASES:
        if key not in info:
            raise ConversionError(f"{source}: no '{key}:' line")
        try:
            frame = float(info[key])
        except ValueError:
            raise ConversionError(f"{source}: '{key}: {info[key]}' is not a frame number") from None
        if frame != int(frame) or frame < 1:
            raise ConversionError(f"{source}: '{key}: {info[key]}' is not a frame number")
        info[key] = str(int(frame))
    if info["ED"] == info["ES"]:
        raise ConversionError(f"{source}: ED and ES are the same frame ({info['ED']})")
    return info


def _patient_cases(patient: str, info_ref: FileRef, files: dict[str, FileRef], need_labels: bool) -> list[Case]:
    with info_ref.local_path() as p:
        info = parse_info_cfg(Path(p).read_text(encoding="utf-8", errors="replace"), info_ref)
    cases = []
    for phase in PHASES:
        stem = f"{patient}_frame{int(info[phase]):02d}"
        image, label = files.get(f"{stem}.nii.gz"), files.get(f"{stem}_gt.nii.gz")
        where = f"{info_ref} ({phase} = frame {info[phase]})"
        if image is None:
            raise ConversionError(f"{where}: image {stem}.nii.gz not found next to it")
        if label is None and need_labels:
            raise ConversionError(f"{where}: label {stem}_gt.nii.gz not found next to it")
        cases.append(Case(f"{patient}_{phase}", (SitkFile(image),), SitkFile(label) if label else None, patient))
    return cases


def build_catalogue(raw_dir: str | os.PathLike) -> Catalogue:
    refs = walk_raw_tree(raw_dir)
    by_folder: dict[tuple, dict[str, FileRef]] = {}
    for r in refs:
        by_folder.setdefault((r.path if r.member else r.path.parent, r.folders), {})[r.name] = r
    catalogue = Catalogue()
    seen: dict[str, FileRef] = {}
    for (_, folders), files in sorted(by_folder.items(), key=lambda kv: str(kv[0])):
        info_ref = files.get("Info.cfg")
        if info_ref is None or not folders or not re.fullmatch(r"patient\d{3}", folders[-1]):
            continue
        patient = folders[-1]
        if patient in seen:
            raise ConversionError(f"patient {patient} found twice: {seen[patient]} and {info_ref}")
        seen[patient] = info_ref
        is_test = info_ref.in_folder("testing")
        has_labels = any(n.endswith("_gt.nii.gz") for n in files)
        if is_test and not has_labels:
            continue  # challenge-time test patients without ground truth cannot be evaluated
        for case in _patient_cases(patient, info_ref, files, need_labels=True):
            (catalogue.test if is_test else catalogue.labeled)[case.case_id] = case
    if not catalogue.labeled:
        raise ConversionError(f"{raw_dir}: no ACDC training patients found (expected training/patientXXX/Info.cfg "
                              "with patientXXX_frameYY.nii.gz and _gt.nii.gz)")
    return catalogue


def convert_acdc(raw_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 options: ConversionOptions | None = None) -> SSLSplit:
    """Convert an ACDC download into ``output_dir``; labeled counts are patients. Returns the written split."""
    return convert_download(raw_dir, output_dir, options, RULES, lambda: build_catalogue(raw_dir))


COMMAND = dataset_command(convert_acdc, FORMAT, SUMMARY, PAPERS)
