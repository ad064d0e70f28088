"""Configuration of a KL autoencoder (diffusers AutoencoderKL) used frozen by the latent diffusion family."""

from __future__ import annotations

from pydantic import Field

from t2i_dist.config import Section


class VAEConfig(Section):
    """A frozen diffusers AutoencoderKL: `pretrained` is a local directory or a hub id (with `subfolder`);
    None builds a random one from the tiny architecture below (downsampling 2**(len(channels)-1))."""

    pretrained: str | None = None
    subfolder: str | None = None
    block_out_channels: list[int] = [32, 64]
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    scaling_factor: float | None = Field(None, description="None uses the VAE's own config value")
