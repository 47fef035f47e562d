"""Readers: one raw file (or a few) -> one SimpleITK image, decoded completely.

An :class:`ImageSource` reads one image channel or one label map and names its raw file(s) in ``str()`` for error
messages. :class:`SitkFile` reads anything SimpleITK reads (NIfTI, NRRD, MHA, ...), :class:`PngGray` a 2D image
PNG as 8-bit grayscale, :class:`PngMaskUnion` one or more binary mask PNGs merged into a 0/1 label. Every reader
decodes the raw file completely with :func:`verify_raw_file` (:func:`nnssl.verify.verify_image_file`), since
SimpleITK and PIL read a truncated file without an error and fill the missing voxels with zeros. Dataset-specific
readers (LA's h5 volumes, Pancreas-CT's DICOM series) live in their converters and follow the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from nnssl.errors import DataFileError
from nnssl.verify import verify_image_file

from .errors import ConversionError
from .raw_files import FileRef


class ImageSource(Protocol):
    """Reads one image (one channel) or one label map; ``str()`` names the raw file(s) for error messages."""

    def read(self) -> sitk.Image: ...


@dataclass(frozen=True)
class FileSource:
    """Base of the readers of one raw file ``ref``; ``str()`` names that file."""

    ref: FileRef

    def __str__(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class SitkFile(FileSource):
    """Any file SimpleITK reads (NIfTI, NRRD, MHA, ...); ``.nii.gz`` images are copied byte for byte."""

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
class PngGray(FileSource):
    """A 2D image PNG (grayscale, RGB or RGBA) read as single-channel uint8."""

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
