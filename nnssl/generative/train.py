"""Training of the latent diffusion model with MONAI's generative networks, resumable per epoch.

Stage ``autoencoder``: ``AutoencoderKL`` with L1 reconstruction + ``kl_weight`` · KL, and, after
``adv_warmup_epochs``, a ``PatchDiscriminator`` with MONAI's least-squares ``PatchAdversarialLoss`` (weight
``adv_weight``), as in MONAI's 2D LDM tutorial. Stage ``diffusion``: ``DiffusionModelUNet`` on the autoencoder's
latents, scaled to unit standard deviation (``scale_factor`` = 1 / std of the training latents, as the tutorial),
trained through ``LatentDiffusionInferer`` to predict the noise of a ``DDPMScheduler`` step (MSE).

Each stage writes ``<stage>_latest.pt`` (networks, optimizers, epoch, losses) every ``checkpoint_every`` epochs and
``<stage>_final.pt`` at its end, both atomically; a killed run restarts from the last ``_latest.pt`` and a finished
stage is loaded, not retrained. Batches and noise are drawn from generators seeded by (seed, stage, epoch), so a
resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .data import batches
from .settings import LDMSettings


def build_autoencoder(s: LDMSettings, n_channels: int) -> torch.nn.Module:
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(spatial_dims=2, in_channels=n_channels, out_channels=n_channels, channels=s.ae_channels,
                         latent_channels=s.ae_latent_channels, num_res_blocks=s.ae_res_blocks,
                         norm_num_groups=s.ae_norm_groups, attention_levels=(False,) * len(s.ae_channels),
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def build_discriminator(s: LDMSettings, n_channels: int) -> torch.nn.Module:
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=2, in_channels=n_channels, channels=s.disc_channels,
                              num_layers_d=s.disc_layers)


def build_unet(s: LDMSettings) -> torch.nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=s.ae_latent_channels, out_channels=s.ae_latent_channels,
                              channels=s.unet_channels, attention_levels=s.unet_attention,
                              num_head_channels=s.unet_head_channels, num_res_blocks=s.unet_res_blocks,
                              norm_num_groups=s.unet_norm_groups)


def build_train_scheduler(s: LDMSettings):
    from monai.networks.schedulers import DDPMScheduler

    # latents have unit variance, not a [-1, 1] range: no clipping of the predicted sample
    return DDPMScheduler(num_train_timesteps=s.train_timesteps, schedule=s.beta_schedule, beta_start=s.beta_start,
                         beta_end=s.beta_end, clip_sample=False)


def atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _seeded(seed: int, stage: str, epoch: int) -> tuple[np.random.Generator, torch.Generator]:
    key = [seed, {"autoencoder": 1, "diffusion": 2}[stage], epoch]
    torch_seed = int(np.random.SeedSequence(key).generate_state(1)[0])
    return np.random.default_rng(key), torch.Generator().manual_seed(torch_seed)


def run_stage(stage: str, workdir: Path, state: dict[str, object], epochs: int, checkpoint_every: int,
              epoch_fn: Callable[[int], dict[str, float]], progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train ``epochs`` epochs of ``epoch_fn`` resumably; ``state``: the modules and optimizers to checkpoint (and
    ``extra``: a dict of plain values). Returns the per-epoch losses."""
    final, latest = workdir / f"{stage}_final.pt", workdir / f"{stage}_latest.pt"
    if final.is_file():
        ckpt = torch.load(final, map_location="cpu", weights_only=False)
        _load(state, ckpt)
        log(f"{stage}: finished earlier, loaded {final}")
        return ckpt["history"]
    start, history = 0, []
    if latest.is_file():
        ckpt = torch.load(latest, map_location="cpu", weights_only=False)
        _load(state, ckpt)
        start, history = ckpt["epoch"], ckpt["history"]
        log(f"{stage}: resuming from {latest} after epoch {start}/{epochs}")
    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=stage, unit="epoch", disable=not progress)
    for epoch in bar:
        losses = epoch_fn(epoch)
        history.append(losses)
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
        if (epoch + 1) % checkpoint_every == 0 and epoch + 1 < epochs:
            atomic_torch_save({**_dump(state), "epoch": epoch + 1, "history": history}, latest)
    atomic_torch_save({**_dump(state), "epoch": epochs, "history": history}, final)
    latest.unlink(missing_ok=True)
    return history


def _dump(state: dict[str, object]) -> dict:
    return {k: (v if k == "extra" else v.state_dict()) for k, v in state.items()}


