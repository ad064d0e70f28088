"""DeepSpeed engines for a plug-in's trainable networks: ds_config from our config, client optimizers, and
the engine a plug-in sees (`TrainedNetwork`: forward, the finite-loss skip, ZeRO-3 gathering)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Protocol

import deepspeed
import torch
from torch import nn

from t2i_dist import dist
from t2i_dist.config import Config
from t2i_dist.engine.precision import Placement
from t2i_dist.engine.zero import gathered, is_partitioned
from t2i_dist.models.base import Trainable

# DeepSpeed's default communication bucket (elements); ZeRO-3 allocates one in full per rank
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
BUCKET_ALIGNMENT = 1024  # elements; a multiple of every NCCL/gloo start-alignment factor
# ZeRO-3 keeps parameters of at most this many elements resident (DeepSpeed's own default, 1e5)
MAX_PERSISTENCE_THRESHOLD = 100_000


def bucket_elements(params: list[torch.nn.Parameter], zero_stage: int) -> int:
    """Communication buckets sized to the model, at most DeepSpeed's default. With the default 5e8 elements
    every ZeRO-3 rank held a 1.9 GiB fp32 bucket whatever the model size: 156x the whole ZeRO-0 model state
    of ldm-tiny (python -m t2i_dist.bench --only 4). ZeRO-3 keeps its bucket for the whole run, so it gets an
    eighth of the model (at least the largest tensor); ZeRO-1/2 allocate theirs only during backward and
    get the whole model: one reduction per step, as with the default on models below 5e8 elements."""
    sizes = [p.numel() for p in params] or [1]
    wanted = max(max(sizes), sum(sizes) // 8) if zero_stage == 3 else sum(sizes)
    aligned = -(-wanted // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT  # DeepSpeed wants whole alignment units
    return int(min(DEEPSPEED_DEFAULT_BUCKET, aligned))


def persistence_threshold(params: list[torch.nn.Parameter]) -> int:
    """ZeRO-3: tensors up to a thousandth of the model (at most 1e5 elements) stay whole on every rank. Biases and
    norms are a sliver of the memory but most of the tensors: partitioning them (threshold 0) cost one gather per
    tensor per forward and backward, many tiny collectives per layer."""
    return int(min(MAX_PERSISTENCE_THRESHOLD, sum(p.numel() for p in params) // 1000))


def deepspeed_config(
    cfg: Config, placement: Placement, zero_stage: int, bucket: int | None = None, persist_up_to: int = 0
) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1 and bucket is not None:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
    if zero_stage >= 2:
        zero.update(overlap_comm=placement.device.type == "cuda", contiguous_gradients=True)
    if zero_stage == 3:
        # keep small parameters resident (`persistence_threshold`): partitioning tiny tensors only adds collectives
        zero.update(stage3_param_persistence_threshold=persist_up_to, stage3_gather_16bit_weights_on_model_save=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": placement.device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": placement.precision == "bf16"},
        "steps_per_print": 10**9,  # our own step lines replace DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def warmup_schedule(warmup_steps: int):
    return lambda step: 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


class DeepSpeedEngine(Protocol):
    """The part of deepspeed.DeepSpeedEngine this project uses."""

    module: nn.Module
    skipped_steps: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> None: ...
    def gradient_accumulation_steps(self) -> int: ...
    def get_lr(self) -> list[float]: ...
    def get_global_grad_norm(self) -> float | torch.Tensor | None: ...
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = ...) -> Any: ...
    def load_checkpoint(
        self, load_dir: str, tag: str, load_optimizer_states: bool = ..., load_lr_scheduler_states: bool = ...
    ) -> tuple[str | None, Any]: ...


class TrainedNetwork:
    """One trainable network inside its DeepSpeed engine, as a plug-in uses it (models.base.TrainedEngine)."""

    def __init__(self, engine: DeepSpeedEngine):
        self.engine = engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def partitioned(self) -> bool:
        return is_partitioned(self.engine.module.parameters())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """engine.backward + engine.step unless the loss is non-finite on any rank; then the micro-batch is
        dropped on every rank together (so collectives stay matched) and False is returned.

        Without gradient accumulation a dropped micro-batch is a skipped step: no backward, no step, no optimizer
        movement. With accumulation DeepSpeed counts micro-batches itself (engine.step applies the update on
        every grad_accum_steps-th call), so skipping its backward and step would shift its boundaries against
        the loop's steps: the bad micro-batch is instead dropped by backpropagating zero through every trainable
        parameter (the same reduction hooks and collectives as a real backward, zero gradient added) and the
        step is still counted; the update then comes from the other micro-batches."""
        if dist.all_finite(loss):
            self.engine.backward(loss)
            self.engine.step()
            return True
        if self.engine.gradient_accumulation_steps() > 1:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            # ZeRO-3: full parameters, so each gradient has the size its reduction hook expects (a no-op for
            # parameters still gathered from this micro-batch's forward, and under ZeRO 0-2)
            with gathered(params):
                zero = torch.stack([p.sum().float() for p in params]).sum() * 0.0
                self.engine.backward(zero)
            self.engine.step()
        return False

    def gathered(self) -> AbstractContextManager[object]:
        return gathered(list(self.engine.module.parameters()))

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped for non-finite gradients."""
        return self.engine.skipped_steps

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float:
        value = self.engine.get_global_grad_norm()
        if value is None:
            return float("nan")
        value = float(value)
        return value if math.isfinite(value) else float("nan")


def build_engine(cfg: Config, placement: Placement, trainable: Trainable) -> TrainedNetwork:
    stage = cfg.deepspeed.zero_stage if trainable.zero_stage is None else trainable.zero_stage
    groups = trainable.param_groups()
    params = [p for g in groups for p in g["params"]]
    ds_config = deepspeed_config(cfg, placement, stage, bucket_elements(params, stage), persistence_threshold(params))
    if cfg.deepspeed.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's CPU Adam (compiled on first use); chosen only when asked for
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=trainable.lr, betas=trainable.betas, eps=trainable.eps)
    else:
        # a client torch optimizer: no compiled ops. torch ships fused AdamW kernels for CUDA and CPU; on CPU
        # the fused step measured ~3x faster than the default per-tensor loop on ldm-tiny's UNet
        optimizer = torch.optim.AdamW(
            groups,
            lr=trainable.lr,
            betas=trainable.betas,
            eps=trainable.eps,
            fused=placement.device.type in ("cuda", "cpu"),
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(cfg.optim.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=trainable.module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return TrainedNetwork(engine)


def build_engines(cfg: Config, placement: Placement, trainables: dict[str, Trainable]) -> dict[str, TrainedNetwork]:
    return {name: build_engine(cfg, placement, t) for name, t in trainables.items()}
