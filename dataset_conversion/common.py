"""Shared machinery of the dataset converters: find raw files, check them, assign split roles, write the dataset.

Every converter (``flare22.py``, ``acdc.py``, ...) only knows its dataset's raw layout: it builds a
:class:`Catalogue` of :class:`Case` objects (where each image and label comes from, which patient it belongs to)
and a :class:`DatasetRules` (label dict, channel names, published splits). Everything else is here, written once:

- :func:`walk_raw_tree` lists raw files, looking inside ``.zip`` archives too (several mirrors ship zipped halves);
- readers (:class:`SitkFile`, :class:`PngGray`, :class:`PngMaskUnion`) turn a raw file into a SimpleITK image;
- :func:`write_case` reads one case, checks it (every raw file decoded completely by
  :func:`nnssl.verify.verify_image_file`, since SimpleITK and PIL read a truncated file with zeros; dimension,
  image/label shape and geometry, label values) and writes it; labels are never resampled: the only change allowed
  is an exact axis permutation/flip when the label file stores the same voxel grid in another orientation;
- :func:`assign_roles` turns the options (random fraction/count, ``--split paper``, ``--split-file``) into the
  labeled / unlabeled / test / val roles of the raw-format contract of :mod:`nnssl.split`;
- :func:`convert_dataset` writes everything into a temporary folder (:func:`nnssl.io.atomic_output_dir`) with
  parallel workers and a progress bar, validates it with :func:`nnssl.split.validate_split_against_raw` and only
  then moves it into place, so a failed conversion never leaves a half-written dataset;
- :func:`check_output_dir` runs before anything is touched: the output folder must not be, contain or lie inside the
  raw input, and ``--overwrite`` only replaces a dataset folder nnssl wrote (dataset.json + ssl_split.json).

Output roles and folders::

    labeled    imagesTr/, labelsTr/               (the only cases nnU-Net's fingerprint and plans see)
    unlabeled  imagesUnlabeled/, labelsUnlabeled/  (labels only for withheld labels of labeled data)
    test       imagesTs/, labelsTs/                (labels when the raw data has them)
    val        imagesVal/, labelsVal/              (a paper's validation cases, listed under ``val`` in
                                                    ssl_split.json; never used for training or testing)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnssl.errors import DataFileError, NnsslError
from nnssl.io import atomic_output_dir, atomic_write_json
from nnssl.split import SplitError, SSLSplit, choose_labeled, read_list_file, save_split, validate_split_against_raw
from nnssl.verify import verify_image_file

ROLE_FOLDERS: dict[str, tuple[str, str]] = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
    "test": ("imagesTs", "labelsTs"),
    "val": ("imagesVal", "labelsVal"),
}
SPLITS_DIR_ENV = "NNSSL_SPLITS_DIR"
PACKAGED_SPLITS = "paper_splits"  # package data of nnssl.data
# A folder with both files is a dataset nnssl wrote; --overwrite replaces nothing else.
NNSSL_DATASET_MARKERS = ("dataset.json", "ssl_split.json")
MAX_SEED = 2**32 - 1  # numpy's RandomState accepts seeds in [0, 2**32 - 1]
_IGNORED_NAMES = {"__macosx", "desktop.ini", "thumbs.db"}
# Geometry tolerances: NIfTI stores spacing/origin as float32, so exact equality is too strict.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


class ConversionError(NnsslError):
    """Bad raw input or bad options; the message names the file or option and the problem."""


# ----------------------------------------------------------------------------------------------- raw files


@dataclass(frozen=True)
class FileRef:
    """A raw file on disk or a member of a zip archive. ``folders``: its folder names relative to the raw root
    (a zip archive counts as a folder named by its stem), used to tell training from testing parts."""

    path: Path
    member: str | None = None
    folders: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def in_folder(self, pattern: str) -> bool:
        """True when one of the file's folders fully matches ``pattern`` (regex, case-insensitive)."""
        return any(re.fullmatch(pattern, f, flags=re.IGNORECASE) for f in self.folders)

    @contextlib.contextmanager
    def local_path(self) -> Iterator[Path]:
        """A real file path for readers that need one; zip members are extracted to a temporary file."""
        if self.member is None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="nnssl_zip_") as tmp:
            target = Path(tmp) / self.name
            self.copy_to(target)
            yield target

    def copy_to(self, dest: Path) -> None:
        if self.member is None:
            shutil.copyfile(self.path, dest)
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ConversionError(f"{self}: cannot extract from archive ({e})") from e


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _zip_members(archive: Path, folders: tuple[str, ...]) -> list[FileRef]:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{archive}: not a readable zip archive ({e})") from e
    refs = []
    for member in names:
        parts = PurePosixPath(member).parts
        if member.endswith("/") or any(_ignored(p) for p in parts):
            continue
        refs.append(FileRef(archive, member, folders + (archive.name[: -len(".zip")],) + parts[:-1]))
    return refs


