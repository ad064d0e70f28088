"""The `clip` family: an open_clip model trained contrastively on the shards' image-caption pairs.

Loss: open_clip's ClipLoss with the learnable temperature, the features of every rank gathered (by default with
gradients) so each rank scores its images against the captions of the whole global batch. Images reach the
model exactly as GALIP feeds its CLIP (models/galip/vision.py), so the exported file serves GALIP and the LDM's
text encoder alike. The held-out measure is image<->text retrieval top-1 against the chance of a random ranking.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import nn

from t2i_dist import dist
from t2i_dist.batch import Batch
from t2i_dist.config import ClipConfig, Config
from t2i_dist.models.base import ModelPlugin, Trainable
from t2i_dist.models.clip.encoders import create_clip, tokenizer_for
from t2i_dist.models.clip.family import ClipTrainingConfig
from t2i_dist.models.galip.vision import ClipVision

# open_clip_train clamps the learned log temperature here: logits at most 100 x cosine similarity
MAX_LOG_SCALE = math.log(100)
WEIGHTS_FILE = "open_clip_model.pt"
ARCHITECTURE_FILE = "open_clip_model.json"


def retrieval_top1(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Top-1 of image->text and text->image retrieval over one batch of L2-normalised features; a retrieved item
    is right when its caption string is the query's own (a synthetic set repeats captions). `chance` is a random
    ranking's expected top-1: the mean share of the batch carrying the query's caption (the same both ways)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=image_features.device)
    same = labels[:, None] == labels[None, :]
    similarity = image_features.float() @ text_features.float().T
    rows = torch.arange(len(captions), device=image_features.device)
    return {
        "held_out/image_to_text_top1": float(same[rows, similarity.argmax(dim=1)].float().mean()),
        "held_out/text_to_image_top1": float(same[rows, similarity.argmax(dim=0)].float().mean()),
        "held_out/chance": float(same.float().mean()),
    }


def atomic_write(path: Path, write: Any) -> None:
    """write(tmp_path) next to `path`, then rename: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def clamp_master(param: nn.Parameter, partitioned: bool) -> None:
    """Clamp the fp32 copy DeepSpeed's optimizer steps, where it keeps one; collective under ZeRO-1/2."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if partitioned:
        # this rank's slice, clamped in place of the whole: DeepSpeed's set_full_hp_param cannot place a
        # 1-element tensor split across ranks (its last rank's slice starts past the end)
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(0, MAX_LOG_SCALE))
        return
    master = safe_get_full_fp32_param(param)  # None when the optimizer steps the module's weights themselves
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(0, MAX_LOG_SCALE))


def open_clip_decays(name: str, param: nn.Parameter) -> bool:
    """open_clip_train's rule: no weight decay on gains, biases, norms, embeddings' scalars or the temperature."""
    excluded = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    return not excluded


class ClipPlugin(ModelPlugin):
    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, dtype)
        m: ClipTrainingConfig = cfg.model  # type: ignore[assignment]
        self.m = m
        # built on the CPU (one RNG for every device), or on meta when only counting parameters
        build_on = "meta" if device.type == "meta" else "cpu"
        self.model = cast(open_clip.CLIP, create_clip(m.clip, build_on))  # open_clip ships no type hints
        self.model.output_dict = True
        # a 1-element tensor: DeepSpeed's initial broadcast cannot take 0-dim parameters (open_clip's scalar);
        # open_clip's load_checkpoint accepts either shape, and the export writes open_clip's own
        self.model.logit_scale = nn.Parameter(self.model.logit_scale.detach().reshape(1))
        self.model.train().requires_grad_(True)
        if cfg.deepspeed.gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(device)
        self.tokenizer = tokenizer_for(m.clip)
        self.loss = ClipLoss(
            local_loss=m.local_loss,
            gather_with_grad=m.gather_with_grad,
            cache_labels=True,
            rank=dist.rank(),
            world_size=dist.world_size(),
        )
        # An fp32 copy the measure loads the trained weights into (the engine's may be bf16 or partitioned),
        # wrapped the way GALIP wraps its CLIP: its `normalize` is the pixel mapping for training as well. Built
        # without `pretrained`, so its mean/std are the architecture's own: what a model loaded from the
        # exported file gets, and so what GALIP will feed it.
        with torch.random.fork_rng(devices=[]):  # its random init must not move the run's global RNG
            reference = create_clip(ClipConfig(name=m.clip.name), build_on).to(device)
        try:
            self.vision = ClipVision(reference).to(device)
        except ValueError as exc:
            raise ValueError(
                f"model.clip.name={m.clip.name!r}: the clip family trains CLIPs GALIP can use too: {exc}"
            ) from exc
        self.reference = cast(open_clip.CLIP, reference.eval().requires_grad_(False))

    # -- training --------------------------------------------------------------------------------------
    def trainables(self) -> dict[str, Trainable]:
        o = self.cfg.optim
        return {
            "clip": Trainable(
                self.model, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, decays=open_clip_decays
            )
        }

    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions).to(self.device)

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if batch.images is None:
            raise ValueError("the clip family trains on pixels: set data.format=images")
        with torch.no_grad():
            pixels = self.vision.normalize(batch.images.to(self.device, torch.float32))
        # inputs in the engine's dtype (bf16 weights under DeepSpeed's bf16 mode); the loss in fp32
        out = self.engines["clip"](pixels.to(self.dtype), self.tokens(batch.captions))
        scale = out["logit_scale"].float()
        # collective when world_size > 1: every rank's features, with gradients unless gather_with_grad=False
        with warnings.catch_warnings():
            # open_clip gathers with torch.distributed.nn.all_gather, which warns of its deprecation on every call
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
            loss = self.loss(out["image_features"].float(), out["text_features"].float(), scale)
        self.engines["clip"].backward_and_step(loss)
        return {"loss": loss.detach(), "logit_scale": scale.detach().reshape(())}

    def after_optimizer_step(self, step: int) -> None:
        self.clamp_logit_scale()

    def clamp_logit_scale(self) -> None:
        """log temperature into [0, ln 100] as open_clip_train does, both where the optimizer keeps it (ZeRO and
        bf16 keep an fp32 master the next step would copy back) and in the weights the forward reads."""
        param = self.model.logit_scale
        engine = self.engines.get("clip")
        partitioned = engine is not None and engine.partitioned
        with torch.no_grad():
            if engine is not None:
                clamp_master(param, partitioned)
            if partitioned:
                import deepspeed

                # rank 0's value is broadcast into every rank's partition on leaving
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.clamp_(0, MAX_LOG_SCALE)
            else:
                param.data.clamp_(0, MAX_LOG_SCALE)

    # -- measuring -------------------------------------------------------------------------------------
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The model's full weights in fp32 where they live; collective under ZeRO-3."""
        engine = self.engines.get("clip")
        with engine.gathered() if engine is not None else contextlib.nullcontext():
            return {k: v.detach().float().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def measure(self, held_out: Batch) -> tuple[dict[str, float], torch.Tensor | None]:
        """Retrieval top-1 both ways over the held-out batch with the current weights (no images to show)."""
        if held_out.images is None:
            raise ValueError("the clip family measures on images")
        self.reference.load_state_dict(self.trained_weights())
        images, captions = held_out.images.to(self.device, torch.float32), held_out.captions
        chunk = self.cfg.deepspeed.micro_batch_size
        image_features, text_features = [], []
        for start in range(0, len(captions), chunk):
            pixels = self.vision.normalize(images[start : start + chunk])
            image_features.append(self.reference.encode_image(pixels, normalize=True))
            text_features.append(
                self.reference.encode_text(self.tokens(captions[start : start + chunk]), normalize=True)
            )
        return retrieval_top1(torch.cat(image_features), torch.cat(text_features), captions), None

    # -- checkpoints and export ------------------------------------------------------------------------
    def inference_state(self) -> dict[str, Any]:
        return {"clip": {k: v.cpu() for k, v in self.trained_weights().items()}}

    def load_inference_state(self, state: dict[str, Any], **options: Any) -> None:
        self.model.load_state_dict(state["clip"])
        self.model.to(self.device).eval().requires_grad_(False)

    def export(self, directory: Path) -> Path:
        """`directory/open_clip_model.pt`: a plain state dict, what open_clip.create_model(name, pretrained=PATH)
        loads (open_clip's load_checkpoint); next to it a json naming the architecture that file needs."""
        path = Path(directory) / WEIGHTS_FILE
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        weights["logit_scale"] = weights["logit_scale"].reshape(())  # open_clip's shape
        atomic_write(path, lambda tmp: torch.save(weights, tmp))
        record = {
            "name": self.m.clip.name,
            "model_cfg": open_clip.get_model_config(self.m.clip.name),
            "weights": WEIGHTS_FILE,
        }
        atomic_write(path.with_name(ARCHITECTURE_FILE), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        return path
