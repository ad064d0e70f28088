"""Latent diffusion: a diffusers UNet trained from scratch on frozen-VAE latents, conditioned on frozen CLIP
text token states; DDPM training (epsilon, v or x0 prediction; L2 or L1), Min-SNR weighting, caption dropout
for CFG, EMA."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import UNet2DConditionModel  # not from `diffusers`: mypy sees dummy classes there
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel, compute_snr
from torch import nn

from t2i_dist import dist
from t2i_dist.batch import Batch
from t2i_dist.config import Config
from t2i_dist.models.base import ModelPlugin, Trainable, mixed_precision
from t2i_dist.models.clip.encoders import FrozenClipText
from t2i_dist.models.ldm.config import LDMConfig
from t2i_dist.models.ldm.latents import check_latent_model
from t2i_dist.models.vae import autoencoder as vae_lib

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}


def build_unet(m: LDMConfig, latent_channels: int, latent_size: int, context_dim: int) -> UNet2DConditionModel:
    u = m.unet
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        transformer_layers_per_block=u.transformer_layers_per_block,
        cross_attention_dim=context_dim,
    )


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2024, 3.4: guidance inflates the prediction's std; blend back towards the conditional std.
    (diffusers has this in its Stable Diffusion pipeline module, which needs transformers to import.)"""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


class StridedEMA(EMAModel):
    """diffusers' EMA updated every `every` optimizer steps: each update uses the decay of the step it is made
    at to the power `every`, what `every` single-step updates towards the same weights would give."""

    def __init__(self, *args: Any, every: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.every = every

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) ** self.every


