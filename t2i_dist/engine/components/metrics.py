"""Metric windows: per-step metrics summed over `run.log_every` steps, averaged over ranks, printed as a
step line (img/s, data wait, ETA) and logged by rank 0."""

from __future__ import annotations

import math

from t2i_dist import dist
from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.engine.progress import StepMeter


class MetricsLog(Component):
    collective = True  # the mean over ranks and the skip-count gather, on log steps only

    def __init__(self) -> None:
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.meter: StepMeter | None = None

    def start(self, loop: Loop) -> None:
        cfg = loop.cfg
        self.meter = StepMeter(loop.step, cfg.run.max_steps, cfg.global_batch_size)
        if loop.step == 0:
            loop.log_metrics({k: float(v) for k, v in loop.counts.items()}, 0)

    def _due(self, loop: Loop, outcome: StepOutcome) -> bool:
        run = loop.cfg.run
        return outcome.step % run.log_every == 0 or outcome.step == run.max_steps or outcome.stop or outcome.nonfinite

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        assert self.meter is not None
        self.meter.add(outcome.data_wait_s)
        if math.isfinite(outcome.metrics["loss"]):
            self.window_steps += 1
            for k, v in outcome.metrics.items():
                self.window[k] = self.window.get(k, 0.0) + v
        if not self._due(loop, outcome):
            return
        self.meter.close_window()
        # same keys on every rank even when a rank's window held only skipped steps
        means = {k: self.window.get(k, float("nan")) / max(1, self.window_steps) for k in outcome.metrics}
        metrics = dist.mean_across_ranks(means, loop.device)
        self.window, self.window_steps = {}, 0
        metrics.update(
            {
                "img_per_s": self.meter.img_per_s,
                "data_wait_fraction": self.meter.data_wait_fraction,
                "nonfinite_steps": float(loop.nonfinite_total),
            }
        )
        for name, engine in loop.engines.items():
            metrics[f"lr/{name}"] = engine.lr()
            metrics[f"grad_norm/{name}"] = engine.grad_norm()
        skipped = dist.sum_counts_across_ranks(loop.loader.skip_counts())
        metrics["data/skipped"] = float(sum(skipped.values()))
        metrics.update({f"data/skipped/{k}": float(v) for k, v in skipped.items()})
        loop.say(self.meter.line(outcome.step, metrics))
        loop.log_metrics(metrics, outcome.step)
        loop.last_metrics = metrics
