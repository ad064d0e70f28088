"""Benchmark 1: one LDM training step, our loop against a minimal diffusers reference, in one process.

The reference is the logic of diffusers' examples/text_to_image/train_text_to_image.py in plain PyTorch: its
torchvision transforms on a webdataset stream read in the training process (the script's default
dataloader_num_workers=0), vae.encode -> latent_dist.sample() * scaling_factor -> noise -> add_noise ->
text encoder -> UNet -> MSE -> backward -> clip_grad_norm_ -> AdamW step -> EMA step (its --use_ema, since
our loop always keeps an EMA). Same UNet config, frozen VAE and text encoder (the same modules), shards,
micro-batch and thread count as ours.

Ours is the loop's own step (TrainLoop.train_one_step, engine/loop.py): ShardLoader batch ->
LDMPlugin.train_step through the DeepSpeed engine of the config's ZeRO stage -> EMA -> the per-step agreement
all-reduce, on a one-rank gloo group; once with online encoding, once from precomputed latent shards; in full
mode also with the UNet compiled (deepspeed.compile=true). Gradient checkpointing is off in every variant (a
separate row prices ldm-tiny's `gradient_checkpointing: true`). Full mode repeats the comparison on the study's networks
(study-ldm-128 with random frozen weights), where the KL-f8 encoder weighs what it weighs in real training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, ratio_row
from t2i_dist.bench.timing import Samples, side_by_side
from t2i_dist.config import Config

BENCH = "1 LDM step"


class OursVariant:
    """Our training loop's per-step work, measured in segments of `steps` steps."""

    def __init__(self, cfg: Config, workdir: Path):
        from t2i_dist.engine.context import local_context
        from t2i_dist.engine.loop import TrainLoop

        self.cfg = cfg
        # the step alone: no in-training evaluation set up (its captions may not be in these shards)
        step_only = cfg.revalidated({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "every": 0}})
        self.loop = TrainLoop(step_only, local_context(step_only, workdir / "checkpoints"))
        self.plugin = self.loop.plugin
        self.data: Iterator[Any] = iter(self.loop.loader)
        self.wait_fractions: list[float] = []

    def one_step(self) -> float:
        return self.loop.train_one_step(self.data).data_wait_s

    def segment(self, steps: int) -> float:
        start = time.perf_counter()
        wait = sum(self.one_step() for _ in range(steps))
        elapsed = time.perf_counter() - start
        self.wait_fractions.append(wait / elapsed)
        return steps * self.cfg.deepspeed.micro_batch_size / elapsed


def reference_batches(shards: list[str], resolution: int, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The script's preprocessing (Resize, CenterCrop, ToTensor, Normalize) over a webdataset stream."""
    import webdataset as wds
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    dataset = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .repeat()
        .shuffle(256)
        .decode("pil")
        .to_tuple("png;jpg;jpeg;webp", "txt")
        .map_tuple(transform, str)
    )
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0))