def walk_raw_tree(root: str | os.PathLike) -> list[FileRef]:
    """Every file under ``root`` (following links, looking into ``.zip`` archives). Hidden files and folders and OS
    junk (``__MACOSX``, ``Thumbs.db``) are skipped, and reported in one note line so that nothing is skipped
    silently (downloads often carry them; a case file hidden by a leading '.' would otherwise just go missing)."""
    root = Path(root)
    if not root.exists():
        raise ConversionError(f"{root}: raw data folder does not exist")
    if not root.is_dir():
        raise ConversionError(f"{root}: raw data path is not a folder")
    refs: list[FileRef] = []
    skipped: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        skipped += [Path(dirpath) / d for d in dirnames if _ignored(d)]
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        folders = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if _ignored(name):
                skipped.append(Path(dirpath) / name)
                continue
            path = Path(dirpath) / name
            if name.lower().endswith(".zip"):
                refs.extend(_zip_members(path, folders))
            else:
                refs.append(FileRef(path, None, folders))
    if skipped:
        shown = ", ".join(str(p) for p in sorted(skipped)[:3])
        print(f"note: skipped {len(skipped)} hidden or system file(s)/folder(s) in {root}: {shown}"
              + (", ..." if len(skipped) > 3 else ""))
    if not refs:
        raise ConversionError(f"{root}: raw data folder is empty")
    return refs


def match_files(refs: Sequence[FileRef], pattern: str, where: Callable[[FileRef], bool] | None = None,
                ) -> dict[str, FileRef]:
    """``{key: file}`` for files whose name fully matches ``pattern`` (its first group is the key).

    The same key twice is an error naming both files, except that an extracted file wins over the same file inside
    a zip archive (mirrors often ship both).
    """
    found: dict[str, FileRef] = {}
    for ref in refs:
        m = re.fullmatch(pattern, ref.name, flags=re.IGNORECASE)
        if m is None or (where is not None and not where(ref)):
            continue
        key = m.group(1)
        other = found.get(key)
        if other is not None:
            if (other.member is None) == (ref.member is None):
                raise ConversionError(f"two raw files for the same case '{key}': {other} and {ref}")
            if ref.member is not None:
                continue
        found[key] = ref
    return found


def pair_files(images: dict[str, FileRef], labels: dict[str, FileRef], what: str,
               expected_label: Callable[[str], str] | None = None) -> None:
    """Every image has its label and the reverse; the error names the files without a partner.

    ``expected_label(key)`` describes the label file that was looked for (name and folder), so that the user knows
    what is missing and where it should be."""
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    problems = [f"image without label: {images[k]}" + (f" (no {expected_label(k)})" if expected_label else "")
                for k in no_label[:10]]
    problems += [f"label without image: {labels[k]}" for k in no_image[:10]]
    if problems:
        extra = len(no_label) + len(no_image) - len(problems)
        more = f" (and {extra} more)" if extra > 0 else ""
        sep = " " if len(problems) == 1 else "\n  "  # one problem: one line, as every other error
        raise ConversionError(f"{what}: unpaired files{more}:{sep}" + sep.join(problems))


# ----------------------------------------------------------------------------------------------- readers


class ImageSource(Protocol):
    """Reads one image (one channel) or one label map; ``str()`` names the raw file(s) for error messages."""

    def read(self) -> sitk.Image: ...


