"""The loop under Ray Train: a RunContext from Ray Train's worker context, checkpoints through
`ray.train.report`, drains from Ray's preemption info, SIGTERM routed through the worker actor."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train

from t2i_dist.engine.checkpoint import newest_complete_checkpoint
from t2i_dist.engine.context import RunContext, install_sigterm_handler, prepare_process
from t2i_dist.engine.loop import TrainLoop
from t2i_dist.models.registry import validate_config

log = logging.getLogger("t2i_dist.train")


class RayCheckpointSink:
    """Ray Train publishes a checkpoint once every rank has reported its directory (merged into one)."""

    def __init__(self, resume: str | None, run_dir: str | None = None, s3: Any = None):
        self.resume = resume
        self.run_dir = run_dir
        self.s3 = s3

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.run_dir:
            # a restart after a worker died before Ray's controller registered the last report: the run's
            # own newest complete checkpoint on its storage (every rank picks the same one)
            found = newest_complete_checkpoint(self.run_dir, self.s3)
            if found:
                log.warning(
                    "Ray Train handed back no checkpoint; resuming from the run's newest complete one, %s", found
                )
                checkpoint = ray.train.Checkpoint(found)
        if checkpoint is None and self.resume:
            # --resume: only when this run has no checkpoint of its own yet (a restart keeps its progress)
            checkpoint = ray.train.Checkpoint(self.resume)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def publish(self, metrics: dict[str, Any], directory: Path) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def install_sigterm_through_actor() -> bool:
    """Python installs handlers from the main thread only, and Ray Train runs the training function in another
    thread of its worker actor; a call on the actor itself runs on the main thread (a sync actor)."""
    if threading.current_thread() is threading.main_thread():
        return install_sigterm_handler()
    try:
        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.execute.remote(install_sigterm_handler), timeout=120))
    except Exception as exc:  # noqa: BLE001 - preemption then only arrives through the driver's request
        log.warning("SIGTERM handler not installed (%s: %s)", type(exc).__name__, exc)
        return False


def node_draining() -> bool:
    return ray.train.get_preemption_info() is not None


def ray_context(cfg: Any, run_info: dict[str, Any]) -> RunContext:
    ctx = ray.train.get_context()
    device = None
    if cfg.cluster.use_gpu:
        from ray.train.torch import get_device

        # the GPU Ray Train assigned to this worker (CUDA_VISIBLE_DEVICES is Ray's choice), not cuda:local_rank
        device = get_device()
    placement = prepare_process(cfg, ctx.get_local_rank(), device)
    return RunContext(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        placement=placement,
        sink=RayCheckpointSink(run_info.get("resume"), run_info.get("run_dir"), cfg.data.s3),
        run_info=run_info,
        node_draining=node_draining,
        install_sigterm=install_sigterm_through_actor,
    )


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
    TrainLoop(cfg, ray_context(cfg, loop_config["run_info"])).run()
