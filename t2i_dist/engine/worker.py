"""The training loop every Ray Train worker runs, shared by all model families."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
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
from t2i_dist.images import png_bytes_of_grid, prompt_seeds
from t2i_dist.models import plugin_class
from t2i_dist.models.base import ModelPlugin
from t2i_dist.tracking import Tracker

log = logging.getLogger("t2i_dist.train")


class PreemptionWatch:
    """SIGTERM (what Slurm and Kubernetes send before killing) becomes a request to checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread of this process
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank was asked to stop (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


class NonFiniteGuard:
    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, loss: float) -> None:
        if math.isfinite(loss):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps had a non-finite loss; stopping with the last good "
                "checkpoint kept. Lower optim.lr, raise deepspeed.gradient_clipping or use precision=fp32."
            )


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


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
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)
        self.loader = ShardLoader(cfg.data, cfg.deepspeed.micro_batch_size, self.rank, self.world, cfg.run.seed,
                                  shards=run_info.get("shards"))
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
        directory = ckpt.new_local_dir()
        try:
            ckpt.write_checkpoint(
                directory, self.engines, self.plugin, rank=self.rank, world_size=self.world, step=self.step,
                data_state=self.loader.state_dict(), config=self.cfg.to_dict(),
                run_info={"mlflow_run_id": self.run_info.get("mlflow_run_id")},
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
        preemption = PreemptionWatch()
        data = iter(self.loader)
        device = self.placement.device
        last: dict[str, float] = {}
        window: dict[str, float] = {}  # metric sums over the steps since the last log line
        window_steps = 0
        while self.step < cfg.run.max_steps:
            sums: dict[str, float] = {}
            wait = 0.0
            for _ in range(cfg.deepspeed.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(data).to(device)
                wait += time.perf_counter() - t0
                out = self.plugin.train_step(batch, self.step + 1)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.deepspeed.grad_accum_steps
            self.step += 1
            self.plugin.after_optimizer_step(self.step)
            guard.update(sums["loss"])
            meter.add(wait)
            if math.isfinite(sums["loss"]):
                window_steps += 1
                for k, v in sums.items():
                    window[k] = window.get(k, 0.0) + v
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps:
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
                skipped = self.loader.skip_counts()
                metrics["data/skipped"] = float(sum(skipped.values()))
                metrics.update({f"data/skipped/{k}": float(v) for k, v in skipped.items()})
                self.say(meter.line(self.step, metrics))
                self.log_metrics(metrics, self.step)
                last = metrics
            if cfg.run.sample_every and self.step % cfg.run.sample_every == 0:
                self.sample_grid()
            stop = preemption.agreed(device)
            if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.run.max_steps or stop:
                self.save({k: v for k, v in last.items() if math.isfinite(v)})
            if stop:
                self.say(f"preempted: checkpoint written at step {self.step}; exiting")
                break
        if self.step >= cfg.run.max_steps and (not cfg.run.sample_every or self.step % cfg.run.sample_every):
            self.sample_grid()
        self.close()

    def close(self) -> None:
        if self.tracker:
            fallback = self.tracker.close()
            if fallback:
                self.say(f"some tracking records could not be sent; they are in {fallback}")


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to ray.train.torch.TorchTrainer."""
    level = os.environ.get("T2I_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level)
    # open_clip logs every model build at INFO on the root logger; Ray Train logs every report
    for name in ("", "ray.train", "ray.train.v2", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(level)
    cfg = validate_config(loop_config["config"])
    TrainLoop(cfg, loop_config["run_info"]).run()
