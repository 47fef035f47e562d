"""Tiny synthetic look-alikes of the public datasets' raw layouts (docs/datasets.md), for the converter tests.

Arrays are small (about 8x16x16 voxels) but file names, folder names and quirks are the real ones: FLARE22's
``_0000`` suffixes and zipped halves, AMOS's imagesVa and unlabeled zips, ACDC's Info.cfg frame numbers, LA's
``Training Set`` with a space, 0/255 labels and ``mri_norm2.h5``, BUSI's ``benign (3)_mask_1.png``, BTCV's
``img0001``/``label0001``, NIH Pancreas-CT DICOM series with labels stored in another orientation.
Every writer returns what a test needs to check geometry: ``{case id: (image path, label path or None)}``.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image

SHAPE = (8, 16, 16)  # z, y, x
SPACING = (0.8, 0.75, 2.5)  # x, y, z (SimpleITK order)
FLIPPED = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # a non-identity direction to check geometry preservation


def volume(seed: int, shape: tuple[int, ...] = SHAPE, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-200, 300, size=shape).astype(dtype)


def label_map(seed: int, values: Sequence[int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Background with one box per value, so every listed value occurs."""
    rng = np.random.default_rng(seed + 10_000)
    lab = np.zeros(shape, dtype=np.uint8)
    for v in values:
        corner = [int(rng.integers(0, max(1, s - 3))) for s in shape]
        lab[tuple(slice(c, c + 3) for c in corner)] = v
    return lab


