"""Configuration of a KL autoencoder (diffusers AutoencoderKL): frozen inside the latent diffusion family
(VAEConfig), and trained by the `vae` family (VAETrainingConfig), whose export `model.vae.pretrained` loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from t2i_dist.config import TRAIN_CONFIG_HELP, FamilyConfig, Section

if TYPE_CHECKING:
    from t2i_dist.config import Config


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
    train_config: str | None = Field(None, description=TRAIN_CONFIG_HELP.format(family="vae"))


class VAETrainingConfig(FamilyConfig):
    family: Literal["vae"] = "vae"
    vae: VAEConfig = Field(VAEConfig(), description="architecture; `pretrained` fine-tunes those weights")
    loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term towards N(0, 1)")
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS-style VGG feature loss; needs perceptual_weights")
    perceptual_weights: str | None = Field(None, description="local torchvision VGG16 state dict (perceptual term)")
    adversarial_weight: float = Field(0.0, ge=0, description="patch discriminator (hinge) term; 0 disables")
    adversarial_start: int = Field(0, ge=0, description="optimizer step from which the adversarial term is on")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="EMA of the autoencoder's weights; None disables")

    def check_compatible(self, cfg: Config) -> None:
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if cfg.data.resolution % factor:
            raise ValueError(f"data.resolution={cfg.data.resolution} must be divisible by the VAE factor {factor}")
        if self.perceptual_weight and not self.perceptual_weights:
            raise ValueError(
                "model.perceptual_weight > 0 needs model.perceptual_weights: a local VGG16 state dict "
                "(torchvision's vgg16 weights file); or set model.perceptual_weight=0"
            )
        if cfg.eval.every:
            raise ValueError(
                "eval.every is FID of generated images; the vae family generates none (it logs held-out PSNR "
                "every run.sample_every steps): set eval.every=0"
            )
