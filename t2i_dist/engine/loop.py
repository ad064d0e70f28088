"""The training loop every model family shares. It knows no launcher: a RunContext says who this process
is and where checkpoints go (engine/ray_worker.py under Ray Train, engine/context.local_context in a plain
process).

One step, on every rank:
  1. for each micro-batch: components' before_micro_batch, then plugin.train_step
  2. plugin.after_optimizer_step (EMA)
  3. one all-reduce of agreement flags: non-finite step, and each component's flags (preemption)
  4. components' after_step, in this order (`default_components`):
       FaultInjection (only when T2I_FAULT_* is set) · Preemption (drain check) · MetricsLog (step line,
       MLflow) · the non-finite abort · SampleGrids · InTrainingEvaluation (if eval.every) · Checkpoints;
       a family that does not generate images (FamilySpec.generates_images) gets HeldOutMeasure in place of
       the grids and evaluation
  5. stop when the agreed flags say so (preemption), after the checkpoint.
After the last step: components' finish (the final sample grid); always: components' close, then the
tracker is flushed (what was logged reaches MLflow or the fallback file).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from t2i_dist import dist
from t2i_dist.config import Config
from t2i_dist.engine import checkpoint as ckpt
from t2i_dist.engine.build import build_training
from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.engine.components.checkpoints import Checkpoints
from t2i_dist.engine.components.evaluation import InTrainingEvaluation
from t2i_dist.engine.components.held_out import HeldOutMeasure
from t2i_dist.engine.components.metrics import MetricsLog
from t2i_dist.engine.components.preemption import Preemption
from t2i_dist.engine.components.samples import SampleGrids
from t2i_dist.engine.context import RunContext
from t2i_dist.models.registry import family
from t2i_dist.tracking import Tracker

if TYPE_CHECKING:
    from t2i_dist.engine.faults import FaultInjection

log = logging.getLogger("t2i_dist.train")


class NonFiniteGuard(Component):
    """Counts steps skipped for a non-finite loss or gradient (the optimizer did not move) and stops the
    run after `run.max_nonfinite_steps` in a row; runs after MetricsLog, so the count that stopped the run
    is logged."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient (run.max_nonfinite_steps="
                f"{self.limit}); stopping with the last good checkpoint kept. Lower optim.lr, raise "
                "deepspeed.gradient_clipping or use deepspeed.precision=fp32."
            )


def _injected_faults() -> FaultInjection | None:
    """The test suite's fault injection, imported only when a T2I_FAULT_* variable asks for it."""
    if not any(k.startswith("T2I_FAULT_") and v for k, v in os.environ.items()):
        return None
    from t2i_dist.engine.faults import FaultInjection, InjectedFaults

    return FaultInjection(InjectedFaults.from_env())


