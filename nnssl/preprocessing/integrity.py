"""Checks of the raw files before nnU-Net or nnssl preprocess them, and the record that ties a preprocessed folder
to the split it was made from.

Every check raises an :class:`nnssl.errors.InputError` (or its :class:`~nnssl.errors.DataFileError`) whose message
names the file(s) and the problem, before anything is written:

- :func:`check_channel_files`: every ``CASE_XXXX<ending>`` in an image folder has a channel index below the number
  of channels in dataset.json, and every case has all its channel files;
- :func:`verify_files`: each file decodes completely (:func:`nnssl.verify.verify_image_file`);
- :func:`check_labeled_cases`: each labeled case (image channels + label) as nnU-Net will read it: label values
  within dataset.json's labels, no NaN, label shape = image shape, spacing/origin/direction equal within nnU-Net's
  tolerance (``np.allclose``), the expected number of channels.

Why not nnU-Net's ``verify_dataset_integrity`` (which checks most of the same things): it reports each problem
with ``print`` and then raises a ``RuntimeError``/``AssertionError`` that says "check the text output above" (no file
name in the error itself), only *warns* about an origin/direction mismatch between image and label (the label is
then silently misaligned), and starts a ``spawn`` pool of ``num_processes`` workers that each re-import nnU-Net even
for three cases. The checks here read the files with the same nnU-Net reader class (so shapes and spacings are
the ones nnU-Net's fingerprint sees), use nnU-Net's ``LabelManager`` for the allowed label values, and apply the same
``np.allclose`` tolerance; a pool is used only for large datasets.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnssl.errors import InputError
from nnssl.verify import verify_image_file

FINGERPRINT_SOURCE_FILE = "nnssl_fingerprint_source.json"
# below this many files the checks run in this process: a spawn pool costs seconds to start
_POOL_THRESHOLD = 16
_MAX_LISTED = 5


def _pool_map(function, jobs: list, num_processes: int) -> list:
    if num_processes <= 1 or len(jobs) < _POOL_THRESHOLD:
        return [function(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def _raise_collected(problems: list[str], what: str) -> None:
    if not problems:
        return
    more = f" (and {len(problems) - _MAX_LISTED} more {what})" if len(problems) > _MAX_LISTED else ""
    raise InputError("; ".join(problems[:_MAX_LISTED]) + more)


# ----------------------------------------------------------------------------------------------- channel files


def check_channel_files(folder: Path, cases: Iterable[str], n_channels: int, file_ending: str) -> dict[str, list[str]]:
    """The channel files of ``cases`` in ``folder`` (``{case: [CASE_0000<ending>, ...]}``).

    Raises :class:`InputError` naming the file when a case lacks a channel, or when any file in ``folder`` that ends
    with ``file_ending`` is not ``CASE_XXXX<ending>`` with ``XXXX`` below ``n_channels`` (nnU-Net would read a
    ``_0001`` file of a 1-channel dataset as a second channel, or cut a name without channel digits arbitrarily).
    """
    folder = Path(folder)
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    problems: list[str] = []
    if folder.is_dir():
        for name in sorted(os.listdir(folder)):
            if not name.endswith(file_ending):
                continue
            m = pattern.fullmatch(name)
            if m is None:
                problems.append(f"{folder / name}: not named CASE_XXXX{file_ending} (XXXX = 4-digit channel index)")
            elif int(m.group(2)) >= n_channels:
                problems.append(f"{folder / name}: channel {m.group(2)}, but dataset.json lists {n_channels} "
                                f"channel(s) (_0000{'' if n_channels == 1 else f'.._{n_channels - 1:04d}'})")
    files = {}
    for case in cases:
        fs = [folder / f"{case}_{c:04d}{file_ending}" for c in range(n_channels)]
        missing = [str(f) for f in fs if not f.is_file()]
        if missing:
            problems.append(f"case '{case}': channel file(s) missing: {', '.join(missing)} (dataset.json lists "
                            f"{n_channels} channel(s))")
        files[case] = [str(f) for f in fs]
    _raise_collected(problems, "problems with channel files")
    return files


# ----------------------------------------------------------------------------------------------- complete decoding


def _verify_one(path: str) -> str | None:
    from nnssl.errors import DataFileError

    try:
        verify_image_file(path)
    except DataFileError as e:
        return str(e)
    return None


def verify_files(paths: Sequence[str | os.PathLike], num_processes: int = 1) -> None:
    """:func:`nnssl.verify.verify_image_file` on every file (in a pool for many files); one error naming all the
    files that fail."""
    from nnssl.errors import DataFileError

    results = _pool_map(_verify_one, [str(p) for p in paths], num_processes)
    problems = [r for r in results if r is not None]
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more corrupt files)" if len(problems) > _MAX_LISTED else ""
        raise DataFileError("; ".join(problems[:_MAX_LISTED]) + more)


# ----------------------------------------------------------------------------------------------- labeled cases


def expected_label_values(dataset_json: dict) -> list[int]:
    """The label values a label file may hold: dataset.json's labels (and the ignore label), via nnU-Net."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        manager = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    except Exception as e:  # noqa: BLE001 - nnU-Net asserts on malformed label dicts
        raise InputError(f"dataset.json 'labels' is not valid for nnU-Net: {e}") from e
    values = list(manager.all_labels)
    if manager.has_ignore_label:
        values.append(manager.ignore_label)
    return sorted(int(v) for v in values)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _check_case(job: tuple) -> str | None:
    """One labeled case as nnU-Net reads it; returns the problem (naming the files) or None."""
    image_files, label_file, reader_name, expected, n_channels = job
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    rw = recursive_find_reader_writer_by_name(reader_name)()
    image_desc = image_files[0] if len(image_files) == 1 else f"{image_files[0]} (+{len(image_files) - 1} channels)"
    try:
        images, props_image = rw.read_images(image_files)
    except Exception as e:  # noqa: BLE001 - a reader error on a user file is a user error; name the files
        return f"{', '.join(image_files)}: nnU-Net's {reader_name} cannot read the image(s): {_last_line(e)}"
    try:
        seg, props_seg = rw.read_seg(label_file)
    except Exception as e:  # noqa: BLE001
        return f"{label_file}: nnU-Net's {reader_name} cannot read the label: {_last_line(e)}"
    if len(images) != n_channels:
        return f"{image_desc}: {len(images)} channel(s) read, dataset.json lists {n_channels}"
    if images.shape[1:] != seg.shape[1:]:
        return (f"{label_file}: label size {tuple(seg.shape[1:])} differs from the size {tuple(images.shape[1:])} "
                f"of its image {image_desc} (array order, z y x)")
    if not np.allclose(props_image["spacing"], props_seg["spacing"]):
        return (f"{label_file}: label spacing {_fmt(props_seg['spacing'])} differs from the spacing "
                f"{_fmt(props_image['spacing'])} of its image {image_desc}")
    for key in ("origin", "direction"):
        a = props_image.get("sitk_stuff", {}).get(key)
        b = props_seg.get("sitk_stuff", {}).get(key)
        if a is not None and b is not None and not np.allclose(a, b):
            return f"{label_file}: label {key} {_fmt(b)} differs from the {key} {_fmt(a)} of its image {image_desc}"
    affine_a = props_image.get("nibabel_stuff", {}).get("original_affine")
    affine_b = props_seg.get("nibabel_stuff", {}).get("original_affine")
    if affine_a is not None and affine_b is not None and not np.allclose(affine_a, affine_b):
        return f"{label_file}: label affine differs from the affine of its image {image_desc}"
    if np.isnan(images).any():
        return f"{image_desc}: the image holds NaN voxels; replace them with a meaningful value"
    found = np.unique(seg)
    if np.isnan(found).any():
        return f"{label_file}: the label holds NaN voxels"
    unexpected = [v for v in found.tolist() if v not in expected]
    if unexpected:
        shown = ", ".join(f"{v:g}" for v in unexpected[:10])
        return (f"{label_file}: label value(s) {shown} not in dataset.json labels {expected} "
                f"(image {image_desc})")
    return None


