"""The KL autoencoder: loaded with diffusers (local dir or hub id), or built with random weights; frozen for
the latent diffusion family, trainable for the `vae` family."""

from __future__ import annotations

import torch
from diffusers.models import AutoencoderKL  # not `diffusers`: type checkers would see its dummy class

from t2i_dist.models.vae.config import VAEConfig


def build_vae(cfg: VAEConfig, sample_size: int = 64) -> AutoencoderKL:
    """The autoencoder as configured: `pretrained` weights, or random ones of the architecture in `cfg`; the
    caller sets its mode and gradients."""
    if cfg.pretrained:
        # diffusers loads through accelerate (low_cpu_mem_usage): weights go straight into the modules
        return AutoencoderKL.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder, low_cpu_mem_usage=True)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
    )


def load_vae(cfg: VAEConfig) -> AutoencoderKL:
    """The frozen autoencoder: eval mode, no gradients."""
    vae = build_vae(cfg)
    vae.eval().requires_grad_(False)
    return vae


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


def scaling_factor(vae: AutoencoderKL, cfg: VAEConfig) -> float:
    return cfg.scaling_factor if cfg.scaling_factor is not None else float(vae.config["scaling_factor"])


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, scale: float, generator: torch.Generator | None = None):
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.sample(generator) * scale


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Latents -> images in [0, 1]."""
    images = vae.decode(latents.to(vae.dtype) / scale).sample
    return ((images.float() + 1) / 2).clamp(0, 1)
