"""KL autoencoders: the frozen VAE the latent diffusion family encodes images with, and the `vae` family that
trains one."""

from t2i_dist.models.base import FamilySpec
from t2i_dist.models.vae.config import VAETrainingConfig

SPEC = FamilySpec(
    name="vae",
    config_class=VAETrainingConfig,
    plugin="t2i_dist.models.vae.plugin:VAEPlugin",
    generates_images=False,
    export_hint="model.vae.pretrained",
    description="KL autoencoder (diffusers AutoencoderKL): the first stage of latent diffusion",
)
