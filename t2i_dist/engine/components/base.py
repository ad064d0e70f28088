"""The component interface: hooks the loop calls on every rank, in one fixed order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from t2i_dist.batch import Batch
from t2i_dist.config import Config
from t2i_dist.data.loader import ShardLoader
from t2i_dist.engine.context import RunContext
from t2i_dist.engine.engines import TrainedNetwork
from t2i_dist.models.base import ModelPlugin
from t2i_dist.tracking import Tracker


class Loop(Protocol):
    """What components may use of the loop (engine/loop.py's Loop)."""

    cfg: Config
    ctx: RunContext
    rank: int
    world: int
    device: torch.device
    step: int
    plugin: ModelPlugin
    engines: dict[str, TrainedNetwork]
    loader: ShardLoader
    counts: dict[str, int]
    tracker: Tracker | None
    last_metrics: dict[str, float]

    @property
    def nonfinite_total(self) -> int: ...

    def say(self, message: str) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def save(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class StepOutcome:
    """One finished optimizer step, as every rank agreed on it."""

    step: int
    metrics: dict[str, float]  # this rank's per-step means over its micro-batches (loss, ...)
    data_wait_s: float
    nonfinite: (
        bool  # some rank's loss, or some engine's gradients, were non-finite: a micro-batch (or the step) was dropped
    )
    flags: dict[str, bool] = field(default_factory=dict)  # components' flags, OR-ed over ranks

    @property
    def stop(self) -> bool:
        return self.flags.get("stop", False)


class Component:
    """Base with no-op hooks. `collective`: the component enters collectives on the steps it acts, so its
    schedule must depend only on what every rank agrees on (the step, the agreed flags)."""

    collective: ClassVar[bool] = False

    def start(self, loop: Loop) -> None:
        """After restore, before the first step."""

    def before_micro_batch(self, loop: Loop, step: int, batch: Batch) -> None:
        """Before each micro-batch of `step` (the step being trained, counting from 1)."""

    def flags(self, loop: Loop) -> dict[str, bool]:
        """Local flags joined into the one per-step all-reduce (any rank's True is everyone's)."""
        return {}

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        """After every optimizer step."""

    def finish(self, loop: Loop) -> None:
        """After the last step of a run that was not stopped early."""

    def close(self, loop: Loop, stopped: bool) -> None:
        """Always, also after an error."""
