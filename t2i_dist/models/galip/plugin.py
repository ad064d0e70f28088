"""GALIP as a model plug-in: two DeepSpeed engines (Mate-D, Mate-G) around one frozen, shared CLIP.

Each train_step is one discriminator step then one generator step on the same micro-batch and fakes, as in
the paper. The CLIP stays outside both engines (passed to the networks at call time), so ZeRO partitions and
casts only the trained weights and every rank holds the same full CLIP.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import torch
from torch import nn

from t2i_dist import dist
from t2i_dist.batch import Batch
from t2i_dist.config import Config
from t2i_dist.models.base import ModelPlugin, Trainable, mixed_precision
from t2i_dist.models.clip.encoders import FrozenClipText, load_clip
from t2i_dist.models.galip.augment import diff_augment
from t2i_dist.models.galip.config import GALIPConfig
from t2i_dist.models.galip.discriminator import MateDiscriminator
from t2i_dist.models.galip.generator import MateGenerator
from t2i_dist.models.galip.losses import (
    discriminator_loss,
    generator_loss,
    image_spread,
    score_without_weight_grads,
)
from t2i_dist.models.galip.vision import ClipVision


class GALIPPlugin(ModelPlugin):
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, dtype)
        m: GALIPConfig = cfg.model  # type: ignore[assignment]
        self.m = m
        # A random-weight CLIP is replicated, not broadcast: build everything from the run seed so every rank
        # (and the sampling CLI) gets the same frozen weights, without disturbing the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            # built on the CPU (one RNG for every device), or on meta when only counting parameters
            self.clip_model = load_clip(m.clip, "meta" if device.type == "meta" else "cpu")
            self.text_encoder = FrozenClipText(m.clip, self.clip_model)
            self.vision = ClipVision(self.clip_model, checkpoint_blocks=cfg.deepspeed.gradient_checkpointing)
            self._check_indices()
            v, sentence_dim = self.vision, self.text_encoder.embed_dim
            self.generator_net = MateGenerator(m, sentence_dim, v.width, v.grid, cfg.data.resolution)
            self.discriminator_net = MateDiscriminator(m, v.width, v.grid, sentence_dim, cfg.data.resolution)
        # the whole CLIP (its unused logit scale too), so that every tensor the plug-in keeps is on the device
        for module in (self.clip_model, self.text_encoder, self.vision, self.generator_net, self.discriminator_net):
            module.to(device)
        self._micro_step = (-1, 0)  # (step, micro-batch index within it) for per-call noise seeds
        self._sampling_net: MateGenerator | None = None  # gathered copy when ZeRO-3 partitions Mate-G

    def _check_indices(self) -> None:
        # config validation checks these for architectures it can read; hf-hub ones are only known here
        for key in ("prompt_blocks", "feature_layers"):
            bad = [i for i in getattr(self.m, key) if i >= self.vision.depth]
            if bad:
                raise ValueError(f"model.{key} {bad} out of range: this CLIP ViT has {self.vision.depth} blocks")

    # -- what the loop needs -----------------------------------------------------------------------------
    def trainables(self) -> dict[str, Trainable]:
        m, eps = self.m, self.cfg.optim.eps
        return {
            "discriminator": Trainable(
                self.discriminator_net, lr=m.lr_d, betas=m.betas, eps=eps, zero_stage=m.discriminator_stage(self.cfg)
            ),
            "generator": Trainable(self.generator_net, lr=m.lr_g, betas=m.betas, eps=eps),
        }

    def frozen(self) -> dict[str, nn.Module]:
        return {"clip_text": self.text_encoder, "clip_vision": self.vision}

    def _step_generators(self, step: int) -> tuple[torch.Generator, torch.Generator]:
        """CPU generators for this micro-batch's noise and augmentation, seeded by (run seed, rank, step,
        micro-batch): different per rank, reproduced on resume."""
        last_step, micro = self._micro_step
        micro = micro + 1 if step == last_step else 0
        self._micro_step = (step, micro)
        key = f"{self.cfg.run.seed}/{dist.rank()}/{step}/{micro}"
        noise_seed, augment_seed = zlib.crc32(key.encode()), zlib.crc32(f"{key}/augment".encode())
        return torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(augment_seed)

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m = self.m
        if not m.augment:
            return images
        return diff_augment(images, list(m.augment), m.augment_translation, m.augment_cutout, generator)

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if batch.images is None:
            raise ValueError("GALIP needs image batches (data.format=images)")
        d_engine, g_engine = self.engines["discriminator"], self.engines["generator"]
        m, taps, dt = self.m, self.m.feature_layers, self.dtype
        images = batch.images.to(self.device, torch.float32)
        # the frozen text encoder under autocast on a GPU (it ran fp32 there); CPUs keep fp32 (faster there)
        with mixed_precision(self.device, dt) if self.device.type == "cuda" else contextlib.nullcontext():
            sentence = self.text_encoder(batch.captions)["pooled"].to(dt)
        noise_rng, augment_rng = self._step_generators(step)
        n = len(batch)
        noise = torch.randn(n, m.noise_dim, generator=noise_rng).to(self.device, dt)
        # mode seeking: a second image per caption from other noise, made in the same generator call
        twin_noise = torch.randn(n, m.noise_dim, generator=noise_rng).to(self.device, dt) if m.mode_seeking else None
        with mixed_precision(self.device, dt):
            real_view = self._augment(images, augment_rng)
            with torch.no_grad():
                real, _ = self.vision.encode(real_view, taps, with_embedding=False)
            if twin_noise is None:
                fake_images = g_engine(noise, sentence, self.vision)
            else:
                both = g_engine(torch.cat([noise, twin_noise]), torch.cat([sentence, sentence]), self.vision)
                fake_images, twin_images = both[:n], both[n:]
            # one augmented view of each fake serves D and the CLIP term alike
            fake_view = self._augment(fake_images, augment_rng)
            fake, fake_embedding = self.vision.encode(fake_view, taps, with_embedding=True)
            assert fake_embedding is not None  # asked for with_embedding
            # the images CLIP read, for a discriminator with a pixel branch
            real_pixels, fake_pixels = (real_view.to(dt), fake_view.to(dt)) if m.pixel_branch else (None, None)
            # lazy MA-GP: on every ma_gp_every-th step, weighted by the interval
            penalize = (step - 1) % m.ma_gp_every == 0
            d = discriminator_loss(
                d_engine,
                d_engine.module,
                real.to(dt),
                fake.to(dt),
                sentence,
                m.ma_gp_k * m.ma_gp_every,
                m.ma_gp_p,
                real_pixels,
                fake_pixels,
                penalize=penalize,
            )
        # a non-finite loss on any rank skips that network's update on every rank (the loop counts the step)
        d_engine.backward_and_step(d.loss)
        # generator step against the just-updated discriminator, reusing this step's fakes and their graph
        with mixed_precision(self.device, dt):
            scores = score_without_weight_grads(d_engine.module, fake.to(dt), sentence, fake_pixels)
            loss_g, similarity = generator_loss(scores, fake_embedding, sentence, m.clip_sim_weight)
            extra: dict[str, torch.Tensor] = {}
            if twin_noise is not None:
                spread = image_spread(fake_images, twin_images, noise, twin_noise)
                loss_g = loss_g + m.mode_seeking / (spread + 1e-5)
                extra["mode_spread"] = spread.detach()
        g_engine.backward_and_step(loss_g)
        loss_g = loss_g.detach()
        # 'loss' is what the loop checks for finiteness: non-finite if either network's loss is
        metrics = {"loss": d.loss.detach() + loss_g, "loss_g": loss_g, "clip_sim": similarity.detach()}
        return {**metrics, **extra, **d.metrics()}

    # -- inference -------------------------------------------------------------------------------------------
    def _generator_partitioned(self) -> bool:
        engine = self.engines.get("generator")
        return engine is not None and engine.partitioned

    def _generator_state(self) -> dict[str, torch.Tensor]:
        """fp32 copy of Mate-G's weights; collective when ZeRO-3 partitions them."""
        gathered = self.engines["generator"].gathered() if self.engines else contextlib.nullcontext()
        with gathered:
            return {k: v.detach().float().cpu().clone() for k, v in self.generator_net.state_dict().items()}

    def before_sampling(self) -> None:
        # The loop samples grids on rank 0 alone, which cannot gather a ZeRO-3 generator: every rank takes
        # part in a gathered snapshot here.
        self._refresh_sampling_snapshot()

    def _refresh_sampling_snapshot(self) -> None:
        if not self._generator_partitioned():
            return
        snapshot = self._sampling_net or MateGenerator(
            self.m, self.text_encoder.embed_dim, self.vision.width, self.vision.grid, self.cfg.data.resolution
        )
        snapshot.load_state_dict(self._generator_state())
        self._sampling_net = snapshot.to(self.device).eval().requires_grad_(False)

    def inference_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self._generator_state()}
        if self.m.clip.pretrained is None:
            # random CLIP weights cannot be reloaded from anywhere else; they are part of the generator's function
            state["clip"] = {k: v.detach().cpu().clone() for k, v in self.clip_model.state_dict().items()}
        return state

    def load_inference_state(self, state: dict[str, Any]) -> None:  # type: ignore[override]  # takes only its FamilySpec options (the registry checks them)
        self.generator_net.load_state_dict(state["generator"])
        if "clip" in state:
            self.clip_model.load_state_dict(state["clip"])
        self.generator_net.eval()

    def _net_for_sampling(self) -> nn.Module:
        if not self._generator_partitioned():
            return self.generator_net  # the engine's module while training (DeepSpeed wraps it in place)
        if self._sampling_net is None:
            raise RuntimeError(
                "Mate-G is partitioned by ZeRO-3 and no gathered snapshot exists yet: call "
                "before_sampling on every rank first"
            )
        return self._sampling_net

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], **options: Any) -> torch.Tensor:
        """One generator forward pass; the image for (prompt, seed) depends on nothing else."""
        unknown = sorted(k for k, v in options.items() if v is not None)
        if unknown:
            raise ValueError(f"GALIP sampling is one forward pass and takes no options; got {unknown}")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        net = self._net_for_sampling()
        dt = next(net.parameters()).dtype
        noise = torch.stack(
            [torch.randn(self.m.noise_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self.device, dt)
        sentence = self.text_encoder(prompts)["pooled"].to(dt)
        autocast = torch.autocast(self.device.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()
        with autocast:
            images = net(noise, sentence, self.vision)
        return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