def _load(state: dict[str, object], ckpt: dict) -> None:
    for k, v in state.items():
        if k == "extra":
            v.update(ckpt[k])
        else:
            v.load_state_dict(ckpt[k])


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over latent elements, averaged over the batch (the tutorial's)."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1)
    return kl.flatten(1).sum(1).mean()


def train_autoencoder(images: list[np.ndarray], size: tuple[int, ...], s: LDMSettings, workdir: Path,
                      device: torch.device, seed: int, progress: bool = True) -> torch.nn.Module:
    from monai.losses import PatchAdversarialLoss

    n_channels = images[0].shape[0]
    torch.manual_seed(seed)
    ae, disc = build_autoencoder(s, n_channels).to(device), build_discriminator(s, n_channels).to(device)
    opt_g = torch.optim.Adam(ae.parameters(), lr=s.ae_lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=s.disc_lr)
    adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def epoch_fn(epoch: int) -> dict[str, float]:
        ae.train()
        disc.train()
        rng, _ = _seeded(seed, "autoencoder", epoch)
        adversarial = s.adv_weight > 0 and epoch >= s.adv_warmup_epochs
        sums = {"recon": 0.0, "kl": 0.0, "gen": 0.0, "disc": 0.0}
        n = 0
        for batch in batches(images, s.ae_batch_size, size, rng):
            x = torch.from_numpy(batch).to(device)
            opt_g.zero_grad(set_to_none=True)
            recon, mu, sigma = ae(x)
            rec, kl = torch.nn.functional.l1_loss(recon, x), kl_divergence(mu, sigma)
            loss = rec + s.kl_weight * kl
            if adversarial:
                gen = adv_loss(disc(recon.contiguous())[-1], target_is_real=True, for_discriminator=False)
                loss = loss + s.adv_weight * gen
                sums["gen"] += gen.item()
            loss.backward()
            opt_g.step()
            if adversarial:
                opt_d.zero_grad(set_to_none=True)
                fake = adv_loss(disc(recon.detach().contiguous())[-1], target_is_real=False, for_discriminator=True)
                real = adv_loss(disc(x.contiguous())[-1], target_is_real=True, for_discriminator=True)
                loss_d = s.adv_weight * 0.5 * (fake + real)
                loss_d.backward()
                opt_d.step()
                sums["disc"] += loss_d.item()
            sums["recon"] += rec.item()
            sums["kl"] += kl.item()
            n += 1
        return {k: v / n for k, v in sums.items()}

    state = {"autoencoder": ae, "discriminator": disc, "optimizer_g": opt_g, "optimizer_d": opt_d}
    run_stage("autoencoder", workdir, state, s.ae_epochs, s.checkpoint_every, epoch_fn, progress)
    return ae.eval()


@torch.no_grad()
def latent_scale_factor(ae: torch.nn.Module, images: list[np.ndarray], size: tuple[int, ...],
                        device: torch.device) -> float:
    """1 / std of the training images' latents (centre crops), as MONAI's LDM tutorial."""
    x = torch.from_numpy(np.stack([batch for batch in _centre(images, size)])).to(device)
    z = torch.cat([ae.encode_stage_2_inputs(x[i:i + 16]) for i in range(0, len(x), 16)])
    return float(1.0 / z.std())


def _centre(images: list[np.ndarray], size: tuple[int, ...]):
    from .data import fit_size

    return [fit_size(im, size) for im in images]


def train_diffusion(images: list[np.ndarray], size: tuple[int, ...], ae: torch.nn.Module, s: LDMSettings,
                    workdir: Path, device: torch.device, seed: int, progress: bool = True
                    ) -> tuple[torch.nn.Module, float]:
    from monai.inferers import LatentDiffusionInferer

    torch.manual_seed(seed + 1)
    unet = build_unet(s).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=s.ldm_lr)
    extra = {"scale_factor": None}
    final = workdir / "diffusion_final.pt"
    if not final.is_file() and not (workdir / "diffusion_latest.pt").is_file():
        extra["scale_factor"] = latent_scale_factor(ae, images, size, device)
    scheduler = build_train_scheduler(s)

    def epoch_fn(epoch: int) -> dict[str, float]:
        unet.train()
        inferer = LatentDiffusionInferer(scheduler, scale_factor=extra["scale_factor"])
        rng, gen = _seeded(seed, "diffusion", epoch)
        total, n = 0.0, 0
        for batch in batches(images, s.ldm_batch_size, size, rng):
            x = torch.from_numpy(batch).to(device)
            with torch.no_grad():
                latent_shape = ae.encode_stage_2_inputs(x[:1]).shape[1:]
            noise = torch.randn((len(x), *latent_shape), generator=gen).to(device)
            t = torch.randint(0, s.train_timesteps, (len(x),), generator=gen).to(device)
            optimizer.zero_grad(set_to_none=True)
            pred = inferer(inputs=x, autoencoder_model=ae, diffusion_model=unet, noise=noise, timesteps=t)
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            total += loss.item()
            n += 1
        return {"mse": total / n}

    run_stage("diffusion", workdir, {"unet": unet, "optimizer": optimizer, "extra": extra}, s.ldm_epochs,
              s.checkpoint_every, epoch_fn, progress)
    return unet.eval(), float(extra["scale_factor"])
