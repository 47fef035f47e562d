"""Complete decoding checks for every image and label that enters a dataset.

SimpleITK reads a ``.nii.gz`` whose gzip stream was cut short and fills the missing voxels with zeros, without an
error; PIL and GDCM can be similarly lenient. :func:`verify_image_file` therefore checks what the readers do not:

- gzip-compressed files (``.nii.gz``, ``.nrrd``/``.mha`` with gzip payload are checked by their reader): the whole
  stream is decompressed, which fails on a missing end-of-stream marker or a CRC mismatch;
- NIfTI: the decompressed byte count covers the header's voxel count (size x components x bytes per voxel) after
  its data offset;
- PNG/BMP/TIFF: PIL's structural ``verify()`` (chunk CRCs) and a full ``load()`` with truncated images refused;
- anything else SimpleITK reads: a full read, with the voxel count compared to the header's.

Each failure raises :class:`nnssl.errors.DataFileError` naming the file and the problem. Cost: one decompression
pass per file (about the cost of reading it), paid once when the file enters a dataset.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from nnssl.errors import DataFileError

NATURAL_IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
_CHUNK = 1 << 22


def _gzip_decompressed_size(path: Path, head: int = 0) -> tuple[int, bytes]:
    """Decompress the whole gzip stream; returns (decompressed byte count, its first ``head`` bytes)."""
    total, first = 0, b""
    try:
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                if len(first) < head:
                    first += block[: head - len(first)]
                total += len(block)
    except EOFError as e:
        raise DataFileError(f"{path}: truncated file: the gzip stream ends before its end marker ({e})") from e
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataFileError(f"{path}: corrupt gzip stream ({e})") from e
    return total, first


def _nifti_data_offset(header: bytes, path: Path) -> int:
    """Byte offset of the voxel data from a NIfTI-1/-2 header (either byte order)."""
    if len(header) < 348:
        raise DataFileError(f"{path}: truncated file: {len(header)} bytes, shorter than a NIfTI header")
    for order in ("<", ">"):
        sizeof_hdr = struct.unpack(order + "i", header[:4])[0]
        if sizeof_hdr == 348:
            return int(struct.unpack(order + "f", header[108:112])[0])
        if sizeof_hdr == 540:
            return int(struct.unpack(order + "q", header[168:176])[0])
    raise DataFileError(f"{path}: not a NIfTI file (header size field is neither 348 nor 540)")


def _expected_voxel_bytes(path: Path) -> tuple[int, tuple[int, ...]]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataFileError(f"{path}: unreadable image header ({_last_line(e)})") from e
    size = tuple(int(s) for s in reader.GetSize())
    n_bytes = int(np.prod(size)) * reader.GetNumberOfComponents() * _bytes_per_component(reader.GetPixelID())
    return n_bytes, size


def _bytes_per_component(pixel_id: int) -> int:
    import SimpleITK as sitk

    # the numpy view of a 1-pixel image has the component dtype, also for vector pixel types
    return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.itemsize)


def _last_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines or [type(e).__name__])[-1][:300]


def _verify_nifti(path: Path) -> None:
    expected, size = _expected_voxel_bytes(path)
    if path.name.lower().endswith(".gz"):
        total, header = _gzip_decompressed_size(path, head=540)
    else:
        total = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(540)
    offset = _nifti_data_offset(header, path)
    if total < offset + expected:
        raise DataFileError(f"{path}: truncated file: the header declares {size} voxels ({expected} bytes after "
                            f"byte {offset}) but the file holds only {max(0, total - offset)} bytes of voxel data")


def _verify_natural_image(path: Path) -> None:
    from PIL import Image, ImageFile, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global switch some code sets; it would hide exactly this problem
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; cannot verify images")
    try:
        with Image.open(path) as im:
            im.verify()  # chunk structure and CRCs
        with Image.open(path) as im:
            im.load()  # the pixel data, to the last byte
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataFileError(f"{path}: corrupt or truncated image ({e})") from e


def _verify_generic(path: Path) -> None:
    import SimpleITK as sitk

    _, size = _expected_voxel_bytes(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        _gzip_decompressed_size(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataFileError(f"{path}: unreadable or corrupt image file ({_last_line(e)})") from e
    if tuple(image.GetSize()) != size:
        raise DataFileError(f"{path}: the header declares size {size} but {image.GetSize()} voxels were read")


def verify_image_file(path: str | os.PathLike) -> None:
    """Raise :class:`DataFileError` unless ``path`` decodes completely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: empty file (0 bytes)")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _verify_nifti(path)
    elif name.endswith(NATURAL_IMAGE_SUFFIXES):
        _verify_natural_image(path)
    else:
        _verify_generic(path)
