"""Config classes for the frozen components both model families share (CLIP, VAE)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ClipConfig(Part):
    """A frozen open_clip model. `name` is an open_clip architecture (e.g. ViT-B-32) or a shipped tiny one
    (t2i-tiny-clip); `pretrained` is a local checkpoint file, an open_clip tag, or an `hf-hub:org/repo` id.
    None builds random weights (offline dry runs and tests)."""

    name: str = "t2i-tiny-clip"
    pretrained: str | None = None
    layer: Literal["last", "penultimate"] = "last"


class VAEConfig(Part):
    """A frozen diffusers AutoencoderKL: `pretrained` is a local directory or a hub id (with `subfolder`);
    None builds a random one from the tiny architecture below (downsampling 2**(len(channels)-1))."""

    pretrained: str | None = None
    subfolder: str | None = None
    block_out_channels: list[int] = [32, 64]
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    scaling_factor: float | None = Field(None, description="None uses the VAE's own config value")
