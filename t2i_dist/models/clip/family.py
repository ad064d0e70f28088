"""Configuration of the `clip` family: an open_clip model trained contrastively on the shards' image-caption
pairs, exported as a checkpoint file that `pretrained:` of any CLIP config loads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from t2i_dist.config import ClipConfig, FamilyConfig

if TYPE_CHECKING:
    from t2i_dist.config import Config


class ClipTrainingConfig(FamilyConfig):
    family: Literal["clip"] = "clip"
    clip: ClipConfig = Field(ClipConfig(), description="architecture; `pretrained` fine-tunes those weights")
    gather_with_grad: bool = Field(True, description="ClipLoss: gradients flow through the gathered features")
    local_loss: bool = Field(False, description="ClipLoss: each rank scores its own rows against all columns")

    def check_compatible(self, cfg: Config) -> None:
        if cfg.eval.every:
            raise ValueError(
                "eval.every is FID of generated images; the clip family generates none (it logs held-out "
                "retrieval every run.sample_every steps): set eval.every=0"
            )
