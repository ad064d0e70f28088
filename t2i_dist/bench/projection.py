"""Benchmark 7 (on paper): FLOPs per training sample of every shipped config, and the img/s an H100 would
reach at 40 % MFU, next to the published anchor (SD2's UNet at 256 px: ~137 img/s per A100 from latents).

FLOPs are counted by torch.utils.flop_counter on the meta device (shapes only, no compute, no weights):
matmuls, convolutions and attention, forward and backward -- the usual model-FLOPs convention (no
activation recomputation -- counted with gradient checkpointing off --, elementwise work and optimizer
steps not counted). LDM: the frozen VAE encoder
and text encoder forward (online encoding only) plus the UNet forward and backward, as LDMPlugin.train_step
runs them. GALIP: one LDM-free train_step of the plug-in (discriminator step with its gradient penalty,
then generator step), with the DeepSpeed engines replaced by plain modules for the count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, unavailable
from t2i_dist.bench.sampling import offline
from t2i_dist.config import Config, shipped_configs

BENCH = "7 GPU projection"
H100_BF16_FLOPS = 989.4e12  # dense BF16, SXM
A100_BF16_FLOPS = 312e12
MFU = 0.40
ANCHOR_IMG_PER_S = 137.0  # SD2 UNet, 256 px, precomputed latents, per A100
BATCH = 2

# SD 2 (base) UNet at 256 px: 32x32x4 latents, OpenCLIP ViT-H text states (77 x 1024)
SD2_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=1024,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


class FlopCount(TorchDispatchMode):
    """torch's FLOP formulas applied to every op that runs. (FlopCounterMode itself also tracks modules with
    backward hooks, which autograd.grad -- GALIP's gradient penalty -- does not support.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCount() as counter:
        fn()
    return counter.total


def meta_plugin(cfg: Config):
    from accelerate import init_empty_weights

    from t2i_dist.models.registry import build_plugin

    with init_empty_weights(include_buffers=True):
        return build_plugin(cfg, torch.device("meta"))


def unet_train_flops(unet: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor) -> int:
    timesteps = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
    return count_flops(
        lambda: unet(latents, timesteps, encoder_hidden_states=hidden).sample.float().square().mean().backward()
    )


def ldm_flops(cfg: Config) -> tuple[float, float]:
    """(online encoding, precomputed latents) FLOPs per training sample."""
    from t2i_dist.batch import Batch

    plugin = meta_plugin(cfg)
    res = cfg.data.resolution
    batch = Batch(captions=["a red circle"] * BATCH, images=torch.zeros(BATCH, 3, res, res, device="meta"))
    encode = count_flops(lambda: plugin.encode_batch(batch))
    latents, hidden = plugin.encode_batch(batch)
    unet = unet_train_flops(plugin.unet, latents, hidden)
    return (encode + unet) / BATCH, unet / BATCH


class CountingEngine:
    """What a plug-in uses of its engines (models.base.TrainedEngine), in plain PyTorch, for counting FLOPs on
    meta tensors: no finite check (meta tensors have no values), no partitioning."""

    partitioned = False

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        loss.backward()
        self.module.zero_grad(set_to_none=True)
        return True

    def gathered(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def galip_flops(cfg: Config) -> float:
    from t2i_dist.batch import Batch

    plugin = meta_plugin(cfg)
    plugin.attach_engines({name: CountingEngine(t.module) for name, t in plugin.trainables().items()})
    res = cfg.data.resolution
    batch = Batch(
        captions=["a red circle", "a blue square"] * (BATCH // 2), images=torch.zeros(BATCH, 3, res, res, device="meta")
    )
    return count_flops(lambda: plugin.train_step(batch, 1)) / BATCH


def h100_img_per_s(flops: float) -> float:
    return MFU * H100_BF16_FLOPS / flops


def anchor_flops() -> float:
    from diffusers.models import UNet2DConditionModel  # not `diffusers`: type checkers see its dummy class

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET)
        latents, hidden = torch.zeros(BATCH, 4, 32, 32), torch.zeros(BATCH, 77, 1024)
    return unet_train_flops(unet, latents, hidden) / BATCH


def model_flops_config(name: str) -> Config:
    """Offline weights, and no gradient checkpointing: model FLOPs do not count recomputation."""
    cfg = offline(name)
    return cfg.revalidated(
        {**cfg.to_dict(), "deepspeed": {**cfg.to_dict()["deepspeed"], "gradient_checkpointing": False}}
    )


def run(ctx: BenchContext) -> list[Row]:
    rows: list[Row] = []
    sd2 = anchor_flops()
    anchor_mfu = ANCHOR_IMG_PER_S * sd2 / A100_BF16_FLOPS
    rows.append(
        Row(
            BENCH,
            "anchor: SD2 UNet 256 px from latents, GFLOPs/sample",
            f"{sd2 / 1e9:.0f}",
            "",
            "",
            f"137 img/s per A100 = {100 * anchor_mfu:.0f} % MFU of 312 TFLOPS; an H100 at 40 % MFU: "
            f"{h100_img_per_s(sd2):.0f} img/s",
        )
    )
    for name in shipped_configs():
        try:
            cfg = model_flops_config(name)
            if cfg.model.family == "ldm":
                online, latents = ldm_flops(cfg)
                value = f"{online / 1e9:.3g} / {latents / 1e9:.3g}"
                metric = f"{name}: GFLOPs/sample, online / latents"
                detail = (
                    f"H100 at 40 % MFU: {h100_img_per_s(online):,.0f} / {h100_img_per_s(latents):,.0f} img/s; "
                    f"A100 at the anchor's {100 * anchor_mfu:.0f} % MFU: "
                    f"{anchor_mfu * A100_BF16_FLOPS / latents:,.0f} img/s from latents"
                )
            elif cfg.model.family == "galip":
                flops = galip_flops(cfg)
                value = f"{flops / 1e9:.3g}"
                metric = f"{name}: GFLOPs/sample (D + G step)"
                detail = (
                    f"H100 at 40 % MFU: {h100_img_per_s(flops):,.0f} img/s; A100 at the anchor's "
                    f"{100 * anchor_mfu:.0f} % MFU: {anchor_mfu * A100_BF16_FLOPS / flops:,.0f} img/s"
                )
            else:
                continue
            detail += f"; {cfg.data.resolution} px"
            rows.append(Row(BENCH, metric, value, "", "", detail))
        except Exception as exc:  # noqa: BLE001 - one config failing leaves the others
            rows.append(unavailable(BENCH, f"{name}: GFLOPs/sample", f"{type(exc).__name__}: {exc}"))
    ctx.notes.append(
        "GPU projection: tiny configs project to absurd img/s because a 32 px model is far too small to keep an "
        "H100 busy; there, launch overhead and the data pipeline bound throughput, not FLOPs."
    )
    return rows
