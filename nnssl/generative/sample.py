"""Sampling: DDIM (``sample_steps`` steps, deterministic, eta 0) from the trained latent diffusion model through
``LatentDiffusionInferer.sample``, one seed per image, written as raw files of the dataset's format.

Image ``index`` of a model with seed ``S`` starts from the noise of ``torch.Generator().manual_seed(case_seed(S,
index))``, so an image is the same whether it is sampled alone or in a batch, in this run or after a restart.
Each finished case lies in the model's ``samples/`` folder: its normalised array (``CASE.npy``, for the report) and
its raw channel files ``CASE_0000<ending>`` ..., each written under a temporary name and moved into place, the last
channel last; a case counts as done when all its channel files exist, so a killed run keeps what it finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data import IntensityMap, fit_size
from .settings import LDMSettings

NATURAL_IMAGE_FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF"}


def case_seed(seed: int, index: int) -> int:
    return seed * 1_000_000 + index


def build_sample_scheduler(s: LDMSettings):
    from monai.networks.schedulers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=s.train_timesteps, schedule=s.beta_schedule,
                              beta_start=s.beta_start, beta_end=s.beta_end, clip_sample=False)
    scheduler.set_timesteps(s.sample_steps)
    return scheduler


@torch.no_grad()
def sample_normalised(ae: torch.nn.Module, unet: torch.nn.Module, scale_factor: float, s: LDMSettings,
                      latent_shape: Sequence[int], seeds: Sequence[int], device: torch.device) -> np.ndarray:
    """``(len(seeds), C, H, W)`` images in the normalised intensities the models were trained on."""
    from monai.inferers import LatentDiffusionInferer

    noise = torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(sd))
                         for sd in seeds]).to(device)
    scheduler = build_sample_scheduler(s)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=scale_factor)
    images = inferer.sample(input_noise=noise, autoencoder_model=ae, diffusion_model=unet, scheduler=scheduler,
                            verbose=False)
    return images.float().cpu().numpy()


def case_files(folder: Path, case_id: str, n_channels: int, file_ending: str) -> list[Path]:
    return [folder / f"{case_id}_{c:04d}{file_ending}" for c in range(n_channels)]


def is_done(folder: Path, case_id: str, n_channels: int, file_ending: str) -> bool:
    return all(p.is_file() for p in case_files(folder, case_id, n_channels, file_ending))


def _write_channel(array: np.ndarray, path: Path, file_ending: str, spacing_zyx: Sequence[float]) -> None:
    tmp = path.with_name(f".{path.name}.partial{file_ending}")
    if file_ending in NATURAL_IMAGE_FORMATS:
        from PIL import Image

        Image.fromarray(np.clip(array[0], 0, 255).astype(np.uint8), mode="L").save(
            tmp, format=NATURAL_IMAGE_FORMATS[file_ending])
    else:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(v) for v in reversed(spacing_zyx)))
        sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def write_case(normalised: np.ndarray, folder: Path, case_id: str, intensity: IntensityMap, file_ending: str,
               spacing: Sequence[float], out_of_plane_spacing: float, transpose_backward: Sequence[int]) -> list[Path]:
    """One generated ``(C, H, W)`` image -> ``CASE.npy`` + raw channel files (raw intensities, raw axis order)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{case_id}.npy.partial"
    with open(tmp, "wb") as f:
        np.save(f, normalised.astype(np.float16))
    os.replace(tmp, folder / f"{case_id}.npy")
    raw = intensity.to_raw(normalised)[:, None]  # (C, 1, H, W): nnU-Net's axis order of a 2D case
    dtype = np.int16 if intensity.integer and raw.min() >= -32768 and raw.max() <= 32767 else np.float32
    spacing_t = (out_of_plane_spacing, *spacing)
    spacing_zyx = [spacing_t[i] for i in transpose_backward]
    paths = case_files(folder, case_id, len(raw), file_ending)
    for channel, path in zip(raw, paths):
        _write_channel(channel.transpose(transpose_backward).astype(dtype), path, file_ending, spacing_zyx)
    return paths


def sample_cases(ae: torch.nn.Module, unet: torch.nn.Module, scale_factor: float, s: LDMSettings,
                 latent_shape: Sequence[int], patch_size: Sequence[int], todo: dict[str, int], seed: int,
                 write, device: torch.device, progress: bool = True) -> None:
    """Sample the cases ``{case id: index}``; ``write(normalised (C, H, W), case_id)`` writes one as it is done."""
    with tqdm(total=len(todo), desc="sampling", unit="image", disable=not progress) as bar:
        items = list(todo.items())
        for start in range(0, len(items), s.sample_batch_size):
            chunk = items[start:start + s.sample_batch_size]
            images = sample_normalised(ae, unet, scale_factor, s, latent_shape,
                                       [case_seed(seed, index) for _, index in chunk], device)
            for (case_id, _), image in zip(chunk, images):
                write(fit_size(image, tuple(patch_size)), case_id)
                bar.update()