@dataclass(frozen=True)
class SitkFile:
    """Any file SimpleITK reads (NIfTI, NRRD, MHA, ...); ``.nii.gz`` images are copied byte for byte."""

    ref: FileRef

    def __str__(self) -> str:
        return str(self.ref)

    def read(self) -> sitk.Image:
        with self.ref.local_path() as path:
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as e:
                raise ConversionError(f"{self.ref}: unreadable or corrupt image file ({_first_line(e)})") from e
            verify_raw_file(self.ref, path)
            return image


def verify_raw_file(ref: FileRef, path: Path) -> None:
    """Decode ``path`` (``ref`` itself, or its extracted copy) completely: SimpleITK and PIL read a truncated file
    without an error (missing voxels become zeros). The error names the raw file, not the temporary copy."""
    try:
        verify_image_file(path)
    except DataFileError as e:
        message = str(e)
        if message.startswith(str(path)):
            message = str(ref) + message[len(str(path)):]
        raise ConversionError(message) from e


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    useful = [s for s in lines if "error" in s.lower() or "exception" in s.lower() or "could not" in s.lower()]
    return (useful or lines or [type(e).__name__])[-1][:300]


def _read_png(ref: FileRef) -> np.ndarray:
    """PNG as uint8 grayscale (H, W): RGB(A) is converted with the ITU-R 601 luma weights (PIL's ``convert('L')``),
    which leaves grey images stored as RGB (BUSI) unchanged."""
    from PIL import Image, UnidentifiedImageError

    with ref.local_path() as path:
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I"):
                    raise ConversionError(f"{ref}: 16/32-bit PNG not supported, expected 8-bit grayscale or RGB")
                array = np.asarray(im.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ConversionError(f"{ref}: unreadable or corrupt PNG ({e})") from e
        verify_raw_file(ref, path)  # chunk CRCs and the end of the file, which load() does not reach
        return array


@dataclass(frozen=True)
class PngGray:
    """A 2D image PNG (grayscale, RGB or RGBA) read as single-channel uint8."""

    ref: FileRef

    def __str__(self) -> str:
        return str(self.ref)

    def read(self) -> sitk.Image:
        return sitk.GetImageFromArray(_read_png(self.ref))


@dataclass(frozen=True)
class PngMaskUnion:
    """One or more binary mask PNGs (0/255, any channel layout) merged by per-pixel OR into a 0/1 label."""

    refs: tuple[FileRef, ...]
    threshold: int = 127

    def __str__(self) -> str:
        return " + ".join(str(r) for r in self.refs)

    def read(self) -> sitk.Image:
        masks = [_read_png(r) for r in self.refs]
        shapes = {m.shape for m in masks}
        if len(shapes) > 1:
            raise ConversionError(f"masks of one image differ in shape {sorted(shapes)}: {self}")
        merged = np.zeros(masks[0].shape, dtype=np.uint8)
        for m in masks:
            merged |= (m > self.threshold).astype(np.uint8)
        return sitk.GetImageFromArray(merged)


# ----------------------------------------------------------------------------------------------- cases and checks


@dataclass(frozen=True)
class Case:
    """One output case: ``images`` one source per channel, ``label`` None for unlabeled data, ``group`` the unit
    that must never be split across roles (ACDC: the patient; default: the case itself)."""

    case_id: str
    images: tuple[ImageSource, ...]
    label: ImageSource | None = None
    group: str | None = None


@dataclass(frozen=True)
class DatasetFormat:
    """What goes into dataset.json plus the rules that label maps must satisfy.

    ``label_remap`` maps raw label values to output values (LA: 255 -> 1); raw values allowed are the output label
    values plus the remap keys. ``ndim`` is 3 for volumes, 2 for natural images (PNG, nnU-Net's NaturalImage2DIO).
    """

    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str = ".nii.gz"
    ndim: int = 3
    label_remap: dict[int, int] = field(default_factory=dict)
    description: str = ""
    reference: str = ""
    licence: str = "see the original dataset"

    def allowed_raw_label_values(self) -> set[int]:
        return set(self.labels.values()) | set(self.label_remap)


def check_image(image: sitk.Image, fmt: DatasetFormat, source: object) -> None:
    if image.GetDimension() != fmt.ndim:
        raise ConversionError(f"{source}: image is {image.GetDimension()}D (size {image.GetSize()}) "
                              f"but {fmt.ndim}D images were expected")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{source}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                              "expected a scalar image")
    if min(image.GetSize()) < 1:
        raise ConversionError(f"{source}: empty image (size {image.GetSize()})")
    if not all(np.isfinite(s) and s > 0 for s in image.GetSpacing()):
        raise ConversionError(f"{source}: invalid spacing {image.GetSpacing()}")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and not np.isfinite(
            sitk.GetArrayViewFromImage(image)).all():
        raise ConversionError(f"{source}: image holds NaN or infinite values")


