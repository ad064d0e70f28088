"""In-training evaluation every `eval.every` steps: FID (and text alignment on the synthetic set) over the
whole worker group, logged by rank 0."""

from __future__ import annotations

from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.eval.in_training import InTrainingEval


class InTrainingEvaluation(Component):
    collective = True  # every rank generates its share; one all-reduce joins the statistics

    def __init__(self, loop: Loop) -> None:
        self.evaluator = InTrainingEval(loop.cfg, loop.rank, loop.world, loop.device)

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        if self.evaluator.due(outcome.step) and not outcome.stop:
            loop.plugin.before_sampling()
            loop.log_metrics(self.evaluator.run(loop.plugin, outcome.step), outcome.step)
