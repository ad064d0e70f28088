"""The training loop every Ray Train worker runs, shared by all model families."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
import torch.distributed as dist

from t2i_dist.config import Config, validate_config
from t2i_dist.data.shards import ShardLoader
from t2i_dist.engine import checkpoint as ckpt
from t2i_dist.engine.engines import build_engines, grad_norm
from t2i_dist.engine.precision import resolve_placement
from t2i_dist.engine.progress import StepMeter
from t2i_dist.eval.in_training import InTrainingEval
from t2i_dist.images import png_bytes_of_grid, prompt_seeds
from t2i_dist.models import plugin_class
from t2i_dist.models.base import ModelPlugin
from t2i_dist.tracking import Tracker

log = logging.getLogger("t2i_dist.train")


_SIGTERM_RECEIVED = threading.Event()
PREEMPTION_POLL_S = 2.0  # how often rank 0 looks for the driver's preemption request


def _on_sigterm(signum: int, frame: Any) -> None:
    if _SIGTERM_RECEIVED.is_set():
        raise SystemExit(128 + signum)  # asked twice: stop now, as Ray's own handler would
    _SIGTERM_RECEIVED.set()


def _install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def install_sigterm_handler() -> bool:
    """Route SIGTERM to the preemption flag instead of Ray's handler, which exits the worker at once.

    Python installs handlers from the main thread only, and Ray Train runs the training function in another
    thread of its worker actor; a call on the actor itself runs on the main thread (a sync actor)."""
    if threading.current_thread() is threading.main_thread():
        _install_sigterm_handler()
        return True
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_sigterm_handler), timeout=120)
        return True
    except Exception as exc:  # noqa: BLE001 - preemption then only arrives through the driver's request
        log.warning("SIGTERM handler not installed (%s: %s); a SIGTERM will end this worker without a "
                    "checkpoint", type(exc).__name__, exc)
        return False


class PreemptionWatch:
    """A request to checkpoint and stop: SIGTERM to this worker (what Slurm sends every process of a job),
    or the driver's request file (written when the driver gets SIGTERM, e.g. from Kubernetes).

    Also notices when Ray drains a node of this worker group (spot reclaim, autoscaler, `ray start` getting
    SIGTERM): then one checkpoint is written at once and training goes on; Ray Train restarts the group from
    it when the node leaves (FailureConfig.max_preemption_failures)."""

    def __init__(self, request_url: str | None, s3: Any, rank: int) -> None:
        self.request_url = request_url if rank == 0 else None  # one rank looks; the all-reduce tells the rest
        self.s3 = s3
        self._next_poll = 0.0
        self._file_seen = False
        self._next_drain_poll = time.monotonic() + PREEMPTION_POLL_S if rank == 0 else math.inf
        self.drain_checkpointed = False
        install_sigterm_handler()

    def drain_poll_due(self) -> bool:
        """Rank 0 decides when to ask Ray about drains; every rank then asks in the same step (a collective)."""
        if self.drain_checkpointed or time.monotonic() < self._next_drain_poll:
            return False
        self._next_drain_poll = time.monotonic() + PREEMPTION_POLL_S
        return True

    @staticmethod
    def node_draining() -> bool:
        return ray.train.get_preemption_info() is not None

    def requested(self) -> bool:
        if _SIGTERM_RECEIVED.is_set() or self._file_seen:
            return True
        if self.request_url and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + PREEMPTION_POLL_S
            try:
                from t2i_dist.data.s3 import filesystem

                fs, path = filesystem(self.request_url, self.s3)
                self._file_seen = fs.exists(path)
            except Exception as exc:  # noqa: BLE001 - storage hiccups must not stop training
                log.warning("could not look for the preemption request %s: %s", self.request_url, exc)
        return self._file_seen


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of per-rank flags, in one tiny all-reduce, so every rank takes the same branch."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


class NonFiniteGuard:
    """Counts steps that were skipped for a non-finite loss or gradient (the optimizer did not move), and
    stops the run after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1

    def check(self) -> None:
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient (run.max_nonfinite_steps="
                f"{self.limit}); stopping with the last good checkpoint kept. Lower optim.lr, raise "
                "deepspeed.gradient_clipping or use deepspeed.precision=fp32."
            )