def write_image(path: Path, arr: np.ndarray, spacing=SPACING, origin=(10.0, -20.0, 5.0), direction=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: arr.ndim])
    img.SetOrigin(origin[: arr.ndim])
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def write_pair(image: Path, label: Path | None, seed: int, values: Sequence[int], label_scale: int = 1,
               **geometry) -> tuple[Path, Path | None]:
    write_image(image, volume(seed), **geometry)
    if label is not None:
        write_image(label, label_map(seed, values) * np.uint8(label_scale), **geometry)
    return image, label


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip ``folder`` (members keep the folder name as prefix) and delete the folder."""
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder.parent).as_posix())
    for f in sorted(folder.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    folder.rmdir()
    return archive


# ----------------------------------------------------------------------------------------------- FLARE22


def make_flare22(root: Path, n_labeled: int = 4, n_unlabeled: int = 3, n_tuning: int = 2,
                 zipped_unlabeled: bool = False, labeled_folder: str = "FLARE22_LabeledCase50") -> dict:
    cases = {}
    tr = root / "Training" / labeled_folder
    for i in range(1, n_labeled + 1):
        cid = f"FLARE22_Tr_{i:04d}"
        cases[cid] = write_pair(tr / "images" / f"{cid}_0000.nii.gz", tr / "labels" / f"{cid}.nii.gz", i,
                                [1, 4, 13], direction=FLIPPED)
    half = root / "Training" / "FLARE22_UnlabeledCase1-1000"
    for i in range(1, n_unlabeled + 1):
        cid = f"Case_{i:05d}"
        cases[cid] = (write_image(half / f"{cid}_0000.nii.gz", volume(100 + i)), None)
    if zipped_unlabeled:
        zip_folder(half, root / "Training" / "FLARE22_UnlabeledCase1-1000.zip")
    for i in range(1, n_tuning + 1):
        cid = f"FLARETs_{i:04d}"
        cases[cid] = write_pair(root / "Tuning" / "images" / f"{cid}_0000.nii.gz",
                                root / "Tuning" / "labels" / f"{cid}.nii.gz", 200 + i, [2, 3])
    write_image(root / "Testing" / "FLARETs_0001_0000.nii.gz", volume(999))  # hidden-label test: not converted
    return cases


# ----------------------------------------------------------------------------------------------- AMOS


def make_amos(root: Path, tr_ids=(1, 4, 5, 6, 507), va_ids=(8, 13, 544), unlabeled_ids=(5000, 5001),
              va_labels: bool = True) -> dict:
    base = root / "amos22"
    cases = {}
    for ids, img_dir, lab_dir in ((tr_ids, "imagesTr", "labelsTr"), (va_ids, "imagesVa", "labelsVa")):
        for i in ids:
            cid = f"amos_{i:04d}"
            lab = base / lab_dir / f"{cid}.nii.gz" if (img_dir == "imagesTr" or va_labels) else None
            cases[cid] = write_pair(base / img_dir / f"{cid}.nii.gz", lab, i, [1, 8, 15])
    write_image(base / "imagesTs" / "amos_0002.nii.gz", volume(2))  # no labels: not converted
    (base / "dataset.json").write_text('{"labels": {"0": "background", "8": "arota"}}')
    if unlabeled_ids:
        inner = root / "tmp_unlabeled" / "amos_unlabeled_ct_5000_5399"
        for i in unlabeled_ids:
            cases[f"amos_{i:04d}"] = (write_image(inner / f"amos_{i:04d}.nii.gz", volume(i)), None)
        zip_folder(inner, root / "amos22_unlabeled_ct_5000_5399.zip")
        (root / "tmp_unlabeled").rmdir()
    return cases


# ----------------------------------------------------------------------------------------------- ACDC


def make_acdc(root: Path, n_patients: int = 6, n_testing: int = 0, database: bool = True) -> dict:
    """Patients with ED = frame 1 and ES = frame (8 + patient % 5), plus a 4D cine file that must be ignored."""
    base = root / "database" if database else root
    cases = {}
    for p in range(1, n_patients + n_testing + 1):
        part = "training" if p <= n_patients else "testing"
        pid = f"patient{p:03d}"
        folder = base / part / pid
        ed, es = 1, 8 + p % 5
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
        spacing = (1.5, 1.5, 10.0)
        for phase, frame in (("ED", ed), ("ES", es)):
            stem = f"{pid}_frame{frame:02d}"
            cases[f"{pid}_{phase}"] = write_pair(folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz",
                                                 p * 10 + frame, [1, 2, 3], spacing=spacing)
        four_d = sitk.JoinSeries([sitk.GetImageFromArray(volume(p))] * 3)
        sitk.WriteImage(four_d, str(folder / f"{pid}_4d.nii.gz"))
    return cases


# ----------------------------------------------------------------------------------------------- LA


LA_IDS = ("06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PFNARO469W",
          "1MHBF3G6DCPWHSKG7XCP", "UPT6DX9IQY9JAZ7HJKA7", "UTBUJIWZMKP64E3N73YC")


def make_la(root: Path, ids: Sequence[str] = LA_IDS, folder: str = "Training Set", h5: bool = False) -> dict:
    cases = {}
    for i, cid in enumerate(ids):
        case_dir = root / folder / cid
        case_dir.mkdir(parents=True, exist_ok=True)
        if h5:
            import h5py

            with h5py.File(case_dir / "mri_norm2.h5", "w") as f:  # pynrrd (x, y, z) order, z-scored, 0/1 label
                f.create_dataset("image", data=volume(i).astype(np.float32).transpose(2, 1, 0) / 100.0)
                f.create_dataset("label", data=label_map(i, [1]).transpose(2, 1, 0))
            cases[cid] = (case_dir / "mri_norm2.h5", case_dir / "mri_norm2.h5")
        else:
            cases[cid] = write_pair(case_dir / "lgemri.nrrd", case_dir / "laendo.nrrd", i, [1], label_scale=255,
                                    spacing=(0.625, 0.625, 0.625))
    (root / folder / ids[0] / "desktop.ini").write_text("[.ShellClassInfo]\n")
    return cases


# ----------------------------------------------------------------------------------------------- BUSI


def _png(path: Path, arr: np.ndarray, mode: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_busi(root: Path, counts: dict[str, int] | None = None, layout: str = "kaggle") -> dict:
    """Kaggle layout (RGB images, ``_mask`` + ``_mask_1`` for ``benign (2)``) or MGCC's ``label/images`` +
    ``label/masks/0`` (with a decoy ``images/`` folder without masks)."""
    counts = counts or {"benign": 3, "malignant": 2, "normal": 2}
    cases = {}
    for cls, n in counts.items():
        for i in range(1, n + 1):
            name = f"{cls} ({i})"
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            shape = (20 + i, 24)
            grey = rng.integers(0, 256, size=shape).astype(np.uint8)
            mask = np.zeros(shape, dtype=np.uint8)
            if cls != "normal":
                mask[2:6, 3:9] = 255
            if layout == "kaggle":
                img = _png(root / "Dataset_BUSI_with_GT" / cls / f"{name}.png", grey, "RGB")
                masks = [_png(root / "Dataset_BUSI_with_GT" / cls / f"{name}_mask.png", mask, "L")]
                if name == "benign (2)":
                    extra = np.zeros(shape, dtype=np.uint8)
                    extra[10:14, 10:20] = 255
                    masks.append(_png(root / "Dataset_BUSI_with_GT" / cls / f"{name}_mask_1.png", extra, "RGBA"))
            else:
                img = _png(root / "data" / "busi" / "label" / "images" / f"{name}.png", grey, "L")
                masks = [_png(root / "data" / "busi" / "label" / "masks" / "0" / f"{name}.png", mask, "L")]
                _png(root / "data" / "busi" / "images" / f"{name}.png", grey, "L")
            cases[name.replace(" (", "_").rstrip(")")] = (img, masks)
    return cases


# ----------------------------------------------------------------------------------------------- Synapse


def make_synapse(root: Path, ids: Sequence[int] = (1, 2, 3, 4, 5, 21), layout: str = "rawdata") -> dict:
    cases = {}
    for i in ids:
        if layout == "rawdata":
            img, lab = (root / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz",
                        root / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz")
        else:
            img, lab = root / "imagesTr" / f"img{i:04d}.nii.gz", root / "labelsTr" / f"label{i:04d}.nii.gz"
        cases[f"synapse_{i:04d}"] = write_pair(img, lab, i, [1, 10, 13])
    if layout == "rawdata":
        write_image(root / "RawData" / "Testing" / "img" / "img0061.nii.gz", volume(61))
    return cases


# ----------------------------------------------------------------------------------------------- Pancreas-CT


def write_dicom_series(folder: Path, arr: np.ndarray, spacing=(0.7, 0.7, 1.5), origin=(-100.0, -120.0, 30.0)) -> None:
    """A minimal CT series, one file per slice, positions along +z (the usual SimpleITK recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = f"1.2.826.0.1.3680043.2.1125.{zlib.crc32(str(folder).encode())}"
    for z in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[z])
        sl.SetSpacing(spacing[:2])
        tags = {
            "0008|0060": "CT", "0020|000d": series_uid + ".1", "0020|000e": series_uid,
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(str(v) for v in
                                                                   (origin[0], origin[1], origin[2] + z * spacing[2])),
            "0020|0013": str(z + 1), "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
            "0008|0018": f"{series_uid}.{z + 1}",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"1-{z + 1:03d}.dcm"))
        writer.Execute(sl)