def _last_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines or [type(e).__name__])[-1][:300]


def check_labeled_cases(cases: dict[str, tuple[list[str], str]], dataset_json: dict, num_processes: int = 1,
                        what: str = "labeled") -> None:
    """``cases``: ``{case: (image files, label file)}``. Every file decodes completely, then each case is read with
    nnU-Net's reader class for this dataset and checked (see the module docstring). Raises :class:`InputError`
    naming the files."""
    if not cases:
        return
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    missing = [f"{what} case '{c}': {f} not found" for c, (imgs, lab) in cases.items() for f in [*imgs, lab]
               if not os.path.isfile(f)]
    _raise_collected(missing, "missing files")
    verify_files([f for imgs, lab in cases.values() for f in [*imgs, lab]], num_processes)
    example = next(iter(cases.values()))[0][0]
    try:
        reader = determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)
    except Exception as e:  # noqa: BLE001 - nnU-Net raises a RuntimeError when no reader fits
        raise InputError(f"{example}: no nnU-Net reader can read this file ({_last_line(e)})") from e
    expected = expected_label_values(dataset_json)
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    jobs = [(list(imgs), lab, reader.__name__, expected, n_channels) for imgs, lab in cases.values()]
    results = _pool_map(_check_case, jobs, num_processes)
    _raise_collected([r for r in results if r is not None], f"problems in {what} cases")


# ----------------------------------------------------------------------------------------------- fingerprint source


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint_source(raw_dir: Path, labeled: dict[str, dict], roles: dict[str, list[str]] | None) -> dict:
    """What nnU-Net's fingerprint of ``raw_dir`` is computed from: the labeled case ids, their image and label
    files (name, size, modification time) and dataset.json. ``roles`` (the split file's lists) is recorded for
    information; only what the fingerprint reads enters ``hash``, so adding unlabeled cases does not force a new
    fingerprint while any change of the labeled cases or their files does."""
    files = []
    for case in sorted(labeled):
        for f in [*labeled[case]["images"], labeled[case]["label"]]:
            st = os.stat(f)
            files.append([os.path.relpath(f, raw_dir), st.st_size, st.st_mtime_ns])
    dataset_json = (raw_dir / "dataset.json").read_bytes()
    content = {"labeled": sorted(labeled), "files": files,
               "dataset_json_sha256": hashlib.sha256(dataset_json).hexdigest()}
    return {"hash": _sha256(content), "labeled": sorted(labeled), "n_files": len(files),
            "roles": roles, "files_sha256": _sha256(files)}


def stored_fingerprint_source(pp_dir: Path) -> dict | None:
    path = Path(pp_dir) / FINGERPRINT_SOURCE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
