"""Presets of the latent diffusion model (LDM) of ``nnssl_generate_unlabeled``.

MGCC (arXiv 2305.09447) generates its unlabeled images with "a latent diffusion model"; the sources found (its
abstract and summaries) give no architecture or schedule, and its official code does not ship that stage;
``monai2d`` therefore takes MONAI's 2D LDM tutorial
(GenerativeModels ``2d_ldm_tutorial``, MedNIST hands at 64 x 64) as it is, except where noted in
docs/methods/mgcc.md: no perceptual (LPIPS) loss, since it needs pretrained weights downloaded at run time, and
DDIM sampling with 50 steps instead of 1000 DDPM steps. ``tiny`` is the same code path at CPU-test size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nnssl.errors import InputError


@dataclass(frozen=True)
class LDMSettings:
    name: str
    # AutoencoderKL
    ae_channels: tuple[int, ...]
    ae_latent_channels: int
    ae_res_blocks: int
    ae_norm_groups: int
    ae_epochs: int
    ae_batch_size: int
    ae_lr: float
    kl_weight: float
    # PatchDiscriminator (adv_weight 0: no adversarial term), switched on after adv_warmup_epochs
    adv_weight: float
    adv_warmup_epochs: int
    disc_channels: int
    disc_layers: int
    disc_lr: float
    # DiffusionModelUNet on the latents
    unet_channels: tuple[int, ...]
    unet_attention: tuple[bool, ...]
    unet_head_channels: tuple[int, ...]
    unet_res_blocks: int
    unet_norm_groups: int
    ldm_epochs: int
    ldm_batch_size: int
    ldm_lr: float
    # noise schedule (DDPM for training, DDIM for sampling)
    train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    sample_steps: int = 50
    sample_batch_size: int = 16
    checkpoint_every: int = 1  # epochs between checkpoint_latest writes

    def downsampling(self) -> int:
        """The factor image size must be divisible by: the autoencoder's and the latent U-Net's downsamplings."""
        return 2 ** (len(self.ae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))


def json_ready(obj):
    """Tuples become lists, as they read back from JSON (so that a saved and a fresh dict compare equal)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


PRESETS: dict[str, LDMSettings] = {
    # MONAI GenerativeModels 2D LDM tutorial: AE (128,128,256), latent 3, KL 1e-6, adversarial 0.01 after 10 of 100
    # epochs, lr 1e-4 / 5e-4; U-Net (128,256,512), attention at the two deeper levels, 200 epochs at lr 1e-4;
    # DDPM 1000 steps, linear betas 0.0015..0.0195. Batch sizes fit one 24 GB GPU at 256 x 256.
    "monai2d": LDMSettings(
        name="monai2d", ae_channels=(128, 128, 256), ae_latent_channels=3, ae_res_blocks=2, ae_norm_groups=32,
        ae_epochs=100, ae_batch_size=16, ae_lr=1e-4, kl_weight=1e-6, adv_weight=0.01, adv_warmup_epochs=10,
        disc_channels=64, disc_layers=3, disc_lr=5e-4, unet_channels=(128, 256, 512),
        unet_attention=(False, True, True), unet_head_channels=(0, 256, 512), unet_res_blocks=2,
        unet_norm_groups=32, ldm_epochs=200, ldm_batch_size=16, ldm_lr=1e-4, sample_steps=50),
    # the same code path in about a minute on 2 CPU cores (tests); its images are blurry texture, not anatomy
    "tiny": LDMSettings(
        name="tiny", ae_channels=(8, 16, 16), ae_latent_channels=2, ae_res_blocks=1, ae_norm_groups=8,
        ae_epochs=10, ae_batch_size=8, ae_lr=2e-3, kl_weight=1e-6, adv_weight=0.01, adv_warmup_epochs=5,
        disc_channels=8, disc_layers=2, disc_lr=2e-3, unet_channels=(16, 32), unet_attention=(False, True),
        unet_head_channels=(0, 16), unet_res_blocks=1, unet_norm_groups=8, ldm_epochs=12, ldm_batch_size=8,
        ldm_lr=2e-3, sample_steps=10, sample_batch_size=8),
}


def get_settings(preset: str, ae_epochs: int | None = None, ldm_epochs: int | None = None) -> LDMSettings:
    if preset not in PRESETS:
        raise InputError(f"--preset {preset}: unknown; choose one of {sorted(PRESETS)}")
    settings = PRESETS[preset]
    for option, value in (("ae_epochs", ae_epochs), ("ldm_epochs", ldm_epochs)):
        if value is not None:
            if value < 1:
                raise InputError(f"--{option.replace('_', '-')} {value}: must be at least 1")
            settings = dataclasses.replace(settings, **{option: value})
    return settings