class LDMPlugin(ModelPlugin):
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, dtype)
        m: LDMConfig = cfg.model  # type: ignore[assignment]
        self.m = m
        self.text_encoder = FrozenClipText(m.text, device=device)
        self.vae = vae_lib.load_vae(m.vae).to(device)  # type: ignore[arg-type]  # diffusers types ModelMixin.to as an unbound wraps() wrapper
        self.latent_scale = vae_lib.scaling_factor(self.vae, m.vae)
        self.latent_channels = self.vae.config.latent_channels
        self.latent_size = cfg.data.resolution // vae_lib.vae_factor(self.vae)
        # built on the CPU (one RNG for every device), then on the placement's device like every other tensor
        # of this plug-in: the EMA below, made from these parameters, must live where DeepSpeed trains them
        self.unet = build_unet(m, self.latent_channels, self.latent_size, self.text_encoder.width).to(device)  # type: ignore[arg-type]  # diffusers types ModelMixin.to as an unbound wraps() wrapper
        if cfg.deepspeed.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.deepspeed.compile:
            # in place (nn.Module.compile): parameter names, and so checkpoints, stay those of the eager UNet
            self.unet.compile()
        # the samplers are built from this config: no clamping of x0 (scaled VAE latents are not in [-1, 1])
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=m.num_train_timesteps,
            beta_start=m.beta_start,
            beta_end=m.beta_end,
            beta_schedule=m.beta_schedule,
            prediction_type=m.prediction_type,
            clip_sample=False,
            thresholding=False,
            steps_offset=1,
            rescale_betas_zero_snr=m.zero_terminal_snr,
            timestep_spacing=m.timestep_spacing,
        )
        # fp32 shadow weights on the UNet's device, made before DeepSpeed casts or partitions the UNet; foreach:
        # one fused update over all tensors instead of a Python loop (~25 % less EMA time on CPU, same values)
        self.ema = StridedEMA(self.unet.parameters(), decay=m.ema_decay, foreach=True, every=m.ema_every)
        self._null_text: dict[str, torch.Tensor] | None = None
        self._latent_shards_checked = False
        self._sampling_unet: UNet2DConditionModel | None = None
        # each rank draws its own noise, timesteps and caption dropout
        self.generator = torch.Generator().manual_seed(dist.rank_seed(cfg.run.seed, dist.rank()))

    # -- training --------------------------------------------------------------------------------------
    def trainables(self) -> dict[str, Trainable]:
        o = self.cfg.optim
        return {"unet": Trainable(self.unet, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)}

    def frozen(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def null_text(self) -> dict[str, torch.Tensor]:
        if self._null_text is None:
            self._null_text = {k: v.float() for k, v in self.text_encoder([""]).items()}
        return self._null_text

    def frozen_precision(self) -> AbstractContextManager[None]:
        """The frozen VAE and text encoder under bf16 autocast on a GPU in a bf16 run (they ran fp32 there); on
        CPUs bf16 is slower than fp32 (engine/precision.py), so they stay fp32."""
        return mixed_precision(self.device, self.dtype) if self.device.type == "cuda" else contextlib.nullcontext()

    def encode_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and text token states, from precomputed shards or by running the frozen encoders."""
        if batch.latents is not None:
            if self.cfg.data.format == "latents" and not self._latent_shards_checked:
                # refuse shards encoded by other frozen weights/settings (their precompute.json says which)
                check_latent_model(self, batch.latents, batch.text.get("hidden"))
                self._latent_shards_checked = True
            latents = batch.latents.float()
        else:
            assert batch.images is not None  # a batch carries latents or images
            with self.frozen_precision():
                latents = vae_lib.encode(self.vae, batch.images, self.latent_scale, self.generator_on(batch.images))
            latents = latents.float()
        drop = torch.rand(len(batch), generator=self.generator) < self.m.caption_dropout
        if "hidden" in batch.text:
            hidden = batch.text["hidden"].float()
            hidden = torch.where(drop.to(hidden.device)[:, None, None], self.null_text()["hidden"], hidden)
        else:
            captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]
            with self.frozen_precision():
                hidden = self.text_encoder(captions)["hidden"].float()
        return latents, hidden

    def generator_on(self, like: torch.Tensor) -> torch.Generator | None:
        return self.generator if like.device.type == "cpu" else None

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        engine = self.engines["unet"]
        latents, hidden = self.encode_batch(batch)
        noise = torch.randn(latents.shape, generator=self.generator_on(latents), device=latents.device)
        timesteps = self.draw_timesteps(latents.shape[0], latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.m.prediction_type == "epsilon":
            target = noise
        elif self.m.prediction_type == "sample":
            target = latents
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        pred = engine(noisy.to(self.dtype), timesteps, encoder_hidden_states=hidden.to(self.dtype)).sample
        distance = F.l1_loss if self.m.loss == "l1" else F.mse_loss
        per_sample = distance(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.m.min_snr_gamma is not None:
            per_sample = per_sample * self.min_snr_weight(timesteps)
        loss = per_sample.mean()
        engine.backward_and_step(loss)
        return {"loss": loss.detach()}

    def draw_timesteps(self, n: int, device: torch.device) -> torch.Tensor:
        """Training timesteps, from the global RNG: uniform, or skewed towards 0 by `low_noise_bias`."""
        T = self.m.num_train_timesteps
        if self.m.low_noise_bias == 0:
            return torch.randint(0, T, (n,), device=device)  # the uniform draw, bit for bit
        u = torch.rand(n, device=device)
        return (T * u ** (1 + self.m.low_noise_bias)).floor().long().clamp(max=T - 1)

    def min_snr_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights: min(snr, gamma) on the x0 error, expressed in the predicted quantity's units
        (squared, the epsilon error is the x0 error times snr, the velocity error times snr + 1)."""
        assert self.m.min_snr_gamma is not None
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.m.min_snr_gamma)
        if self.m.prediction_type == "epsilon":
            return clipped / snr
        if self.m.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def after_optimizer_step(self, step: int) -> None:
        every = self.m.ema_every
        if step % every:
            return
        if every > 1:
            # the decay's warm-up follows optimizer steps, not EMA updates
            self.ema.optimization_step = step - 1
        with self.engines["unet"].gathered():  # one gather of a ZeRO-3 UNet per update
            self.ema.step(list(self.unet.parameters()))

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "rank": {"generator": self.generator.get_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        # a checkpoint holds CPU tensors: back to fp32 on the device the UNet trains on
        self.ema.shadow_params = [p.to(self.device, torch.float32) for p in self.ema.shadow_params]
        if "generator" in state.get("rank", {}):
            self.generator.set_state(state["rank"]["generator"])

    # -- inference ---------------------------------------------------------------------------------------
    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name, where they live (the device)."""
        names = [n for n, _ in self.unet.named_parameters()]
        return dict(zip(names, self.ema.shadow_params, strict=True))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.ema_tensors().items()}

    def inference_state(self) -> dict[str, Any]:
        with self.engines["unet"].gathered():
            raw = {k: v.detach().float().cpu().clone() for k, v in self.unet.state_dict().items()}
        return {"unet": raw, "unet_ema": self.ema_state_dict()}

    def load_inference_state(self, state: dict[str, Any], use_ema: bool = True) -> None:  # type: ignore[override]  # takes only its FamilySpec options (the registry checks them)
        weights = state["unet_ema"] if use_ema else state["unet"]
        # EMA tracks parameters only; buffers (none in this UNet today) come from the raw weights
        self.unet.load_state_dict({**state["unet"], **weights})
        self.unet.to(self.device).eval()
        self._sampling_unet = self.unet

    def sampling_unet(self) -> UNet2DConditionModel:
        """During training: a separate fp32 UNet holding the EMA weights (the engine's may be partitioned)."""
        if not self.engines and self._sampling_unet is not None:
            return self._sampling_unet
        if self._sampling_unet is None or self._sampling_unet is self.unet:
            self._sampling_unet = build_unet(self.m, self.latent_channels, self.latent_size, self.text_encoder.width)
            self._sampling_unet.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]  # diffusers types ModelMixin.to as an unbound wraps() wrapper
        self._sampling_unet.load_state_dict(self.ema_tensors(), strict=False)  # device to device
        return self._sampling_unet

    @torch.no_grad()
    def sample(  # type: ignore[override]  # takes only its FamilySpec options (the registry checks them)
        self,
        prompts: list[str],
        seeds: list[int],
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        s = self.m.sampling
        sampler, steps = sampler or s.sampler, steps or s.steps
        guidance = s.guidance if guidance is None else guidance
        if sampler == "ddpm":
            # DDPM draws fresh noise every step from one generator: run images one by one so each image
            # depends on its own seed only
            return torch.cat(
                [self._sample(sampler, steps, guidance, [p], [sd]) for p, sd in zip(prompts, seeds, strict=True)]
            )
        return self._sample(sampler, steps, guidance, prompts, seeds)

    def sampling_scheduler(self, sampler: str) -> Any:
        """The sampler on the training schedule; DDIM, as in Stable Diffusion, steps to the last
        training timestep's alpha instead of 1 (the other samplers take no such option)."""
        extra = {"set_alpha_to_one": False} if sampler == "ddim" else {}
        return SAMPLERS[sampler].from_config(self.noise_scheduler.config, **extra)

    def _sample(self, sampler: str, steps: int, guidance: float, prompts: list[str], seeds: list[int]):
        unet = self.sampling_unet()
        scheduler = self.sampling_scheduler(sampler)
        scheduler.set_timesteps(steps, device=self.device)
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)
        latents = latents * scheduler.init_noise_sigma
        cond = self.text_encoder(prompts)["hidden"]
        uncond = self.null_text()["hidden"].expand_as(cond)
        use_cfg = guidance != 1.0
        context = torch.cat([uncond, cond]) if use_cfg else cond
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            pred = unet(model_in, t, encoder_hidden_states=context).sample
            if use_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                guided = pred_uncond + guidance * (pred_cond - pred_uncond)
                pred = rescale_noise_cfg(guided, pred_cond, self.m.sampling.guidance_rescale)
            step_kwargs = {"generator": gens[0]} if sampler == "ddpm" else {}
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        return vae_lib.decode(self.vae, latents, self.latent_scale).cpu()