def make_pancreas(root: Path, ids: Sequence[int] = (1, 2, 3, 4, 5), dicom: bool = True,
                  label_orientation: str = "LPI") -> dict:
    """DICOM (or NIfTI) images and TCIA NIfTI labels; labels stored with another axis orientation
    (``label_orientation``) on the same physical grid, as TCIA's labels often are."""
    cases = {}
    for i in ids:
        arr = volume(i)
        if dicom:
            series = root / "Pancreas-CT" / f"PANCREAS_{i:04d}" / "11-24-2015-PANCREAS0001-Pancreas-52145" / "Pancreas"
            write_dicom_series(series, arr)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
            image = reader.Execute()
            image_path = series
        else:
            image_path = write_image(root / "data" / f"PANCREAS_{i:04d}.nii.gz", arr)
            image = sitk.ReadImage(str(image_path))
        label = sitk.GetImageFromArray(label_map(i, [1]))
        label.CopyInformation(image)
        label_path = root / "TCIA_pancreas_labels-02-05-2017" / f"label{i:04d}.nii.gz"
        label_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.DICOMOrient(label, label_orientation), str(label_path))
        cases[f"pancreas_{i:04d}"] = (image_path, label_path)
    return cases


# ----------------------------------------------------------------------------------------------- published lists


