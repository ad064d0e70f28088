"""The plug-in interface every model family implements, documented in one place.

The shared loop (`engine/loop.py`) owns data, DeepSpeed engines, checkpoints, tracking and the timetable;
a plug-in owns its networks, its loss and its sampler. A family is a folder under `models/` exporting a
`FamilySpec` named SPEC, plus one name in `models/registry.py`.

A minimal family (tests/family_example.py trains, checkpoints and samples one through the real loop):

    class TinyConfig(FamilyConfig):
        family: Literal["tiny"] = "tiny"

    class TinyPlugin(ModelPlugin):
        def __init__(self, cfg, device, dtype=torch.float32):
            super().__init__(cfg, device, dtype)
            self.net = nn.Conv2d(3, 3, 1).to(device)

        def trainables(self):
            return {"net": Trainable(self.net, lr=self.cfg.optim.lr, betas=self.cfg.optim.betas)}

        def train_step(self, batch, step):
            loss = self.engines["net"](batch.images).square().mean()
            self.engines["net"].backward_and_step(loss)   # skipped on every rank if non-finite on one
            return {"loss": loss.detach()}

        def inference_state(self):
            with self.engines["net"].gathered():        # collective under ZeRO-3
                return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}}

        def load_inference_state(self, state, **options):
            self.net.load_state_dict(state["net"])

        def sample(self, prompts, seeds, **options):
            ...  # images in [0, 1], one per (prompt, seed)

    SPEC = FamilySpec("tiny", TinyConfig, plugin="my_package.tiny:TinyPlugin")
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from t2i_dist.batch import Batch
    from t2i_dist.config import Config, FamilyConfig


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
    # which parameters weight decay applies to, by (name, parameter); None: all of them
    decays: Callable[[str, nn.Parameter], bool] | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """The trained parameters as optimizer groups: those `decays` excludes get no weight decay."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.decays is None or not self.weight_decay:
            return [{"params": [p for _, p in named], "weight_decay": self.weight_decay}]
        decayed: list[nn.Parameter] = []
        kept: list[nn.Parameter] = []
        for n, p in named:
            (decayed if self.decays(n, p) else kept).append(p)
        groups = [{"params": decayed, "weight_decay": self.weight_decay}, {"params": kept, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


class TrainedEngine(Protocol):
    """What a plug-in sees of the engine the loop made for one of its trainables (engine/engines.py)."""

    @property
    def module(self) -> nn.Module: ...

    @property
    def partitioned(self) -> bool:
        """True when ZeRO-3 partitions the module's parameters (reading them needs `gathered()`)."""
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """backward + optimizer step, unless the loss is non-finite on any rank: then every rank drops this
        micro-batch together (collectives stay matched) and False is returned. Without gradient accumulation
        the step is skipped; with it, the other micro-batches of the step still update the weights."""
        ...

    def gathered(self) -> AbstractContextManager[object]:
        """Full parameters for reading inside the block; collective under ZeRO-3, a no-op otherwise."""
        ...


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


@contextmanager
def mixed_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast for the frozen fp32 parts feeding a bf16 network (a no-op in fp32)."""
    if dtype == torch.bfloat16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


class ModelPlugin(ABC):
    """Base class of a model family's plug-in.

    Called by the loop on every rank, in this order: trainables/frozen (once), attach_engines (once),
    load_state_dict (on resume), then per step train_step (once per micro-batch) and after_optimizer_step;
    before_sampling before any sample() of a sample grid or evaluation; state_dict and inference_state when
    a checkpoint is written (inference_state is collective under ZeRO-3)."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = device
        # compute dtype of the trained networks (bf16 under DeepSpeed's bf16 mode)
        self.dtype = dtype
        self.engines: dict[str, TrainedEngine] = {}

    # -- training ----------------------------------------------------------------------------------------
    @abstractmethod
    def trainables(self) -> dict[str, Trainable]:
        """Networks to train, each becoming one DeepSpeed engine, keyed by a stable name."""

    def frozen(self) -> dict[str, nn.Module]:
        """Frozen networks (replicated on every rank, never partitioned by ZeRO)."""
        return {}

    def attach_engines(self, engines: dict[str, TrainedEngine]) -> None:
        """Called once engines exist; plug-ins keep them for train_step and sampling."""
        self.engines = engines

    @abstractmethod
    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Forward + engine.backward_and_step for one micro-batch; returns detached scalar metrics.
        Must include 'loss'. A non-finite loss must be returned as is (the loop counts it)."""

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step, on every rank (EMA updates)."""

    def before_sampling(self) -> None:
        """On every rank before the loop samples (grids on rank 0, evaluation on all): the place for
        collective preparation, e.g. gathering a ZeRO-3 partitioned generator."""

    def state_dict(self) -> dict[str, Any]:
        """Resume state outside the engines (EMA, random generators). The entry under "rank" is this rank's
        own (saved per rank); the rest is the same on every rank (saved once, by rank 0)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What state_dict returned (rank 0's shared part, with this rank's "rank" entry when the world size
        is unchanged); called on every rank after the engines were restored."""

    # -- inference ---------------------------------------------------------------------------------------
    @abstractmethod
    def inference_state(self) -> dict[str, Any]:
        """Full (gathered) weights needed to sample, e.g. the EMA UNet. Called on every rank (ZeRO-3 gathers
        collectively); the result of rank 0 is written to the checkpoint."""

    @abstractmethod
    def load_inference_state(self, state: dict[str, Any], **options: Any) -> None:
        """Load what inference_state produced into freshly built (non-DeepSpeed) networks; `options` are the
        family's FamilySpec.load_options."""

    def sample(self, prompts: list[str], seeds: list[int], **options: Any) -> torch.Tensor:
        """Images in [0, 1], float32, NCHW, one per (prompt, seed); deterministic given the seed. `options`
        are the family's FamilySpec.sample_options. Families that do not generate from captions (a VAE, a
        CLIP) say so with FamilySpec.generates_images=False and leave this out."""
        raise NotImplementedError(f"the {self.cfg.model.family} family does not generate images from captions")

    # -- families trained as components of another (FamilySpec.generates_images=False) ------------------
    def measure(self, held_out: Batch) -> tuple[dict[str, float], torch.Tensor | None]:
        """The family's own measure on a fixed held-out batch (e.g. PSNR, retrieval top-1), and optionally
        images in [0, 1] for a grid (e.g. originals above reconstructions). Called on every rank at the
        sample-grid steps (collective under ZeRO-3); rank 0's result is logged."""
        return {}, None

    def export(self, directory: Path) -> Path:
        """After load_inference_state: write the trained networks as an artifact another config loads by
        path (FamilySpec.export_hint says which field); returns the path to give it."""
        raise NotImplementedError(f"the {self.cfg.model.family} family has no standalone export")


@dataclass(frozen=True)
class FamilySpec:
    """What the registry knows of a family without importing its networks."""

    name: str
    config_class: type[FamilyConfig]
    plugin: str  # "module:Class": imported only where networks are built (the driver validates without it)
    sample_options: tuple[str, ...] = ()  # keyword options ModelPlugin.sample accepts
    load_options: tuple[str, ...] = ()  # keyword options ModelPlugin.load_inference_state accepts
    trains_on_latents: bool = False  # can train from shards `python -m t2i_dist.precompute` writes
    generates_images: bool = True  # False: no sample grids or FID; ModelPlugin.measure on held-out data instead
    export_hint: str = ""  # the config field an exported artifact is given to, e.g. "model.vae.pretrained"
    description: str = ""

    def plugin_class(self) -> type[ModelPlugin]:
        module, _, attr = self.plugin.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, ModelPlugin)):
            raise TypeError(f"family {self.name!r}: {self.plugin} is not a ModelPlugin subclass")
        return cls

    def split_options(self, options: dict[str, Any], accepted: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
        """(options this family accepts, names it does not take); unset (None) options are dropped."""
        given = {k: v for k, v in options.items() if v is not None}
        return {k: v for k, v in given.items() if k in accepted}, sorted(set(given) - set(accepted))


def parameter_counts(plugin: ModelPlugin) -> dict[str, int]:
    return count_parameters({**{k: t.module for k, t in plugin.trainables().items()}, **plugin.frozen()})
