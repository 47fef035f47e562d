"""The images the latent diffusion model trains on, and the way from its outputs back to raw intensities.

Training images are the dataset's training cases, read with nnU-Net's reader of the dataset (``image_reader_writer``
of the plans: PNG, NIfTI, ...) and run through the configuration's own preprocessor (transpose, crop to non-zero,
resampling to its spacing, its normalisation): the labeled cases of ``imagesTr`` and the unlabeled ones of
``imagesUnlabeled``, by their ids in ``ssl_split.json``, without the cases generated earlier (provenance
``generated``), so that the model never learns from its own output. Nothing else is read: not ``imagesTs``, not
``imagesVal``, no label.

Images are trained on and generated at one size, the configuration's patch size rounded up to what both networks
can downsample (:meth:`LDMSettings.downsampling`): larger images are cropped (at random in training), smaller ones
padded with their minimum. Generated images are cropped back to the patch size.

:class:`IntensityMap` maps the normalised values back to the raw range by quantile matching per channel (the
pooled normalised values of the training images against their pooled raw values): monotone, exact for a global
affine normalisation (CT), an average inverse for per-image z-scoring, and never outside the raw range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnssl.errors import InputError
from nnssl.split import SSLSplit

MIN_TRAINING_IMAGES = 8
GENERATED = "generated"
N_QUANTILES = 1001
_VALUES_PER_CASE = 20000


def generated_case_ids(split: SSLSplit) -> set[str]:
    """Ids whose provenance in ssl_split.json is ``generated``."""
    provenance = split.extra.get("provenance", {})
    return {k for k, v in provenance.items() if isinstance(v, dict) and v.get("source") == GENERATED}


def training_case_files(raw_dir: Path, split: SSLSplit, dataset_json: dict) -> dict[str, list[Path]]:
    """``{case id: channel files}`` of the real training cases (labeled + unlabeled, not generated)."""
    from nnssl.preprocessing.unlabeled import unlabeled_image_files

    generated = generated_case_ids(split)
    n_channels, ending = len(dataset_json["channel_names"]), dataset_json["file_ending"]
    files = {c: [raw_dir / "imagesTr" / f"{c}_{i:04d}{ending}" for i in range(n_channels)] for c in split.labeled}
    unlabeled = [c for c in split.unlabeled if c not in generated]
    unlabeled_files = unlabeled_image_files(raw_dir, unlabeled, dataset_json)
    files.update({c: [Path(p) for p in ps] for c, ps in unlabeled_files.items()})
    allowed = {(raw_dir / "imagesTr").resolve(), (raw_dir / "imagesUnlabeled").resolve()}
    for case, paths in files.items():
        for p in paths:
            if p.resolve().parent not in allowed:  # never a test or validation image, whatever the split says
                raise InputError(f"{p}: case '{case}' is not in imagesTr or imagesUnlabeled; refusing to train on it")
    return files


def check_enough_images(n: int, dataset: str) -> None:
    if n < MIN_TRAINING_IMAGES:
        raise InputError(f"{dataset} has {n} training image(s) (labeled + unlabeled, generated ones not counted); "
                         f"the diffusion model needs at least {MIN_TRAINING_IMAGES}")


def check_configuration(plans: dict, configuration: str, dataset: str) -> None:
    """Only 2D configurations of 2D datasets: a clear refusal otherwise."""
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise InputError(f"-c {configuration}: not in the plans of {dataset}; available: {sorted(configurations)}")
    patch_size = configurations[configuration].get("patch_size")
    if patch_size is None:  # inherits it from another configuration
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        patch_size = PlansManager(plans).get_configuration(configuration).patch_size
    if len(patch_size) != 2:
        raise InputError(f"-c {configuration}: a 3D configuration; nnssl generates 2D images only (-c 2d of a 2D "
                         f"dataset); 3D generation is not implemented")
    shape = plans.get("original_median_shape_after_transp", [1])
    if shape[0] != 1:
        raise InputError(f"-c {configuration}: {dataset} holds 3D images (median shape {list(shape)}); generated 2D "
                         f"slices cannot be added to a 3D dataset as cases, and 3D generation is not implemented")


@dataclass
class IntensityMap:
    """Per channel: ``norm_quantiles[c]`` -> ``raw_quantiles[c]`` (monotone), whether raw values are integers."""

    norm_quantiles: np.ndarray
    raw_quantiles: np.ndarray
    integer: bool

    @classmethod
    def fit(cls, norm_values: list[np.ndarray], raw_values: list[np.ndarray]) -> IntensityMap:
        q = np.linspace(0, 1, N_QUANTILES)
        norm = np.stack([np.quantile(v, q) for v in norm_values])
        raw = np.stack([np.quantile(v, q) for v in raw_values])
        integer = all(np.array_equal(v, np.round(v)) for v in raw_values)
        return cls(np.maximum.accumulate(norm, axis=1), raw, integer)

    def to_raw(self, image: np.ndarray) -> np.ndarray:
        """``(C, ...)`` normalised -> raw intensities (rounded when the raw images are integer-valued)."""
        out = np.stack([np.interp(image[c], self.norm_quantiles[c], self.raw_quantiles[c])
                        for c in range(image.shape[0])])
        return np.round(out) if self.integer else out.astype(np.float32)

    def to_dict(self) -> dict:
        return {"norm_quantiles": self.norm_quantiles.tolist(), "raw_quantiles": self.raw_quantiles.tolist(),
                "integer": self.integer}


@dataclass
class TrainingImages:
    case_ids: list[str]
    images: list[np.ndarray]  # (C, H, W) float32, normalised, at the configuration's spacing
    intensity: IntensityMap
    spacing: tuple[float, ...]  # the configuration's (in-plane) spacing
    out_of_plane_spacing: float  # median of the raw cases (written into 2D NIfTI images)
    raw_shapes: list[tuple[int, ...]] = field(default_factory=list)


def load_training_images(files: dict[str, list[Path]], plans: dict, configuration: str, dataset_json: dict,
                         progress: bool = True) -> TrainingImages:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    reader = pm.image_reader_writer_class()
    preprocessor = cm.preprocessor_class(verbose=False)
    rng = np.random.default_rng(0)
    images, shapes, spacings, norm_values, raw_values = [], [], [], [], []
    for case, paths in tqdm(files.items(), desc="reading training images", unit="case", disable=not progress):
        raw, props = reader.read_images([str(p) for p in paths])
        spacings.append(props["spacing"][0])
        raw_pick = rng.choice(raw[0].size, min(raw[0].size, _VALUES_PER_CASE), replace=False)
        raw_values.append([raw[c].ravel()[raw_pick] for c in range(raw.shape[0])])
        data, _, _ = preprocessor.run_case_npy(raw.copy(), None, props, pm, cm, dataset_json)
        if data.shape[1] != 1:
            raise InputError(f"{paths[0]}: {data.shape[1]} slices; nnssl generates 2D images of 2D datasets only")
        image = np.ascontiguousarray(data[:, 0], dtype=np.float32)
        pick = rng.choice(image[0].size, min(image[0].size, _VALUES_PER_CASE), replace=False)
        norm_values.append([image[c].ravel()[pick] for c in range(image.shape[0])])
        images.append(image)
        shapes.append(tuple(int(s) for s in image.shape[1:]))
    n_channels = images[0].shape[0]
    intensity = IntensityMap.fit([np.concatenate([v[c] for v in norm_values]) for c in range(n_channels)],
                                 [np.concatenate([v[c] for v in raw_values]) for c in range(n_channels)])
    return TrainingImages(list(files), images, intensity, tuple(float(s) for s in cm.spacing),
                          float(np.median(spacings)), shapes)


def work_size(patch_size: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """The patch size rounded up to a multiple of ``factor``."""
    return tuple(int(math.ceil(s / factor) * factor) for s in patch_size)


def fit_size(image: np.ndarray, size: tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """Crop (random with ``rng``, else centred) or pad (with the channel's minimum) ``(C, H, W)`` to ``size``."""
    out = image
    for axis, target in enumerate(size, start=1):
        n = out.shape[axis]
        if n > target:
            start = int(rng.integers(0, n - target + 1)) if rng is not None else (n - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
        elif n < target:
            before = (target - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, target - n - before)
            out = np.stack([np.pad(ch, pad[1:], constant_values=ch.min()) for ch in out])
    return np.ascontiguousarray(out, dtype=np.float32)


def batches(images: list[np.ndarray], batch_size: int, size: tuple[int, ...], rng: np.random.Generator):
    """One epoch: every image once, shuffled, randomly cropped/padded to ``size``; ``(B, C, H, W)`` arrays."""
    order = rng.permutation(len(images))
    for start in range(0, len(order), batch_size):
        yield np.stack([fit_size(images[i], size, rng) for i in order[start:start + batch_size]])