def write_list(path: Path, ids: Sequence[str], crlf: bool = False, final_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sep = "\r\n" if crlf else "\n"
    path.write_bytes((sep.join(ids) + (sep if final_newline else "")).encode())
    return path


# ----------------------------------------------------------------------------------------------- checks


def script(name: str) -> str:
    """The console script installed next to the running interpreter (works without an activated venv)."""
    import shutil
    import sys

    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_cli(name: str, args: Sequence[str], nnunet_raw: Path, extra_env: dict | None = None):
    import os
    import subprocess

    env = {**os.environ, "nnUNet_raw": str(nnunet_raw)}
    env.pop("NNSSL_SPLITS_DIR", None)  # tests choose the published-lists folder explicitly
    env.update(extra_env or {})
    return subprocess.run([script(name), *map(str, args), *(["--no-progress"] if name == "nnssl_convert" else [])],
                          env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def convert(dataset: str, raw_dir: Path, nnraw: Path, *args, ok: bool = True, dataset_id: int = 501):
    """``nnssl_convert DATASET RAW -d ID`` into ``nnraw``; asserts success unless ``ok`` is False."""
    result = run_cli("nnssl_convert", [dataset, raw_dir, "-d", dataset_id, "-np", 1, *args], nnraw)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def assert_nothing_written(nnunet_raw: Path) -> None:
    """A failed conversion leaves neither a dataset folder nor a hidden partial one."""
    left = sorted(p.name for p in nnunet_raw.iterdir()) if nnunet_raw.exists() else []
    assert left == [], left


def read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def assert_consistent_dataset(folder: Path) -> dict:
    """Contract checks every converted dataset must pass; returns ssl_split.json as a dict.

    Strict split validation (every case on disk listed in its role, numTraining = labeled count); labelsTr holds
    exactly the labeled cases (no leakage of withheld labels); labelsUnlabeled only unlabeled ids; each label is
    uint8 with values from dataset.json and shares its image's voxel grid.
    """
    from nnssl.split import load_and_validate

    split = load_and_validate(folder, strict=True)
    dj = read_json(folder / "dataset.json")
    ending = dj["file_ending"]
    assert dj["numTraining"] == len(split.labeled)

    def ids(sub: str) -> set[str]:
        d = folder / sub
        return {p.name[: -len(ending)] for p in d.iterdir()} if d.is_dir() else set()

    assert ids("labelsTr") == set(split.labeled)
    assert ids("labelsUnlabeled") <= set(split.unlabeled)
    assert not (ids("labelsTr") & set(split.unlabeled))
    allowed = set(dj["labels"].values())
    for lab_dir, img_dir in (("labelsTr", "imagesTr"), ("labelsUnlabeled", "imagesUnlabeled"), ("labelsTs", "imagesTs"),
                             ("labelsVal", "imagesVal")):
        for case in ids(lab_dir):
            lab = sitk.ReadImage(str(folder / lab_dir / f"{case}{ending}"))
            img = sitk.ReadImage(str(folder / img_dir / f"{case}_0000{ending}"))
            assert lab.GetPixelID() == sitk.sitkUInt8
            assert set(np.unique(sitk.GetArrayViewFromImage(lab)).tolist()) <= allowed
            assert lab.GetSize() == img.GetSize()
            assert np.allclose(lab.GetSpacing(), img.GetSpacing()) and np.allclose(lab.GetOrigin(), img.GetOrigin())
            assert np.allclose(lab.GetDirection(), img.GetDirection())
    return read_json(folder / "ssl_split.json")
