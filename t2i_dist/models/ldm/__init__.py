"""Latent diffusion: a UNet trained from scratch on a frozen VAE's latents, conditioned on a frozen CLIP."""

from t2i_dist.models.base import FamilySpec
from t2i_dist.models.ldm.config import LDMConfig

SPEC = FamilySpec(
    name="ldm",
    config_class=LDMConfig,
    plugin="t2i_dist.models.ldm.plugin:LDMPlugin",
    sample_options=("sampler", "steps", "guidance"),
    load_options=("use_ema",),
    trains_on_latents=True,
    description="latent diffusion (diffusers UNet on frozen-VAE latents, frozen open_clip text encoder)",
)
