"""DeepSpeed engines for a plug-in's trainable networks: ds_config from our config, client optimizers."""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch

from t2i_dist.config import Config
from t2i_dist.engine.precision import Placement
from t2i_dist.models.base import Trainable


def deepspeed_config(cfg: Config, placement: Placement, zero_stage: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 2:
        zero.update(overlap_comm=placement.device.type == "cuda", contiguous_gradients=True)
    if zero_stage == 3:
        # keep small parameters resident: partitioning tiny tensors only adds collectives
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
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


def build_engine(cfg: Config, placement: Placement, trainable: Trainable) -> Any:
    stage = cfg.deepspeed.zero_stage if trainable.zero_stage is None else trainable.zero_stage
    ds_config = deepspeed_config(cfg, placement, stage)
    params = [p for p in trainable.module.parameters() if p.requires_grad]
    if cfg.deepspeed.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's CPU Adam (compiled on first use); chosen only when asked for
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=trainable.lr, betas=trainable.betas, eps=trainable.eps,
                                     weight_decay=trainable.weight_decay)
    else:
        # a client torch optimizer: no compiled ops; fused kernels only exist on CUDA
        optimizer = torch.optim.AdamW(
            params, lr=trainable.lr, betas=trainable.betas, eps=trainable.eps,
            weight_decay=trainable.weight_decay, fused=placement.device.type == "cuda",
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(cfg.optim.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=trainable.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


def build_engines(cfg: Config, placement: Placement, trainables: dict[str, Trainable]) -> dict[str, Any]:
    return {name: build_engine(cfg, placement, t) for name, t in trainables.items()}


def grad_norm(engine: Any) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        return float("nan")
    value = float(value)
    return value if math.isfinite(value) else float("nan")
