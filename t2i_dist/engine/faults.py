"""Faults the test suite injects into a real run, through T2I_FAULT_* variables read only here.

Loaded by the loop only when one of those variables is set, so real runs never execute this module.

T2I_FAULT_MARKER_DIR: every worker writes its PID to <dir>/rank<r>.pid, for tests that signal workers.
T2I_FAULT_NAN_LOSS_STEPS / T2I_FAULT_NAN_GRAD_STEPS ('3,5-7'): the last rank's batch becomes NaN (so its
loss does), or every rank's gradients do, at those steps. T2I_FAULT_PAUSE_SAVE_STEP: the save at that step
writes <dir>/save-step<N>-rank<r>.json (pid, directory) and pauses before its manifest (T2I_FAULT_PAUSE_S),
once, so a test can kill a worker in mid-save.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_dist.batch import Batch
from t2i_dist.engine.components.base import Component, Loop

ENV_PREFIX = "T2I_FAULT_"


def requested(env: Mapping[str, str] = os.environ) -> bool:
    return any(k.startswith(ENV_PREFIX) and v for k, v in env.items())


def _parse_steps(text: str) -> set[int]:
    """'3,5-7' -> {3, 5, 6, 7}"""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


@dataclass
class InjectedFaults:
    nan_loss_steps: set[int] = field(default_factory=set)
    nan_grad_steps: set[int] = field(default_factory=set)
    pause_save_step: int | None = None
    marker_dir: str | None = None
    pause_s: float = 120.0
    poison_grads: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> InjectedFaults:
        pause = env.get("T2I_FAULT_PAUSE_SAVE_STEP")
        return cls(
            _parse_steps(env.get("T2I_FAULT_NAN_LOSS_STEPS", "")),
            _parse_steps(env.get("T2I_FAULT_NAN_GRAD_STEPS", "")),
            int(pause) if pause else None,
            env.get("T2I_FAULT_MARKER_DIR"),
            float(env.get("T2I_FAULT_PAUSE_S", "120")),
        )

    def arm(self, engines: dict[str, Any], rank: int) -> None:
        if self.marker_dir:
            Path(self.marker_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
        if not self.nan_grad_steps:
            return
        for engine in engines.values():
            for p in engine.module.parameters():
                if p.requires_grad:
                    p.register_hook(lambda g: g * float("nan") if self.poison_grads else g)

    def before_step(self, step: int, batch: Batch, rank: int, world: int) -> None:
        self.poison_grads = step in self.nan_grad_steps
        if step in self.nan_loss_steps and rank == world - 1:
            for tensor in (batch.images, batch.latents):
                if tensor is not None:
                    tensor.fill_(float("nan"))

    def save_hook(self, step: int, rank: int) -> Callable[[Path], None] | None:
        if step != self.pause_save_step or not self.marker_dir:
            return None
        marker = Path(self.marker_dir, f"save-step{step}-rank{rank}.json")
        if marker.exists():  # the step is trained again after the restart: pause only once
            return None

        def pause(directory: Path) -> None:
            marker.write_text(json.dumps({"pid": os.getpid(), "directory": str(directory)}))
            time.sleep(self.pause_s)

        return pause


class FaultInjection(Component):
    """The injected faults as a loop component (first in the order: it poisons batches before the step)."""

    def __init__(self, faults: InjectedFaults) -> None:
        self.faults = faults

    def start(self, loop: Loop) -> None:
        self.faults.arm(loop.engines, loop.rank)

    def before_micro_batch(self, loop: Loop, step: int, batch: Batch) -> None:
        self.faults.before_step(step, batch, loop.rank, loop.world)

    def save_hook(self, loop: Loop) -> Callable[[Path], None] | None:
        return self.faults.save_hook(loop.step, loop.rank)
