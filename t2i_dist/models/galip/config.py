"""Configuration of the GALIP family (Tao et al., CVPR 2023).

Block and layer indices count from 0, as in `clip.visual.transformer.resblocks`: the paper's ViT-B/32 setting
("prompts in blocks 2-9, features from layers 2, 5, 9", counting from 1) is prompt_blocks [1..8] and
feature_layers [1, 4, 8]. The defaults fit the shipped 4-block tiny CLIP.
"""

from __future__ import annotations

import json
from importlib import resources, util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from t2i_dist.config import ClipConfig, FamilyConfig

if TYPE_CHECKING:
    from t2i_dist.config import Config


class GALIPConfig(FamilyConfig):
    family: Literal["galip"] = "galip"
    clip: ClipConfig = ClipConfig()
    noise_dim: int = Field(100, ge=1)
    ngf: int = Field(64, ge=1, description="generator base width")
    ndf: int = Field(64, ge=1, description="discriminator base width")
    lr_g: float = Field(1e-4, gt=0)
    lr_d: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.9)
    ma_gp_k: float = 2.0
    ma_gp_p: float = 6.0
    ma_gp_every: int = Field(
        1,
        ge=1,
        description="apply MA-GP on every N-th step only, weighted by N (lazy regularisation, StyleGAN2): the "
        "other steps skip its double backward; 1: every step, the paper's",
    )
    clip_sim_weight: float = 4.0
    mode_seeking: float = Field(
        0.0, ge=0, description="weight of the mode-seeking term (a second image per caption, other noise); 0: off"
    )
    augment: list[Literal["translation", "cutout"]] = Field(
        [], description="DiffAugment transforms of real and fake images before CLIP reads them (D and the CLIP term)"
    )
    augment_translation: float = Field(0.125, ge=0, le=0.5, description="largest shift, a fraction of the image size")
    augment_cutout: float = Field(0.5, ge=0, le=1, description="side of the cut-out square, a fraction of the size")
    pixel_branch: bool = Field(
        False,
        description="Mate-D also reads the images CLIP read through a small conv stack (detail inside one ViT "
        "patch, which the patch embedding may project away); off: the paper's CLIP-only discriminator",
    )
    projection: bool = Field(
        False,
        description="Mate-D adds a projection term, <pooled features, W sentence> (Miyato & Koyama 2018), to its "
        "score; off: the paper's concatenation-only quality assessor",
    )
    # Mate-G's bridge feature predictor: noise -> (bridge_channels, grid, grid), grid = CLIP-ViT patch grid
    bridge_channels: int = Field(64, ge=1)
    bridge_mid_channels: int = Field(32, ge=1)
    bridge_blocks: int = Field(4, ge=1, description="fusion blocks (two convs + DF-blocks each)")
    bridge_clip_weight: float = Field(0.1, ge=0, description="weight of the CLIP-ViT output added to the bridge")
    prompt_blocks: list[int] = Field([1, 2], description="CLIP-ViT blocks (from 0) that get a predicted prompt")
    feature_layers: list[int] = Field([1, 2, 3], min_length=1, description="CLIP-ViT blocks (from 0) Mate-D reads")
    discriminator_zero_stage: Literal[0, 1, 2] | None = Field(
        None, description="ZeRO stage of Mate-D's engine; None uses deepspeed.zero_stage (which must then be <= 2)"
    )

    @field_validator("prompt_blocks", "feature_layers")
    @classmethod
    def _ascending_unique(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or sorted(set(value)) != value:
            raise ValueError(f"must be distinct block indices >= 0 in ascending order, got {value}")
        return value

    def discriminator_stage(self, cfg: Config) -> int:
        return cfg.deepspeed.zero_stage if self.discriminator_zero_stage is None else self.discriminator_zero_stage

    def check_compatible(self, cfg: Config) -> None:
        if cfg.deepspeed.compile:
            raise ValueError(
                "deepspeed.compile is supported for the ldm family only (GALIP's gradient penalty takes "
                "a double backward through the discriminator); set deepspeed.compile=false"
            )
        if self.discriminator_stage(cfg) == 3:
            raise ValueError(
                "GALIP's discriminator cannot use ZeRO stage 3: the matching-aware gradient penalty needs a double "
                "backward through the raw module, whose parameters ZeRO-3 partitions away. Use deepspeed.zero_stage "
                "0, 1 or 2, or keep stage 3 for the generator and set model.discriminator_zero_stage=2"
            )
        if cfg.data.format != "images":
            raise ValueError(
                "GALIP trains on pixels (its discriminator reads CLIP features of real images): set data.format=images"
            )
        res = cfg.data.resolution
        if res < 16 or res & (res - 1):
            raise ValueError(
                f"GALIP's image generator doubles its size per block: data.resolution must be a power "
                f"of two >= 16 (64, 128, 256), got {res}"
            )
        if cfg.deepspeed.micro_batch_size < 2:
            raise ValueError(
                "GALIP's mismatched-text negatives pair each image with another sample's caption: "
                "deepspeed.micro_batch_size must be >= 2"
            )
        depth = clip_vision_depth(self.clip.name)
        if depth is not None:
            for key in ("prompt_blocks", "feature_layers"):
                bad = [i for i in getattr(self, key) if i >= depth]
                if bad:
                    raise ValueError(
                        f"model.{key} {bad} out of range: CLIP {self.clip.name!r} has {depth} vision "
                        f"blocks (indices 0..{depth - 1})"
                    )

    def summary(self) -> dict[str, Any]:
        return {"family": "galip", "clip": self.clip.name, "clip_weights": self.clip.pretrained or "random"}


def clip_vision_depth(name: str) -> int | None:
    """Vision blocks of an open_clip architecture, read from its JSON config without importing open_clip
    (config validation runs on the driver); None when the architecture is not found that way (hf-hub ids)."""
    candidates = [Path(str(resources.files("t2i_dist.models.clip") / "configs" / f"{name}.json"))]
    spec = util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "model_configs" / f"{name}.json" for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            layers = json.loads(path.read_text()).get("vision_cfg", {}).get("layers")
            return layers if isinstance(layers, int) else None
    return None
