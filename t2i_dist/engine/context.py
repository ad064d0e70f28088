"""What the loop needs from whatever launched it: who this process is (rank, world, device) and where
checkpoints go. `ray_worker.py` provides both under Ray Train; `local_context` in a plain process (tests,
benchmarks, a one-GPU check), so the loop itself never imports Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch
import torch.distributed as torch_dist

from t2i_dist import dist
from t2i_dist.config import Config
from t2i_dist.engine.precision import Placement, resolve_placement
from t2i_dist.processes import free_port

SIGTERM_RECEIVED = threading.Event()


class CheckpointSink(Protocol):
    def restore_dir(self) -> AbstractContextManager[Path | None]:
        """The checkpoint directory to resume from (None: start fresh), valid inside the block."""
        ...

    def publish(self, metrics: dict[str, Any], directory: Path) -> None:
        """Collective: every rank hands over its private directory; together they form one checkpoint."""
        ...


def _on_sigterm(signum: int, frame: Any) -> None:
    if SIGTERM_RECEIVED.is_set():
        raise SystemExit(128 + signum)  # asked twice: stop now
    SIGTERM_RECEIVED.set()


def install_sigterm_handler() -> bool:
    """Route SIGTERM to the preemption flag (checkpoint, then stop) instead of ending the process."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


@dataclass
class RunContext:
    rank: int
    world_size: int
    local_rank: int
    placement: Placement
    sink: CheckpointSink
    # driver-made facts: mlflow_run_id, tracking_uri, fallback_dir, shards, preemption_request
    run_info: dict[str, Any] = field(default_factory=dict)
    node_draining: Callable[[], bool] = lambda: False
    install_sigterm: Callable[[], bool] = install_sigterm_handler

    @property
    def device(self) -> torch.device:
        return self.placement.device


def prepare_process(cfg: Config, local_rank: int, device: torch.device | None = None) -> Placement:
    """Threads, device, precision and the process group DeepSpeed uses (an existing one is reused)."""
    torch.set_num_threads(cfg.cluster.threads_per_worker)
    placement = resolve_placement(cfg, local_rank, device)
    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)
    deepspeed.init_distributed(dist_backend=placement.backend)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return placement


class LocalCheckpointSink:
    """Checkpoints as `<root>/checkpoint_<step>` directories on a file system every rank sees; the newest
    complete one (or `resume`) is restored. A directory appears under its final name only once complete."""

    def __init__(self, root: str | Path, keep: int = 3, resume: str | None = None):
        self.root = Path(root)
        self.keep = keep
        self.resume = resume

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Path | None]:
        existing = self.checkpoints()
        yield existing[-1] if existing else (Path(self.resume) if self.resume else None)

    def publish(self, metrics: dict[str, Any], directory: Path) -> None:
        step = int(metrics["step"])
        final = self.root / f"checkpoint_{step:06d}"
        partial = self.root / f".partial-checkpoint_{step:06d}"
        if dist.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        if dist.initialized():
            torch_dist.barrier()
        shutil.copytree(directory, partial, dirs_exist_ok=True)
        if dist.initialized():
            torch_dist.barrier()
        if dist.rank() == 0:
            (partial / "metrics.json").write_text(json.dumps(metrics))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.initialized():
            torch_dist.barrier()


def local_context(
    cfg: Config,
    root: str | Path,
    *,
    resume: str | None = None,
    run_info: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> RunContext:
    """A one-process run context: a one-rank process group (gloo, or nccl on a GPU) unless one exists already
    (then its rank and size are used), checkpoints under `root`."""
    if not dist.initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    placement = prepare_process(cfg, local_rank, device)
    sink = LocalCheckpointSink(root, cfg.run.keep_checkpoints, resume)
    return RunContext(dist.rank(), dist.world_size(), local_rank, placement, sink, dict(run_info or {}))
