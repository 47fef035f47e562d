"""Writing cases into the nnU-Net raw folders, in parallel, and dataset.json.

:data:`ROLE_FOLDERS` names the image and label folder of each role::

    labeled    imagesTr/, labelsTr/               (the only cases nnU-Net's fingerprint and plans see)
    unlabeled  imagesUnlabeled/, labelsUnlabeled/  (labels only for withheld labels of labeled data)
    test       imagesTs/, labelsTs/                (labels when the raw data has them)
    val        imagesVal/, labelsVal/              (a paper's validation cases, listed under ``val`` in
                                                    ssl_split.json; never used for training or testing)

:func:`output_paths` gives a case's output files in a role, :func:`write_case` reads, checks and writes one case
(``.nii.gz`` images are copied byte for byte, labels go onto the image grid as uint8), :func:`run_parallel` runs the
writes in worker processes with a progress bar and stops at the first error, :func:`write_dataset_json` writes
nnU-Net's dataset.json atomically.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import SimpleITK as sitk
from tqdm import tqdm

from nnssl.io import atomic_write_json

from .cases import Case, DatasetFormat, align_label, check_image, geometry_mismatch, label_to_uint8
from .errors import ConversionError
from .readers import SitkFile

ROLE_FOLDERS: dict[str, tuple[str, str]] = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
    "test": ("imagesTs", "labelsTs"),
    "val": ("imagesVal", "labelsVal"),
}


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
