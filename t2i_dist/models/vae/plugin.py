"""The `vae` family: a diffusers AutoencoderKL trained on the shards' images, the first stage of latent diffusion.

Loss of a micro-batch: reconstruction (L1 or L2, mean over pixels) + kl_weight * KL towards N(0, 1) (mean over
latent elements, so a weight keeps its meaning across resolutions), optionally + a VGG16 feature term and, from
optimizer step `adversarial_start`, a patch discriminator's hinge term (the discriminator is a second engine).
The held-out measure gives PSNR and the std of the latents; its inverse is the `scaling_factor` the export
writes into the diffusers config, which latent diffusion reads when its `model.vae.scaling_factor` is unset.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL  # not from `diffusers`: mypy sees dummy classes there
from diffusers.training_utils import EMAModel
from torch import nn

from t2i_dist import dist
from t2i_dist.batch import Batch
from t2i_dist.config import Config
from t2i_dist.models.base import ModelPlugin, Trainable, mixed_precision
from t2i_dist.models.vae.autoencoder import build_vae, vae_factor
from t2i_dist.models.vae.config import VAETrainingConfig

log = logging.getLogger(__name__)

GRID_IMAGES = 8  # originals above their reconstructions in the held-out grid
# relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of torchvision's vgg16().features
VGG_TAPS = (3, 8, 15, 22, 29)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Reconstruction(nn.Module):
    """The engine's module: encode, sample the posterior with the given noise, decode. AutoencoderKL.forward
    returns the decoded images only; this forward also returns the posterior the KL term needs, and keeps the
    whole step one forward through the engine (what ZeRO-3's parameter hooks expect)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN, as in the LDM paper's autoencoders, with GroupNorm in place of BatchNorm (no running
    statistics to keep in step across ranks): one score per overlapping patch."""

    def __init__(self, resolution: int, width: int = 64):
        super().__init__()
        layers = max(1, min(3, int(math.log2(resolution)) - 2))  # the last map stays >= 2x2 from 8 px up
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class VGGFeatureLoss(nn.Module):
    """LPIPS without its learned channel weights: squared distance of channel-normalised VGG16 features, summed
    over channels, averaged over positions and images, summed over five layers. Frozen weights from a local
    torchvision vgg16 state dict (nothing is downloaded)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, weights: str | None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"])[: VGG_TAPS[-1] + 1]
        if weights:
            self.load(weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def load(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # torchvision's file holds the whole classifier ("features.N.*", "classifier.*"); the features suffice
        if any(k.startswith("features.") for k in state):
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        wanted = list(self.features.state_dict())
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"model.perceptual_weights {path}: not a torchvision vgg16 state dict (no {missing[0]})")
        self.features.load_state_dict({k: state[k] for k in wanted})

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Both in [-1, 1]; gradients flow to `images`."""
        h = (torch.cat([images, targets.detach()]) + 1) / 2
        h = (h - self.mean) / self.std
        total = torch.zeros((), device=images.device)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                a, b = F.normalize(h.float(), dim=1, eps=1e-10).chunk(2)
                total = total + (a - b).square().sum(dim=1).mean()
        return total


def detached_scores(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Discriminator scores passing gradients to the images only: the autoencoder's step must neither touch the
    discriminator's gradients nor fire its engine's reduction hooks."""
    weights = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (images,))


class VAEPlugin(ModelPlugin):
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, dtype)
        m: VAETrainingConfig = cfg.model  # type: ignore[assignment]
        self.m = m
        self.vae = build_vae(m.vae, sample_size=cfg.data.resolution).to(device)  # type: ignore[arg-type]  # diffusers types ModelMixin.to as an unbound wraps() wrapper
        self.vae.train().requires_grad_(True)
        if cfg.deepspeed.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if cfg.deepspeed.compile and dist.rank() == 0:
            log.warning("deepspeed.compile: the vae family trains eagerly")
        self.net = Reconstruction(self.vae)
        self.discriminator = PatchDiscriminator(cfg.data.resolution).to(device) if m.adversarial_weight > 0 else None
        self.perceptual: VGGFeatureLoss | None = None
        if m.perceptual_weight > 0:
            # counting parameters builds on the meta device: the architecture only, no weights read
            self.perceptual = VGGFeatureLoss(None if device.type == "meta" else m.perceptual_weights).to(device)
        # fp32 shadow weights on the device, made before DeepSpeed casts or partitions the autoencoder
        self.ema = None if m.ema_decay is None else EMAModel(self.vae.parameters(), decay=m.ema_decay, foreach=True)
        # each rank draws its own posterior noise
        self.generator = torch.Generator().manual_seed(dist.rank_seed(cfg.run.seed, dist.rank()))
        self.latent_std: float | None = None  # of the last held-out measure: sets the exported scaling_factor
        self._loaded_scaling_factor: float | None = None
        self._measuring_vae: AutoencoderKL | None = None

    # -- training --------------------------------------------------------------------------------------
    def trainables(self) -> dict[str, Trainable]:
        o = self.cfg.optim
        out = {"vae": Trainable(self.net, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)}
        if self.discriminator is not None:
            # at most ZeRO-2: the autoencoder's adversarial term reads the discriminator's weights directly
            # (detached_scores), which ZeRO-3 would have partitioned away
            stage = min(self.cfg.deepspeed.zero_stage, 2)
            out["discriminator"] = Trainable(self.discriminator, lr=o.lr, betas=o.betas, eps=o.eps, zero_stage=stage)
        return out

    def frozen(self) -> dict[str, nn.Module]:
        return {} if self.perceptual is None else {"perceptual": self.perceptual}

    def frozen_precision(self) -> AbstractContextManager[None]:
        """The frozen fp32 VGG under bf16 autocast on a GPU in a bf16 run; CPUs keep fp32 (faster there)."""
        return mixed_precision(self.device, self.dtype) if self.device.type == "cuda" else contextlib.nullcontext()

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if batch.images is None:
            raise ValueError("the vae family trains on pixels: set data.format=images")
        m = self.m
        target = batch.images.to(self.device, torch.float32)
        n, _, height, width = target.shape
        factor = vae_factor(self.vae)
        shape = (n, self.vae.config["latent_channels"], height // factor, width // factor)
        noise = torch.randn(shape, generator=self.generator).to(self.device, self.dtype)
        recon, mean, logvar = self.engines["vae"](target.to(self.dtype), noise)
        error = recon.float() - target
        rec = error.abs().mean() if m.loss == "l1" else error.square().mean()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        loss = rec + m.kl_weight * kl
        metrics = {"loss_rec": rec.detach(), "loss_kl": kl.detach()}
        if self.perceptual is not None:
            with self.frozen_precision():
                perceptual = self.perceptual(recon.float(), target)
            loss = loss + m.perceptual_weight * perceptual
            metrics["loss_perceptual"] = perceptual.detach()
        adversarial = self.discriminator is not None and step >= m.adversarial_start
        if adversarial:
            generator_term = -detached_scores(self.engines["discriminator"].module, recon).float().mean()
            loss = loss + m.adversarial_weight * generator_term
            metrics["loss_g"] = generator_term.detach()
        self.engines["vae"].backward_and_step(loss)
        loss = loss.detach()
        if adversarial:
            d = self.engines["discriminator"]
            real, fake = d(torch.cat([target.to(self.dtype), recon.detach()])).float().chunk(2)
            loss_d = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
            d.backward_and_step(loss_d)
            metrics.update(loss_d=loss_d.detach(), d_real=real.mean().detach(), d_fake=fake.mean().detach())
            # 'loss' is what the loop checks for finiteness: non-finite when either network's is (0 * inf is nan)
            loss = loss + 0.0 * metrics["loss_d"]
        return {"loss": loss, **metrics}

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            with self.engines["vae"].gathered():  # one gather of a ZeRO-3 autoencoder per update
                self.ema.step(list(self.vae.parameters()))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"latent_std": self.latent_std, "rank": {"generator": self.generator.get_state()}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latent_std = state.get("latent_std")
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
            # a checkpoint holds CPU tensors: back to fp32 on the device the autoencoder trains on
            self.ema.shadow_params = [p.to(self.device, torch.float32) for p in self.ema.shadow_params]
        if "generator" in state.get("rank", {}):
            self.generator.set_state(state["rank"]["generator"])

    # -- measuring, checkpoints and export ---------------------------------------------------------------
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights measured and exported (the EMA's when on), fp32, where they live; collective under
        ZeRO-3 without EMA (the EMA is whole on every rank)."""
        if self.ema is not None:
            names = [n for n, _ in self.vae.named_parameters()]
            return dict(zip(names, self.ema.shadow_params, strict=True))
        with self.engines["vae"].gathered():
            return {k: v.detach().float().clone() for k, v in self.vae.state_dict().items()}

    def measuring_vae(self) -> AutoencoderKL:
        """After load_inference_state the autoencoder itself; during training an fp32 copy holding the trained
        weights (the engine's may be bf16 or partitioned)."""
        if not self.engines:
            return self.vae
        if self._measuring_vae is None:
            with torch.random.fork_rng(devices=[]):  # its random init must not move the run's global RNG
                copy = AutoencoderKL.from_config(self.vae.config)
            self._measuring_vae = copy.to(self.device).eval().requires_grad_(False)
        self._measuring_vae.load_state_dict(self.trained_weights())
        return self._measuring_vae

    @torch.no_grad()
    def measure(self, held_out: Batch) -> tuple[dict[str, float], torch.Tensor | None]:
        """Posterior-mode reconstructions of the held-out images: PSNR (dB, images in [0, 1]), L1 (in [-1, 1],
        as loss_rec), and the std of posterior samples (fixed noise), whose inverse scales latents to unit std."""
        if held_out.images is None:
            raise ValueError("the vae family measures on images")
        vae = self.measuring_vae()
        images = held_out.images.to(self.device, torch.float32)
        noise = torch.Generator().manual_seed(self.cfg.run.seed)
        recons, latents = [], []
        for chunk in images.split(self.cfg.deepspeed.micro_batch_size):
            posterior = vae.encode(chunk).latent_dist
            draw = torch.randn(posterior.mean.shape, generator=noise).to(self.device)
            latents.append(posterior.mean + posterior.std * draw)
            recons.append(vae.decode(posterior.mode()).sample.float().clamp(-1, 1))
        recon, latent = torch.cat(recons), torch.cat(latents).float()
        original01, recon01 = ((images + 1) / 2).clamp(0, 1), (recon + 1) / 2
        mse = (recon01 - original01).square().flatten(1).mean(dim=1).clamp_min(1e-10)
        std = float(latent.std())
        self.latent_std = std
        metrics = {
            "held_out/psnr": float((10 * torch.log10(1 / mse)).mean()),
            "held_out/l1": float((recon - images).abs().mean()),
            "held_out/latent_std": std,
            "held_out/scaling_factor": 1 / std if std > 0 else float("nan"),
        }
        k = min(GRID_IMAGES, len(images))
        return metrics, torch.cat([original01[:k], recon01[:k]]).cpu()

    def scaling_factor(self) -> float:
        """1 / the last measured latent std; before any measure, the configured or the loaded VAE's own value
        (fine-tuning a pretrained one), else 1.0."""
        if self.latent_std:
            return 1.0 / self.latent_std
        if self._loaded_scaling_factor is not None:
            return self._loaded_scaling_factor
        if self.m.vae.scaling_factor is not None:
            value, source = self.m.vae.scaling_factor, "model.vae.scaling_factor"
        elif self.m.vae.pretrained:
            value, source = float(self.vae.config["scaling_factor"]), f"{self.m.vae.pretrained}'s config"
        else:
            value, source = 1.0, "a default"
        log.warning("no held-out latent std measured yet: scaling_factor %.5g is %s", value, source)
        return value

    def inference_state(self) -> dict[str, Any]:
        weights = {k: v.detach().float().cpu().clone() for k, v in self.trained_weights().items()}
        return {"vae": weights, "latent_std": self.latent_std, "scaling_factor": self.scaling_factor()}

    def load_inference_state(self, state: dict[str, Any], **options: Any) -> None:
        self.vae.load_state_dict(state["vae"])
        self.vae.to(self.device).eval().requires_grad_(False)
        self.latent_std = state.get("latent_std")
        self._loaded_scaling_factor = state.get("scaling_factor")

    def export(self, directory: Path) -> Path:
        """A diffusers `save_pretrained` directory whose config carries the measured scaling_factor; written
        next to its place, then renamed, so a reader never sees half of it."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / "config.json").exists():
            raise FileExistsError(f"{directory} exists and is not a diffusers model directory: choose another --out")
        self.vae.register_to_config(scaling_factor=self.scaling_factor())
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        old = staging.with_name(staging.name + ".old")
        try:
            self.vae.save_pretrained(staging, safe_serialization=True)
            # mkdtemp makes the directory private and the weights file comes out private too: readable by all,
            # as any other model directory
            os.chmod(staging, 0o755)
            for path in staging.iterdir():
                os.chmod(path, 0o644)
            if directory.exists():
                directory.rename(old)  # an earlier export of the same name is replaced
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return directory