class TrainLoop:
    def __init__(self, cfg: Config, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        built = build_training(cfg, ctx.placement, ctx.rank, ctx.world_size, shards=ctx.run_info.get("shards"))
        assert built.loader is not None
        self.plugin, self.engines, self.counts, self.loader = built.plugin, built.engines, built.counts, built.loader
        info = ctx.run_info
        self.tracker = (
            Tracker(info["tracking_uri"], info["mlflow_run_id"], info["fallback_dir"])
            if self.rank == 0 and info.get("mlflow_run_id")
            else None
        )
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.nonfinite = NonFiniteGuard(cfg.run.max_nonfinite_steps)
        self.faults = _injected_faults()
        self.components = self.default_components()

    def default_components(self) -> list[Component]:
        generates = family(self.cfg.model.family).generates_images
        order: list[Component | None] = [
            self.faults,
            Preemption(self),
            MetricsLog(),
            self.nonfinite,
            SampleGrids() if generates else HeldOutMeasure(self.cfg),
            InTrainingEvaluation(self) if generates and 0 < self.cfg.eval.every <= self.cfg.run.max_steps else None,
            Checkpoints(),
        ]
        return [c for c in order if c is not None]

    # -- services for components (components.base.Loop) -----------------------------------------------
    @property
    def nonfinite_total(self) -> int:
        return self.nonfinite.total

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[t2i_dist] {message}", flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step)

    def restore(self) -> None:
        with self.ctx.sink.restore_dir() as directory:
            if directory is None:
                return
            state, data_state = ckpt.restore_checkpoint(
                directory, self.engines, self.plugin, rank=self.rank, world_size=self.world
            )
        self.step = state["step"]
        # what the run published with that checkpoint (its last evaluation), as an uninterrupted run has it
        self.last_metrics = dict(state.get("metrics", {}))
        if data_state is not None:
            self.loader.load_state_dict(data_state)
        self.say(f"resumed from checkpoint at step {self.step}")

    def save(self, metrics: dict[str, float]) -> None:
        if self.tracker:
            # what was logged up to this checkpoint is in MLflow before it is published: a crash after it
            # loses no metric the restarted run will not log again
            self.tracker.flush(timeout_s=30)
        directory = ckpt.new_local_dir()
        try:
            ckpt.write_checkpoint(
                directory,
                self.engines,
                self.plugin,
                rank=self.rank,
                world_size=self.world,
                step=self.step,
                data_state=self.loader.state_dict(),
                config=self.cfg.to_dict(),
                run_info={"mlflow_run_id": self.ctx.run_info.get("mlflow_run_id"), "metrics": metrics},
                before_manifest=self.faults.save_hook(self) if self.faults else None,
            )
            self.ctx.sink.publish({**metrics, "step": self.step}, directory)
        finally:
            ckpt.remove_local_dir(directory)
        self.log_metrics({"checkpoint/step": self.step}, self.step)

    # -- the loop ----------------------------------------------------------------------------------------
    def train_one_step(self, data: Any) -> StepOutcome:
        accum = self.cfg.deepspeed.grad_accum_steps
        # per-micro-batch metrics stay tensors where they were computed (float() on a GPU tensor waits for the
        # GPU: one stall per metric per micro-batch); float64 sums, converted once per step below
        sums: dict[str, torch.Tensor] = {}
        wait = 0.0
        skipped_before = sum(e.skipped_steps for e in self.engines.values())
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(data).to(self.device)
            wait += time.perf_counter() - t0
            for component in self.components:
                component.before_micro_batch(self, self.step + 1, batch)
            out = self.plugin.train_step(batch, self.step + 1)
            for k, v in out.items():
                v = torch.as_tensor(v).detach().to(self.device, torch.float64) / accum
                sums[k] = sums[k] + v if k in sums else v
        self.step += 1
        self.plugin.after_optimizer_step(self.step)
        metrics = dict(zip(sums, torch.stack(list(sums.values())).tolist(), strict=True)) if sums else {}
        # a step is lost when a loss was non-finite on some rank (the engine skipped it) or when DeepSpeed
        # found non-finite gradients (it skipped the optimizer step; counted per engine)
        overflowed = sum(e.skipped_steps for e in self.engines.values()) > skipped_before
        local = {"nonfinite": overflowed or not math.isfinite(metrics["loss"])}
        for component in self.components:
            local.update(component.flags(self))
        names = sorted(local)
        agreed = dict(zip(names, dist.any_rank([local[n] for n in names], self.device), strict=True))
        nonfinite = agreed.pop("nonfinite")
        self.nonfinite.update(nonfinite)
        return StepOutcome(self.step, metrics, wait, nonfinite, agreed)

    def run(self) -> None:
        cfg, p = self.cfg, self.ctx.placement
        self.say(
            f"precision {p.precision} ({p.reason}); backend {p.backend}; ZeRO stage "
            f"{cfg.deepspeed.zero_stage}; {self.world} workers"
        )
        self.say("parameters: " + ", ".join(f"{k.split('/')[-1]} {v / 1e6:.2f}M" for k, v in self.counts.items()))
        self.restore()
        for component in self.components:
            component.start(self)
        data = iter(self.loader)
        stopped = False
        try:
            while self.step < cfg.run.max_steps:
                outcome = self.train_one_step(data)
                for component in self.components:
                    component.after_step(self, outcome)
                if outcome.stop:
                    stopped = True
                    break
            if not stopped:
                for component in self.components:
                    component.finish(self)
        finally:
            for component in self.components:
                component.close(self, stopped)
            self.close(timeout_s=cfg.run.preemption_grace_s / 2 if stopped else 30.0)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.tracker:
            fallback = self.tracker.close(timeout_s)
            if fallback:
                self.say(f"some tracking records could not be sent; they are in {fallback}")
