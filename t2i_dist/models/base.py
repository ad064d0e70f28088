"""The plug-in interface every model family implements.

The shared loop (engine/worker.py) owns data, DeepSpeed engines, checkpoints and tracking; a plug-in owns
its networks, its loss and its sampler. A new family is one module plus one line in models/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from t2i_dist.config import Config


@dataclass
class Trainable:
    """A network the loop wraps into its own DeepSpeed engine, with its optimizer's settings."""

    module: nn.Module
    lr: float
    betas: tuple[float, float]
    weight_decay: float = 0.0
    eps: float = 1e-8
    # ZeRO stage for this engine; None uses deepspeed.zero_stage
    zero_stage: int | None = None


@dataclass
class Batch:
    """One micro-batch. `images` are float in [-1, 1], NCHW; precomputed shards fill `latents`/`text` instead."""

    captions: list[str]
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    text: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.captions, move(self.images), move(self.latents), {k: move(v) for k, v in self.text.items()})


def count_parameters(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Total and trainable parameter counts; ZeRO-3 partitioned parameters report their full size."""
    counts: dict[str, int] = {}
    total = trainable = 0
    for name, module in modules.items():
        n = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        counts[f"params/{name}"] = n
        total += n
        trainable += sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    counts["params/total"] = total
    counts["params/trainable"] = trainable
    return counts


class ModelPlugin(ABC):
    """Base class of a model family. Subclasses set `family` and implement the abstract methods."""

    family: str = ""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = device
        # compute dtype of the trained networks (bf16 under DeepSpeed's bf16 mode)
        self.dtype = dtype

    # -- what the loop needs ---------------------------------------------------------------------------
    @abstractmethod
    def trainables(self) -> dict[str, Trainable]:
        """Networks to train, each becoming one DeepSpeed engine, keyed by a stable name."""

    def frozen(self) -> dict[str, nn.Module]:
        """Frozen networks (replicated on every rank, never partitioned by ZeRO)."""
        return {}

    def attach_engines(self, engines: dict[str, Any]) -> None:
        """Called once engines exist; plug-ins keep them for train_step and sampling."""
        self.engines = engines

    @abstractmethod
    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Forward + engine.backward + engine.step for one micro-batch; returns detached scalar metrics.
        Must include 'loss'. A non-finite loss must be returned as is (the loop counts and skips it)."""

    def backward_and_step(self, engine: Any, loss: torch.Tensor) -> bool:
        """engine.backward + engine.step unless the loss is non-finite on any rank; then the micro-batch is
        dropped on every rank together (so collectives stay matched) and False is returned."""
        finite = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            return False
        engine.backward(loss)
        engine.step()
        return True

    def after_optimizer_step(self, step: int) -> None:
        """Hook after an optimizer step (EMA updates)."""

    def extra_state(self) -> dict[str, Any]:
        """State outside the engines that a resume needs (EMA, GAN schedules); saved by rank 0."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def rank_rng_state(self) -> dict[str, Any]:
        """This rank's own random generators (each rank draws different noise); saved per rank."""
        return {}

    def load_rank_rng_state(self, state: dict[str, Any]) -> None:
        pass

    # -- inference ---------------------------------------------------------------------------------------
    @abstractmethod
    def inference_state(self) -> dict[str, Any]:
        """Full (gathered) weights needed to sample, e.g. the EMA UNet. Called on every rank (ZeRO-3 gathers
        collectively); the result of rank 0 is written to the checkpoint."""

    @abstractmethod
    def load_inference_state(self, state: dict[str, Any]) -> None:
        """Load what inference_state produced into freshly built (non-DeepSpeed) networks."""

    @abstractmethod
    def sample(self, prompts: list[str], seeds: list[int], **options: Any) -> torch.Tensor:
        """Images in [0, 1], float32, NCHW, one per (prompt, seed); deterministic given the seed."""

    def parameter_counts(self) -> dict[str, int]:
        return count_parameters({**{k: t.module for k, t in self.trainables().items()}, **self.frozen()})

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast for the frozen fp32 parts feeding a bf16 network (a no-op in fp32)."""
        if self.dtype == torch.bfloat16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