def _parse_steps(text: str) -> set[int]:
    """'3,5-7' -> {3, 5, 6, 7}"""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


@dataclass
class InjectedFaults:
    """Faults the test suite injects, through T2I_FAULT_* variables read only here; unset in real runs.

    T2I_FAULT_MARKER_DIR: every worker writes its PID to <dir>/rank<r>.pid, for tests that signal workers.
    T2I_FAULT_NAN_LOSS_STEPS / T2I_FAULT_NAN_GRAD_STEPS ('3,5-7'): the last rank's batch becomes NaN (so its
    loss does), or every rank's gradients do, at those steps. T2I_FAULT_PAUSE_SAVE_STEP: the save at that step
    writes <dir>/save-step<N>-rank<r>.json (pid, directory) and pauses before its manifest (T2I_FAULT_PAUSE_S),
    once, so a test can kill a worker in mid-save."""

    nan_loss_steps: set[int] = field(default_factory=set)
    nan_grad_steps: set[int] = field(default_factory=set)
    pause_save_step: int | None = None
    marker_dir: str | None = None
    pause_s: float = 120.0
    poison_grads: bool = False

    @classmethod
    def from_env(cls) -> InjectedFaults:
        env = os.environ
        pause = env.get("T2I_FAULT_PAUSE_SAVE_STEP")
        return cls(_parse_steps(env.get("T2I_FAULT_NAN_LOSS_STEPS", "")),
                   _parse_steps(env.get("T2I_FAULT_NAN_GRAD_STEPS", "")),
                   int(pause) if pause else None, env.get("T2I_FAULT_MARKER_DIR"),
                   float(env.get("T2I_FAULT_PAUSE_S", "120")))

    def arm(self, engines: dict[str, Any], rank: int) -> None:
        if self.marker_dir:
            Path(self.marker_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
        if not self.nan_grad_steps:
            return
        for engine in engines.values():
            for p in engine.module.parameters():
                if p.requires_grad:
                    p.register_hook(lambda g: g * float("nan") if self.poison_grads else g)

    def before_step(self, step: int, batch: Any, rank: int, world: int) -> None:
        self.poison_grads = step in self.nan_grad_steps
        if step in self.nan_loss_steps and rank == world - 1:
            for tensor in (batch.images, batch.latents):
                if tensor is not None:
                    tensor.fill_(float("nan"))

    def save_hook(self, step: int, rank: int):
        if step != self.pause_save_step or not self.marker_dir:
            return None
        marker = Path(self.marker_dir, f"save-step{step}-rank{rank}.json")
        if marker.exists():  # the step is trained again after the restart: pause only once
            return None

        def pause(directory: Path) -> None:
            marker.write_text(json.dumps({"pid": os.getpid(), "directory": str(directory)}))
            time.sleep(self.pause_s)

        return pause


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _sum_counts_across_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-reason counts of the whole run (ranks meet different bad samples, so the keys differ)."""
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    total: dict[str, int] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def prompt_diversity(images: torch.Tensor, per_prompt: int, num_prompts: int) -> float:
    """Mean pairwise L2 distance between images of the same prompt (images grouped by seed, then prompt);
    near 0 means the generator ignores its noise — mode collapse."""
    if per_prompt < 2:
        return float("nan")
    grouped = images.reshape(per_prompt, num_prompts, -1).transpose(0, 1)  # prompt, seed, pixels
    dists = torch.cdist(grouped.float(), grouped.float())
    n = per_prompt
    return float(dists.sum() / (num_prompts * n * (n - 1)))


class TrainLoop:
    def __init__(self, cfg: Config, run_info: dict[str, Any]):
        self.cfg = cfg
        self.run_info = run_info
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.cluster.threads_per_worker)
        self.placement = resolve_placement(cfg, ctx.get_local_rank())
        if self.placement.device.type == "cuda":
            torch.cuda.set_device(self.placement.device)
        deepspeed.init_distributed(dist_backend=self.placement.backend)  # reuses Ray's process group
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.plugin: ModelPlugin = plugin_class(cfg.model.family)(cfg, self.placement.device, self.placement.dtype)
        self.counts = self.plugin.parameter_counts()
        self.engines = build_engines(cfg, self.placement, self.plugin.trainables())
        self.plugin.attach_engines(self.engines)
        self.faults = InjectedFaults.from_env()
        self.faults.arm(self.engines, self.rank)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)
        self.loader = ShardLoader(cfg.data, cfg.deepspeed.micro_batch_size, self.rank, self.world, cfg.run.seed,
                                  shards=run_info.get("shards"), pin_memory=self.placement.device.type == "cuda")
        self.evaluator = InTrainingEval(cfg, self.rank, self.world, self.placement.device) if cfg.eval.every else None
        self.tracker = (
            Tracker(run_info["tracking_uri"], run_info["mlflow_run_id"], run_info["fallback_dir"])
            if self.rank == 0 and run_info.get("mlflow_run_id") else None
        )
        self.step = 0

    # -- logging helpers ---------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[t2i_dist] {message}", flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step)

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.run_info.get("resume"):
            # --resume: only when this run has no checkpoint of its own yet (a restart keeps its progress)
            checkpoint = ray.train.Checkpoint(self.run_info["resume"])
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            state, data_state = ckpt.restore_checkpoint(
                Path(directory), self.engines, self.plugin, rank=self.rank, world_size=self.world)
        self.step = state["step"]
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
                directory, self.engines, self.plugin, rank=self.rank, world_size=self.world, step=self.step,
                data_state=self.loader.state_dict(), config=self.cfg.to_dict(),
                run_info={"mlflow_run_id": self.run_info.get("mlflow_run_id")},
                before_manifest=self.faults.save_hook(self.step, self.rank),
            )
            ckpt.report_checkpoint({**metrics, "step": self.step}, directory)
        finally:
            ckpt.remove_local_dir(directory)
        self.log_metrics({"checkpoint/step": self.step}, self.step)

    def sample_grid(self) -> None:
        if self.rank != 0:
            return
        t = self.cfg.tracking
        prompts, seeds = prompt_seeds(t.sample_prompts, t.samples_per_prompt, self.cfg.run.seed)
        start = time.perf_counter()
        images = self.plugin.sample(prompts, seeds)
        seconds = (time.perf_counter() - start) / len(prompts)
        diversity = prompt_diversity(images, t.samples_per_prompt, len(t.sample_prompts))
        self.log_metrics({"sample/seconds_per_image": seconds, "sample/diversity": diversity}, self.step)
        if self.tracker:
            self.tracker.log_image(png_bytes_of_grid(images, len(t.sample_prompts)),
                                   f"samples/step_{self.step:06d}.png")

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        self.say(f"precision {self.placement.precision} ({self.placement.reason}); backend "
                 f"{self.placement.backend}; ZeRO stage {cfg.deepspeed.zero_stage}; {self.world} workers")
        self.say("parameters: " + ", ".join(f"{k.split('/')[-1]} {v / 1e6:.2f}M" for k, v in self.counts.items()))
        self.restore()
        if self.step == 0:
            self.log_metrics({k: float(v) for k, v in self.counts.items()}, 0)
        meter = StepMeter(self.step, cfg.run.max_steps, cfg.global_batch_size)
        guard = NonFiniteGuard(cfg.run.max_nonfinite_steps)
        preemption = PreemptionWatch(self.run_info.get("preemption_request"), cfg.data.s3, self.rank)
        data = iter(self.loader)
        device = self.placement.device
        last: dict[str, float] = {}
        window: dict[str, float] = {}  # metric sums over the steps since the last log line
        window_steps = 0
        stop = False
        try:
            while self.step < cfg.run.max_steps:
                sums: dict[str, float] = {}
                wait = 0.0
                skipped_before = sum(e.skipped_steps for e in self.engines.values())
                for _ in range(cfg.deepspeed.grad_accum_steps):
                    t0 = time.perf_counter()
                    batch = next(data).to(device)
                    wait += time.perf_counter() - t0
                    self.faults.before_step(self.step + 1, batch, self.rank, self.world)
                    out = self.plugin.train_step(batch, self.step + 1)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / cfg.deepspeed.grad_accum_steps
                self.step += 1
                self.plugin.after_optimizer_step(self.step)
                # a step is lost when a loss was non-finite on some rank (the plug-in skipped it) or when
                # DeepSpeed found non-finite gradients (it skipped the optimizer step; counted per engine)
                overflowed = sum(e.skipped_steps for e in self.engines.values()) > skipped_before
                stop, nonfinite, poll_drain = any_rank(
                    [preemption.requested(), overflowed or not math.isfinite(sums["loss"]),
                     preemption.drain_poll_due()], device)
                drain = poll_drain and not stop and preemption.node_draining()
                guard.update(nonfinite)
                meter.add(wait)
                if math.isfinite(sums["loss"]):
                    window_steps += 1
                    for k, v in sums.items():
                        window[k] = window.get(k, 0.0) + v
                if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps or stop or nonfinite:
                    meter.close_window()
                    # same keys on every rank even when a rank's window held only skipped steps
                    means = {k: window.get(k, float("nan")) / max(1, window_steps) for k in sums}
                    metrics = _mean_across_ranks(means, device)
                    window, window_steps = {}, 0
                    metrics.update({
                        "img_per_s": meter.img_per_s,
                        "data_wait_fraction": meter.data_wait_fraction,
                        "nonfinite_steps": float(guard.total),
                    })
                    for name, engine in self.engines.items():
                        metrics[f"lr/{name}"] = engine.get_lr()[0]
                        metrics[f"grad_norm/{name}"] = grad_norm(engine)
                    skipped = _sum_counts_across_ranks(self.loader.skip_counts())
                    metrics["data/skipped"] = float(sum(skipped.values()))
                    metrics.update({f"data/skipped/{k}": float(v) for k, v in skipped.items()})
                    self.say(meter.line(self.step, metrics))
                    self.log_metrics(metrics, self.step)
                    last = metrics
                guard.check()  # after logging, so the count that stopped the run is recorded
                if cfg.run.sample_every and self.step % cfg.run.sample_every == 0 and not stop:
                    self.sample_grid()
                if self.evaluator and self.evaluator.due(self.step) and not stop:
                    self.log_metrics(self.evaluator.run(self.plugin, self.step), self.step)  # collective
                if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.run.max_steps or stop or drain:
                    self.save({k: v for k, v in last.items() if math.isfinite(v)})
                if drain:
                    preemption.drain_checkpointed = True
                    self.say(f"a node of this run is being drained: checkpoint written at step {self.step}")
                if stop:
                    self.say(f"preempted: checkpoint written at step {self.step}; exiting")
                    break
            if self.step >= cfg.run.max_steps and (not cfg.run.sample_every or self.step % cfg.run.sample_every):
                self.sample_grid()
        finally:
            # also on an error: what was logged reaches MLflow or the fallback file
            self.close(timeout_s=cfg.run.preemption_grace_s / 2 if stop else 30.0)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.tracker:
            fallback = self.tracker.close(timeout_s)
            if fallback:
                self.say(f"some tracking records could not be sent; they are in {fallback}")


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to ray.train.torch.TorchTrainer."""
    level = os.environ.get("T2I_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level)
    # open_clip logs every model build at INFO on the root logger; Ray Train logs every report
    for name in ("", "ray.train", "ray.train.v2", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(level)
    if loop_config.get("secret_env") is not None:
        loop_config["secret_env"].apply()  # credentials that must not travel in Ray's runtime_env (it logs it)
    cfg = validate_config(loop_config["config"])
    TrainLoop(cfg, loop_config["run_info"]).run()