def geometry_mismatch(a: sitk.Image, b: sitk.Image) -> str | None:
    """Why two images do not share one voxel grid (size, spacing, origin, direction), or None when they do."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=_SPACING_RTOL, atol=0):
        return f"spacing {a.GetSpacing()} vs {b.GetSpacing()}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=_ORIGIN_ATOL_MM):
        return f"origin {a.GetOrigin()} vs {b.GetOrigin()}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_DIRECTION_ATOL):
        return f"direction {a.GetDirection()} vs {b.GetDirection()}"
    return None


def align_label(image: sitk.Image, label: sitk.Image, image_src: object, label_src: object) -> sitk.Image:
    """The label on the image's voxel grid, or a :class:`ConversionError` naming both files.

    When only the stored orientation differs (the same physical grid written with permuted/flipped axes, a known
    pitfall of DICOM-derived labels such as NIH Pancreas-CT), the label is reoriented with
    ``sitk.DICOMOrient``: an exact voxel permutation, not a resampling.
    """
    problem = geometry_mismatch(image, label)
    if problem is None:
        return label
    if image.GetDimension() == 3 and problem.startswith(("direction", "origin", "size")):
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        reoriented = sitk.DICOMOrient(label, code)
        if geometry_mismatch(image, reoriented) is None:
            return reoriented
    raise ConversionError(f"image and label do not share one voxel grid ({problem}): {image_src} and {label_src}")


def label_to_uint8(label: sitk.Image, fmt: DatasetFormat, source: object) -> np.ndarray:
    """Label array as uint8 with ``fmt.label_remap`` applied; non-integer or unexpected values are errors."""
    arr = sitk.GetArrayFromImage(label)
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{source}: label map has {label.GetNumberOfComponentsPerPixel()} components per voxel")
    rounded = np.rint(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.allclose(arr, rounded, rtol=0, atol=1e-3):
        raise ConversionError(f"{source}: label map holds non-integer values (e.g. {arr[arr != rounded].flat[0]})")
    values = {int(v) for v in np.unique(rounded)}
    unexpected = sorted(values - fmt.allowed_raw_label_values())
    if unexpected:
        raise ConversionError(f"{source}: unexpected label values {unexpected[:20]}; "
                              f"expected a subset of {sorted(fmt.allowed_raw_label_values())}")
    out = rounded.astype(np.int64)
    for raw, new in fmt.label_remap.items():
        out[rounded == raw] = new
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class WriteTask:
    case: Case
    image_paths: tuple[Path, ...]
    label_path: Path | None
    fmt: DatasetFormat


def output_paths(case: Case, folder: Path, role: str, fmt: DatasetFormat, with_label: bool) -> WriteTask:
    img_dir, lab_dir = ROLE_FOLDERS[role]
    images = tuple(folder / img_dir / f"{case.case_id}_{c:04d}{fmt.file_ending}" for c in range(len(case.images)))
    label = folder / lab_dir / f"{case.case_id}{fmt.file_ending}" if with_label and case.label is not None else None
    return WriteTask(case, images, label, fmt)


def write_case(task: WriteTask) -> str:
    """Read, check and write one case (worker function: module level so that it pickles)."""
    case, fmt = task.case, task.fmt
    images = []
    for src in case.images:
        img = src.read()
        check_image(img, fmt, src)
        images.append(img)
    for src, img in zip(case.images[1:], images[1:]):
        problem = geometry_mismatch(images[0], img)
        if problem is not None:
            raise ConversionError(f"channels of case '{case.case_id}' differ ({problem}): {case.images[0]} and {src}")
    for src, img, dest in zip(case.images, images, task.image_paths):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if fmt.file_ending == ".nii.gz" and isinstance(src, SitkFile) and src.ref.name.lower().endswith(".nii.gz"):
            src.ref.copy_to(dest)  # already validated by reading it; a byte copy keeps the header exactly
        else:
            sitk.WriteImage(img, str(dest), useCompression=True)
    if task.label_path is not None:
        label = case.label.read()
        check_image(label, fmt, case.label)
        label = align_label(images[0], label, case.images[0], case.label)
        out = sitk.GetImageFromArray(label_to_uint8(label, fmt, case.label))
        out.CopyInformation(images[0])
        task.label_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(task.label_path), useCompression=True)
    return case.case_id


def run_parallel(fn: Callable[[WriteTask], str], tasks: Sequence[WriteTask], num_processes: int, desc: str,
                 progress: bool = True) -> None:
    """Run ``fn`` on every task with a progress bar; the first error cancels the rest and is re-raised."""
    with tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress) as bar:
        if num_processes <= 1 or len(tasks) <= 1:
            for t in tasks:
                fn(t)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks))) as pool:
            futures = [pool.submit(fn, t) for t in tasks]
            try:
                for fut in as_completed(futures):
                    fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


def write_dataset_json(folder: Path, fmt: DatasetFormat, num_training: int, extra: dict | None = None) -> None:
    dataset_json = {
        "name": fmt.name,
        "description": fmt.description,
        "reference": fmt.reference,
        "licence": fmt.licence,
        "channel_names": fmt.channel_names,
        "labels": fmt.labels,
        "numTraining": num_training,
        "file_ending": fmt.file_ending,
    }
    dataset_json.update(extra or {})
    atomic_write_json(folder / "dataset.json", dataset_json)


# ----------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitOptions:
    """How to choose roles. ``split``: "random" (seeded), "paper" (published lists) or "file" (``split_file``).

    ``labeled_count``/``labeled_fraction`` count groups (ACDC: patients). ``test_fraction`` holds out part of the
    labeled pool as test set (None: the dataset's default); the held-out part depends on ``test_seed`` only, so
    changing ``seed`` changes the labeled choice but never the test set. ``unlabeled_count`` keeps a seeded subset
    of the dataset's real unlabeled images (FLARE22's 2000, AMOS's unlabeled release).
    """

    split: str = "random"
    labeled_count: int | None = None
    labeled_fraction: float | None = None
    seed: int = 0
    test_fraction: float | None = None
    test_seed: int = 0
    unlabeled_count: int | None = None
    split_file: Path | None = None
    splits_dir: Path | None = None
    paper: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("random", "paper", "file"):
            raise ConversionError(f"split must be random, paper or file, got {self.split!r}")
        if self.labeled_count is not None and self.labeled_fraction is not None:
            raise ConversionError("give only one of --labeled-count and --labeled-fraction")
        if self.labeled_count is not None and self.labeled_count < 1:
            raise ConversionError(f"--labeled-count must be >= 1, got {self.labeled_count}")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ConversionError(f"--labeled-fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.test_fraction is not None and not 0 <= self.test_fraction < 1:
            raise ConversionError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        for option, seed in (("--seed", self.seed), ("--test-seed", self.test_seed)):
            if not 0 <= seed <= MAX_SEED:
                raise ConversionError(f"{option} must be in 0..{MAX_SEED}, got {seed}")
        if self.unlabeled_count is not None and self.unlabeled_count < 0:
            raise ConversionError(f"--unlabeled-count must be >= 0, got {self.unlabeled_count}")
        if (self.split == "file") != (self.split_file is not None):
            raise ConversionError("--split-file PATH goes with split 'file' (and only with it)")


@dataclass(frozen=True)
class ConversionOptions:
    """Options every converter takes: the split, plus how to write."""

    split: SplitOptions = field(default_factory=SplitOptions)
    overwrite: bool = False
    num_processes: int = 1
    progress: bool = True


@dataclass
class PaperSplit:
    """Roles as published (ids as in the list files, the dataset's ``normalize_id`` maps them to case ids)."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    origin: str
    val: list[str] = field(default_factory=list)
    labeled_fraction: float | None = None


@dataclass
class Catalogue:
    """The raw cases of one dataset. ``labeled``: cases with labels forming the training pool; ``unlabeled``: real
    unlabeled images; ``test``: the dataset's own held-out cases (labels optional)."""

    labeled: dict[str, Case] = field(default_factory=dict)
    unlabeled: dict[str, Case] = field(default_factory=dict)
    test: dict[str, Case] = field(default_factory=dict)

    def all_cases(self) -> dict[str, Case]:
        return {**self.unlabeled, **self.test, **self.labeled}


@dataclass(frozen=True)
class DatasetRules:
    """Per-dataset knowledge the shared code needs. ``normalize_id`` maps ids of published or user lists to case
    ids; ``paper_split(splits_dir, options)`` reads the published lists; ``group_of`` maps a case id to the unit that
    is labeled as a whole; ``default_test_fraction`` applies in random mode when the catalogue has no test set."""

    fmt: DatasetFormat
    default_test_fraction: float = 0.0
    normalize_id: Callable[[str], str] = str
    group_of: Callable[[str], str] | None = None
    paper_split: Callable[[Path, SplitOptions], PaperSplit] | None = None
    unit: str = "cases"


@dataclass
class RoleAssignment:
    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    val: list[str]
    origin: str
    seed: int | None
    labeled_fraction: float | None
    not_converted: list[str] = field(default_factory=list)


def find_splits_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder of published split lists: ``explicit``, else ``$NNSSL_SPLITS_DIR``, else the copy that ships
    with the package (``nnssl/data/paper_splits``, read with :mod:`importlib.resources`, so an installed nnssl
    finds it without the source tree)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise ConversionError(f"--splits-dir {path}: folder not found")
        return path
    env = os.environ.get(SPLITS_DIR_ENV)
    if env:
        if not Path(env).is_dir():
            raise ConversionError(f"${SPLITS_DIR_ENV}={env}: folder not found")
        return Path(env)
    return packaged_splits_dir()


def packaged_splits_dir() -> Path:
    """``nnssl/data/paper_splits`` of the installed package (a real folder: nnssl is never installed zipped)."""
    from importlib.resources import files

    folder = files("nnssl.data") / PACKAGED_SPLITS
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ConversionError(f"the published split lists that ship with nnssl ({folder}) are missing from this "
                              f"installation: reinstall nnssl, or pass --splits-dir DIR / set ${SPLITS_DIR_ENV}")
    return folder


def read_published_list(splits_dir: Path, relative: str) -> list[str]:
    """Ids of one published list file, in file order (CRLF and missing final newlines tolerated)."""
    path = splits_dir / relative
    if not path.is_file():
        raise ConversionError(f"published split list {path} not found (splits folder {splits_dir})")
    ids = read_list_file(path)
    if not ids:
        raise ConversionError(f"published split list {path} is empty")
    return ids


def first_n_labeled(ordered_ids: Sequence[str], options: SplitOptions, default_count: int | None, where: str,
                    group_of: Callable[[str], str] | None = None) -> tuple[list[str], list[str], int]:
    """Papers label the first N entries (or groups) of their train list; N from the options or ``default_count``.
    Returns ``(labeled, unlabeled, n_groups_in_pool)``."""
    group_of = group_of or (lambda i: i)
    groups = list(dict.fromkeys(group_of(i) for i in ordered_ids))
    if options.labeled_count is not None:
        n = options.labeled_count
    elif options.labeled_fraction is not None:
        n = max(1, int(round(options.labeled_fraction * len(groups))))
    elif default_count is not None:
        n = default_count
    else:
        raise ConversionError(f"{where}: pass --labeled-count or --labeled-fraction")
    if n > len(groups):
        raise ConversionError(f"{where}: cannot label {n}, the published train list has only {len(groups)}")
    chosen = set(groups[:n])
    return ([i for i in ordered_ids if group_of(i) in chosen], [i for i in ordered_ids if group_of(i) not in chosen],
            len(groups))


def _normalized(ids: Sequence[str], rules: DatasetRules) -> list[str]:
    return list(dict.fromkeys(rules.normalize_id(i) for i in ids))


def _choose(ids: Sequence[str], rules: DatasetRules, where: str, n: int | None = None,
            fraction: float | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    try:
        return choose_labeled(ids, n_labeled=n, fraction=fraction, seed=seed, group_of=rules.group_of)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}".replace("groups", rules.unit)) from e


def _hold_out_test(pool: list[str], catalogue: Catalogue, rules: DatasetRules, options: SplitOptions,
                   ) -> tuple[list[str], list[str]]:
    """(test ids, remaining pool): the catalogue's own test set plus a ``test_fraction`` share of the pool."""
    fraction = options.test_fraction
    if fraction is None:
        fraction = 0.0 if catalogue.test else rules.default_test_fraction
    test = sorted(catalogue.test)
    if fraction > 0 and pool:
        held, pool = _choose(pool, rules, "--test-fraction", fraction=fraction, seed=options.test_seed)
        if not pool:
            raise ConversionError(f"--test-fraction {fraction} leaves no training {rules.unit}")
        test += held
    return test, pool


def _real_unlabeled(catalogue: Catalogue, options: SplitOptions) -> list[str]:
    ids = sorted(catalogue.unlabeled)
    n = options.unlabeled_count
    if n is None or n >= len(ids):
        return ids
    if n == 0:
        return []
    order = np.random.RandomState(options.seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def _random_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    test, pool = _hold_out_test(sorted(catalogue.labeled), catalogue, rules, options)
    if options.labeled_count is None and options.labeled_fraction is None:
        labeled, withheld = pool, []
    else:
        labeled, withheld = _choose(pool, rules, "--labeled-count/--labeled-fraction", n=options.labeled_count,
                                    fraction=options.labeled_fraction, seed=options.seed)
    return RoleAssignment(labeled, withheld + _real_unlabeled(catalogue, options), test, [], "random", options.seed,
                          options.labeled_fraction)


def _file_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    """``--split-file``: a JSON file with ``labeled``/``unlabeled``/``test`` (``val``) lists, or a text file listing
    the labeled ids (the rest of the pool becomes unlabeled, the test set is chosen as in random mode)."""
    path = Path(options.split_file)
    origin = f"file:{path}"
    if not path.is_file():
        raise ConversionError(f"--split-file {path}: file not found")
    if path.suffix.lower() == ".json":
        try:
            split = SSLSplit.from_dict(json.loads(path.read_text()), source=str(path))
        except (ValueError, SplitError) as e:
            raise ConversionError(f"--split-file {path}: {e}") from e
        val = split.extra.get("val", [])
        return _roles_from_lists(catalogue, rules, split.labeled, split.unlabeled, split.test, val, origin,
                                 options.seed, split.labeled_fraction)
    wanted = _normalized(read_list_file(path), rules)
    if not wanted:
        raise ConversionError(f"--split-file {path}: no ids in the file")
    unknown = [i for i in wanted if i not in catalogue.labeled]
    if unknown:
        raise ConversionError(f"--split-file {path}: ids not among the labeled raw cases: {unknown[:10]}")
    group_of = rules.group_of or (lambda i: i)
    wanted_groups = {group_of(i) for i in wanted}
    labeled = sorted(i for i in catalogue.labeled if group_of(i) in wanted_groups)
    rest = sorted(i for i in catalogue.labeled if group_of(i) not in wanted_groups)
    test, withheld = _hold_out_test(rest, catalogue, rules, options)
    return RoleAssignment(labeled, withheld + _real_unlabeled(catalogue, options), test, [], origin, options.seed,
                          None)


def _roles_from_lists(catalogue: Catalogue, rules: DatasetRules, labeled: Sequence[str], unlabeled: Sequence[str],
                      test: Sequence[str], val: Sequence[str], origin: str, seed: int | None,
                      labeled_fraction: float | None) -> RoleAssignment:
    roles = {name: _normalized(ids, rules) for name, ids in
             (("labeled", labeled), ("unlabeled", unlabeled), ("test", test), ("val", val))}
    known = catalogue.all_cases()
    missing = {r: [i for i in ids if i not in known] for r, ids in roles.items()}
    missing = {r: ids for r, ids in missing.items() if ids}
    if missing:
        detail = "; ".join(f"{r}: {len(ids)} e.g. {ids[:5]}" for r, ids in missing.items())
        raise ConversionError(f"{origin}: listed cases not found in the raw data ({detail})")
    no_label = [i for i in roles["labeled"] + roles["val"] if known[i].label is None]
    if no_label:
        raise ConversionError(f"{origin}: labeled/val cases without a label in the raw data: {no_label[:10]}")
    used = {i for ids in roles.values() for i in ids}
    return RoleAssignment(roles["labeled"], roles["unlabeled"], roles["test"], roles["val"], origin, seed,
                          labeled_fraction, sorted(set(known) - used))


def check_groups(assignment: RoleAssignment, rules: DatasetRules) -> None:
    """No id in two roles, and (ACDC) no group such as a patient spread over two roles."""
    group_of = rules.group_of or (lambda i: i)
    role_of: dict[str, str] = {}
    seen: dict[str, str] = {}
    for role in ("labeled", "unlabeled", "test", "val"):
        for case in getattr(assignment, role):
            if case in seen:
                raise ConversionError(f"case '{case}' is in both '{seen[case]}' and '{role}'")
            seen[case] = role
            g = group_of(case)
            if role_of.setdefault(g, role) != role:
                raise ConversionError(f"{rules.unit[:-1]} '{g}' has cases in both '{role_of[g]}' and '{role}'")


def assign_roles(catalogue: Catalogue, rules: DatasetRules, options: SplitOptions) -> RoleAssignment:
    if not catalogue.labeled and not catalogue.test and not catalogue.unlabeled:
        raise ConversionError(f"no {rules.fmt.name} cases found")
    if options.split == "paper":
        if rules.paper_split is None:
            raise ConversionError(f"--split paper: no published split is available for {rules.fmt.name}")
        paper = rules.paper_split(find_splits_dir(options.splits_dir), options)
        assignment = _roles_from_lists(catalogue, rules, paper.labeled, paper.unlabeled, paper.test, paper.val,
                                       paper.origin, None, paper.labeled_fraction)
    elif options.split == "file":
        assignment = _file_roles(catalogue, rules, options)
    else:
        if not catalogue.labeled:
            raise ConversionError(f"no labeled {rules.fmt.name} training cases found")
        assignment = _random_roles(catalogue, rules, options)
    if not assignment.labeled:
        raise ConversionError("the split has no labeled case")
    check_groups(assignment, rules)
    return assignment


# ----------------------------------------------------------------------------------------------- the whole dataset


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


# ----------------------------------------------------------------------------------------------- CLI glue


@dataclass(frozen=True)
class DatasetCommand:
    """How ``nnssl_convert`` exposes one dataset: its sub-command name, default folder name, help text, published
    splits (``papers``, the first is the default of ``--paper``), extra arguments and the conversion call."""

    name: str
    default_dataset_name: str
    summary: str
    convert: Callable[..., SSLSplit]  # convert_<dataset>(raw_dir, output_dir, options, **keyword_arguments)
    papers: tuple[str, ...] = ()
    add_arguments: Callable[..., None] | None = None
    keyword_arguments: tuple[str, ...] = ()  # the dests of add_arguments' options, passed on to convert
    description: str = ""

    def run(self, args, output_dir: Path, options: ConversionOptions) -> SSLSplit:
        """Convert ``args.raw_dir`` as the parsed command line asks."""
        return self.convert(args.raw_dir, output_dir, options, **{k: getattr(args, k) for k in self.keyword_arguments})