class ReferenceVariant:
    """diffusers' train_text_to_image.py step, minimal and in one process."""

    def __init__(self, cfg: Config, frozen_from: OursVariant, shards: list[str]):
        from diffusers.schedulers.scheduling_ddpm import (
            DDPMScheduler,  # `diffusers` shows type checkers a dummy
        )
        from diffusers.training_utils import EMAModel

        from t2i_dist.models.ldm.config import LDMConfig
        from t2i_dist.models.ldm.plugin import LDMPlugin, build_unet

        # the script trains a latent diffusion model: the bench runs it on an ldm config
        m, ours = cast(LDMConfig, cfg.model), cast(LDMPlugin, frozen_from.plugin)
        self.cfg = cfg
        self.vae, self.text_encoder, self.scale = ours.vae, ours.text_encoder, ours.latent_scale
        torch.manual_seed(cfg.run.seed)
        self.unet = build_unet(m, ours.latent_channels, ours.latent_size, ours.text_encoder.width).train()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=m.num_train_timesteps, beta_schedule=m.beta_schedule)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.ema = EMAModel(self.unet.parameters(), decay=m.ema_decay)
        self.batches = reference_batches(shards, cfg.data.resolution, cfg.deepspeed.micro_batch_size)

    def one_step(self) -> None:
        pixel_values, captions = next(self.batches)
        latents = self.vae.encode(pixel_values).latent_dist.sample() * self.scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(list(captions))["hidden"]
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.deepspeed.gradient_clipping)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.unet.parameters())
        float(loss.detach())

    def segment(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.one_step()
        return steps * self.cfg.deepspeed.micro_batch_size / (time.perf_counter() - start)


def variants(ctx: BenchContext) -> dict[str, Any]:
    """The variants benchmarks 1 and 2 share, built once and warmed up (two steps each)."""

    def make() -> dict[str, Any]:
        from t2i_dist.data.sources import expand_urls

        ctx.process_group()
        latents = ctx.latent_shards()
        off = "deepspeed.gradient_checkpointing=false"
        out: dict[str, Any] = {}
        from_latents = (f"data.urls={latents}", "data.format=latents")
        zero0 = "deepspeed.zero_stage=0"
        out["ours_online"] = OursVariant(ctx.ldm_config(off), ctx.workdir / "ours_online")
        out["ours_latents"] = OursVariant(ctx.ldm_config(off, *from_latents), ctx.workdir / "ours_latents")
        out["ours_online_zero0"] = OursVariant(ctx.ldm_config(off, zero0), ctx.workdir / "ours_online_zero0")
        out["ours_latents_zero0"] = OursVariant(
            ctx.ldm_config(off, zero0, *from_latents), ctx.workdir / "ours_latents_zero0"
        )
        shards = expand_urls(str(ctx.image_shards()))
        out["reference"] = ReferenceVariant(ctx.ldm_config(off), out["ours_online"], shards)
        if not ctx.quick:
            out["ours_online_ckpt"] = OursVariant(
                ctx.ldm_config("deepspeed.gradient_checkpointing=true"), ctx.workdir / "ours_online_ckpt"
            )
            compiled = "deepspeed.compile=true"
            out["ours_online_zero0_compiled"] = OursVariant(
                ctx.ldm_config(off, zero0, compiled), ctx.workdir / "ours_online_zero0_compiled"
            )
            out["ours_latents_zero0_compiled"] = OursVariant(
                ctx.ldm_config(off, zero0, compiled, *from_latents), ctx.workdir / "ours_latents_zero0_compiled"
            )
        _warm_up(out, steps=2)
        return out

    return ctx.once("step_variants", make)


def run(ctx: BenchContext) -> list[Row]:
    v = variants(ctx)
    rounds = ctx.sizes.step_rounds
    ctx.say(f"{BENCH}: {len(v)} variants, {rounds} rounds of one step each")
    samples = _one_step_rounds(v, rounds)
    ctx.cache["step_samples"] = samples
    cfg = v["ours_online"].cfg
    rates = ", ".join(f"{k} {samples.median(k):.1f}" for k in samples.values)
    setup = (
        f"{cfg.run.name}: micro-batch {cfg.deepspeed.micro_batch_size}, {cfg.data.resolution} px, ZeRO "
        f"{cfg.deepspeed.zero_stage}, loader_workers {cfg.data.loader_workers}, 1 torch thread; "
        f"median img/s {rates}"
    )
    stage = cfg.deepspeed.zero_stage
    rows = []
    zero_cost = (
        "ZeRO-1/2 on one rank partition nothing, yet pay DeepSpeed's per-parameter gradient hooks, "
        "bucketed reductions and flat-partition step"
    )
    online_reference = "the reference encodes online, as the script does"
    compiled_how = (
        "deepspeed.compile=true: the UNet through torch.compile (inductor), compiled once before the "
        "measured rounds; the reference runs eager, as the script does"
    )
    for variant, label, goal, how in (
        ("ours_online", f"ours, ZeRO-{stage} as configured, online encoding", 1.0, setup),
        ("ours_online_zero0", "ours, ZeRO-0 (the one-process setting), online encoding", 1.0, zero_cost),
        ("ours_online_zero0_compiled", "ours, ZeRO-0, compiled UNet, online encoding", 1.0, compiled_how),
        ("ours_latents", f"ours, ZeRO-{stage} as configured, precomputed latents", 1.3, online_reference),
        ("ours_latents_zero0", "ours, ZeRO-0, precomputed latents", 1.3, online_reference),
        ("ours_latents_zero0_compiled", "ours, ZeRO-0, compiled UNet, precomputed latents", 1.3, compiled_how),
    ):
        if variant not in samples.values:
            continue
        rows.append(
            ratio_row(
                BENCH,
                f"{label} / diffusers reference, img/s",
                samples.ratio(variant, "reference"),
                goal,
                how,
                samples.spread(variant, "reference"),
            )
        )
    rows.append(
        ratio_row(
            BENCH,
            "precomputed latents / online encoding (ours, ZeRO-0), img/s",
            samples.ratio("ours_latents_zero0", "ours_online_zero0"),
            None,
            "published large-scale training: ~1.4x; benchmark 7 gives the FLOP ratio per config",
            samples.spread("ours_latents_zero0", "ours_online_zero0"),
        )
    )
    rows += _payback_rows(ctx, "", cfg.run.name, samples, "ours_online_zero0", "ours_latents_zero0")
    if "ours_online_ckpt" in samples.values:
        rows.append(
            ratio_row(
                BENCH,
                "gradient checkpointing off / on (ours, online), img/s",
                samples.ratio("ours_online", "ours_online_ckpt"),
                None,
                "ldm-tiny ships gradient_checkpointing: true",
                samples.spread("ours_online", "ours_online_ckpt"),
            )
        )
    if not ctx.quick:
        rows += run_study(ctx)
    return rows


def run_study(ctx: BenchContext) -> list[Row]:
    """The same comparison on the study's networks (study-ldm-128: KL-f8 VAE, ViT-B/32 text encoder, 24M UNet,
    128 px), where the frozen encoders cost what they cost in the study, unlike ldm-tiny's toy VAE."""
    from t2i_dist.bench.context import STUDY_MICRO_BATCH
    from t2i_dist.data.sources import expand_urls

    ctx.process_group()
    online_cfg = ctx.study_config()
    latents = ctx.latent_shards(online_cfg)
    latents_cfg = ctx.study_config(f"data.urls={latents}", "data.format=latents")
    v: dict[str, Any] = {
        "ours_online": OursVariant(online_cfg, ctx.workdir / "study_online"),
        "ours_latents": OursVariant(latents_cfg, ctx.workdir / "study_latents"),
    }
    v["reference"] = ReferenceVariant(online_cfg, v["ours_online"], expand_urls(str(online_cfg.data.urls)))
    _warm_up(v, steps=1)
    rounds = ctx.sizes.study_rounds
    ctx.say(f"{BENCH}: study-ldm-128, {len(v)} variants, {rounds} rounds of one step each")
    samples = _one_step_rounds(v, rounds)
    stage = online_cfg.deepspeed.zero_stage
    rates = ", ".join(f"{k} {samples.median(k):.2f}" for k in samples.values)
    setup = (
        f"study-ldm-128 (random frozen weights): micro-batch {STUDY_MICRO_BATCH}, 128 px, ZeRO {stage}, "
        f"loader_workers 1, 1 torch thread; median img/s {rates}"
    )
    rows = [
        ratio_row(
            BENCH,
            f"study-ldm-128: ours, ZeRO-{stage}, online encoding / diffusers reference, img/s",
            samples.ratio("ours_online", "reference"),
            1.0,
            setup,
            samples.spread("ours_online", "reference"),
        ),
        ratio_row(
            BENCH,
            f"study-ldm-128: ours, ZeRO-{stage}, precomputed latents / diffusers reference, img/s",
            samples.ratio("ours_latents", "reference"),
            1.3,
            "the KL-f8 encoder at 128 px costs several times the 24M UNet's training step (benchmark 7)",
            samples.spread("ours_latents", "reference"),
        ),
    ]
    rows += _payback_rows(ctx, "study-ldm-128: ", online_cfg.run.name, samples, "ours_online", "ours_latents")
    return rows


def _warm_up(variants: dict[str, Any], steps: int) -> None:
    """Run each variant past its first steps (allocation, compilation), then forget their data waits."""
    for variant in variants.values():
        variant.segment(steps)
        if isinstance(variant, OursVariant):
            variant.wait_fractions.clear()


def _one_step_rounds(variants: dict[str, Any], rounds: int) -> Samples:
    return side_by_side({name: partial(var.segment, 1) for name, var in variants.items()}, rounds)


def _payback_rows(
    ctx: BenchContext, prefix: str, run_name: str, samples: Samples, online: str, latents: str
) -> list[Row]:
    """After how many epochs precomputing latents (timed when the shards were made) has paid for itself."""
    per_sample = ctx.cache.get(f"precompute_s_per_sample/{run_name}")
    if not per_sample:
        return []
    saved = 1 / samples.median(online) - 1 / samples.median(latents)
    epochs = per_sample / saved if saved > 0 else float("inf")
    return [
        Row(
            BENCH,
            f"{prefix}precompute cost paid back after",
            f"{epochs:.2f} epochs",
            "",
            "",
            f"encoding loop {per_sample * 1e3:.1f} ms/sample (one process, one thread, start-up excluded) vs "
            f"{saved * 1e3:.1f} ms/sample saved per training epoch (medians)",
        )
    ]
