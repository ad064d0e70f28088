"""Preemption and drains. A request to checkpoint and stop is SIGTERM to this worker (what Slurm sends every
process of a job) or the driver's request file (written when the driver gets SIGTERM, e.g. from
Kubernetes). A node drain (spot reclaim, autoscaler) makes the run write one checkpoint at once and go on;
the launcher restarts the group from it when the node leaves."""

from __future__ import annotations

import logging
import math
import time

from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.engine.context import SIGTERM_RECEIVED
from t2i_dist.storage import filesystem

log = logging.getLogger(__name__)


class Preemption(Component):
    collective = False  # its flags travel in the loop's per-step agreement

    def __init__(self, loop: Loop) -> None:
        # one rank looks for the request file; the agreement tells the rest
        self.request_url = loop.ctx.run_info.get("preemption_request") if loop.rank == 0 else None
        self.s3 = loop.cfg.data.s3
        # run.preemption_poll_s: each look is a storage call (an S3 request on s3:// runs) and each drain
        # question a call to Ray, both in the step; a SIGTERM to a worker is seen at the next step regardless
        self.poll_s = loop.cfg.run.preemption_poll_s
        self._next_poll = 0.0
        self._file_seen = False
        self._next_drain_poll = time.monotonic() + self.poll_s if loop.rank == 0 else math.inf
        self.drain_checkpointed = False

    def start(self, loop: Loop) -> None:
        if not loop.ctx.install_sigterm():
            log.warning("SIGTERM handler not installed; a SIGTERM will end this worker without a checkpoint")

    def requested(self) -> bool:
        if SIGTERM_RECEIVED.is_set() or self._file_seen:
            return True
        if self.request_url and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            try:
                fs, path = filesystem(self.request_url, self.s3)
                self._file_seen = fs.exists(path)
            except Exception as exc:  # noqa: BLE001 - storage hiccups must not stop training
                log.warning("could not look for the preemption request %s: %s", self.request_url, exc)
        return self._file_seen

    def _drain_poll_due(self) -> bool:
        """Rank 0 decides when to ask about drains; every rank then asks in the same step."""
        if self.drain_checkpointed or time.monotonic() < self._next_drain_poll:
            return False
        self._next_drain_poll = time.monotonic() + self.poll_s
        return True

    def flags(self, loop: Loop) -> dict[str, bool]:
        return {"stop": self.requested(), "poll_drain": self._drain_poll_due()}

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        drain = outcome.flags["poll_drain"] and not outcome.stop and loop.ctx.node_draining()
        outcome.flags["drain"] = drain
        if drain:
            self.drain_checkpointed = True  # one checkpoint per drain; Checkpoints writes it this step
