"""Checkpoints every `run.checkpoint_every` steps, at the last step, on preemption and on a drain."""

from __future__ import annotations

import math

from t2i_dist.engine.components.base import Component, Loop, StepOutcome


class Checkpoints(Component):
    collective = True  # DeepSpeed's save and ZeRO-3 gathers

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        run = loop.cfg.run
        drain = outcome.flags.get("drain", False)
        if outcome.step % run.checkpoint_every == 0 or outcome.step == run.max_steps or outcome.stop or drain:
            loop.save({k: v for k, v in loop.last_metrics.items() if math.isfinite(v)})
        if drain:
            loop.say(f"a node of this run is being drained: checkpoint written at step {outcome.step}")
        if outcome.stop:
            loop.say(f"preempted: checkpoint written at step {outcome.step}; exiting")
