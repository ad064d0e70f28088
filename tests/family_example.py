"""A model family defined entirely inside the tests: the registry, the loop, checkpoints and sampling must
take it with no edit anywhere else. A one-convolution denoiser: it learns, fast, on any images."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from t2i_dist.batch import Batch
from t2i_dist.config import FamilyConfig
from t2i_dist.models.base import FamilySpec, ModelPlugin, Trainable


class DenoiserConfig(FamilyConfig):
    family: Literal["denoiser"] = "denoiser"
    noise: float = Field(0.3, gt=0)
    width: int = Field(8, ge=1)


class DenoiserPlugin(ModelPlugin):
    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, dtype)
        self.m: DenoiserConfig = cfg.model
        w = self.m.width
        self.net = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1)).to(device)
        self.noise_generator = torch.Generator().manual_seed(cfg.run.seed)

    def trainables(self) -> dict[str, Trainable]:
        o = self.cfg.optim
        return {"net": Trainable(self.net, lr=o.lr, betas=o.betas)}

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        assert batch.images is not None
        noise = torch.randn(batch.images.shape, generator=self.noise_generator) * self.m.noise
        pred = self.engines["net"](batch.images + noise.to(batch.images.device))
        loss = F.mse_loss(pred, batch.images)
        self.engines["net"].backward_and_step(loss)
        return {"loss": loss.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"rank": {"noise": self.noise_generator.get_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "noise" in state.get("rank", {}):
            self.noise_generator.set_state(state["rank"]["noise"])

    def inference_state(self) -> dict[str, Any]:
        with self.engines["net"].gathered():
            return {"net": {k: v.detach().float().cpu().clone() for k, v in self.net.state_dict().items()}}

    def load_inference_state(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], **options: Any) -> torch.Tensor:
        size = self.cfg.data.resolution
        noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return ((self.net(noise.to(self.device)).float().clamp(-1, 1) + 1) / 2).cpu()


SPEC = FamilySpec("denoiser", DenoiserConfig, plugin=f"{__name__}:DenoiserPlugin")
