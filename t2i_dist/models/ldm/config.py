"""Configuration of the latent diffusion family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from t2i_dist.config import ClipConfig, FamilyConfig, Section
from t2i_dist.models.vae.config import VAEConfig

if TYPE_CHECKING:
    from t2i_dist.config import Config


class UNetConfig(Section):
    """Arguments of diffusers' UNet2DConditionModel (trained from scratch)."""

    block_out_channels: list[int] = [32, 64]
    down_block_types: list[str] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    up_block_types: list[str] = ["UpBlock2D", "CrossAttnUpBlock2D"]
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    transformer_layers_per_block: int = 1


class SamplerConfig(Section):
    sampler: Literal["ddim", "dpm", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    guidance: float = Field(4.0, ge=0)
    guidance_rescale: float = Field(
        0.0, ge=0, le=1, description="pull guided predictions back to the conditional one's std (Lin et al. 2024)"
    )


class LDMConfig(FamilyConfig):
    family: Literal["ldm"] = "ldm"
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    text: ClipConfig = ClipConfig()
    num_train_timesteps: int = Field(1000, ge=2)
    # Stable Diffusion's schedule: the one its VAE latents and the diffusers samplers are tuned for
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon", description="what the UNet predicts: the noise, the velocity, or the clean latent (sample)"
    )
    loss: Literal["l2", "l1"] = "l2"
    zero_terminal_snr: bool = Field(
        False,
        description="rescale the betas so the last timestep is pure noise (Lin et al. 2024): otherwise training "
        "leaks the image's layout into the noisiest step and samples take their layout from the initial noise, "
        "not the caption; needs prediction_type v_prediction (or sample) and timestep_spacing trailing",
    )
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        "leading", description="how the sampler picks its steps among the training timesteps (diffusers)"
    )
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting; None disables")
    low_noise_bias: float = Field(
        0.0,
        ge=0,
        description="draw training timesteps as floor(T * u**(1 + bias)), u uniform: > 0 favours low noise "
        "levels; 0 is the uniform draw",
    )
    caption_dropout: float = Field(0.1, ge=0, le=1, description="drop captions for classifier-free guidance")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_every: int = Field(
        1,
        ge=1,
        description="update the EMA every N optimizer steps, with decay**N: one "
        "gather of the UNet per N steps under ZeRO-3 (1: every step)",
    )
    sampling: SamplerConfig = SamplerConfig()

    def check_compatible(self, cfg: Config) -> None:
        if len(self.unet.down_block_types) != len(self.unet.block_out_channels):
            raise ValueError("model.unet.down_block_types needs one entry per model.unet.block_out_channels")
        if len(self.unet.up_block_types) != len(self.unet.block_out_channels):
            raise ValueError("model.unet.up_block_types needs one entry per model.unet.block_out_channels")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "model.zero_terminal_snr makes the last timestep pure noise, where predicting the noise tells "
                "nothing about the image: use model.prediction_type=v_prediction (or sample)"
            )
        if self.zero_terminal_snr and self.timestep_spacing == "leading":
            raise ValueError(
                "model.zero_terminal_snr: with timestep_spacing=leading sampling never starts at the pure-noise "
                "step it trained for; use model.timestep_spacing=trailing"
            )
        if self.beta_schedule != "squaredcos_cap_v2" and self.beta_start > self.beta_end:
            raise ValueError("model.beta_start must not exceed model.beta_end")
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if self.vae.pretrained is None and cfg.data.resolution % factor:
            raise ValueError(f"data.resolution={cfg.data.resolution} must be divisible by the VAE factor {factor}")

    def summary(self) -> dict[str, Any]:
        return {"family": "ldm", "text": self.text.name, "vae": self.vae.pretrained or "random"}
