"""In-training evaluation every `eval.every` steps: FID (and text alignment on the synthetic set) over the
whole worker group, logged by rank 0 and said in the log, real images' figures beside the generated ones."""

from __future__ import annotations

from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.eval.in_training import InTrainingEval
from t2i_dist.eval.summary import result_of_logged, summary_line


class InTrainingEvaluation(Component):
    collective = True  # every rank generates its share; one all-reduce joins the statistics

    def __init__(self, loop: Loop) -> None:
        self.evaluator = InTrainingEval(loop.cfg, loop.rank, loop.world, loop.device)

    def start(self, loop: Loop) -> None:
        # a rerun of a finished run trains nothing: it says the evaluation that run logged at its end
        logged = {k: v for k, v in loop.last_metrics.items() if k.startswith("eval/")}
        if loop.step >= loop.cfg.run.max_steps and logged:
            loop.say(
                f"nothing left to train; evaluation logged at step {loop.step}: "
                f"{summary_line(result_of_logged(logged))}"
            )

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        if self.evaluator.due(outcome.step) and not outcome.stop:
            loop.plugin.before_sampling()
            metrics = self.evaluator.run(loop.plugin, outcome.step)
            loop.log_metrics(metrics, outcome.step)
            loop.say(f"evaluation at step {outcome.step}: {summary_line(result_of_logged(metrics))}")
            loop.last_metrics = {**loop.last_metrics, **metrics}  # published with the checkpoint of this step
