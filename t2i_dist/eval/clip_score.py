"""CLIP score: 100 * max(cos(image embedding, caption embedding), 0), averaged (Hessel et al. 2021, with
torchmetrics' scale of 100). Only meaningful with trained CLIP weights, so it runs only when
`eval.clip.pretrained` names them; the sums (score total, count) merge across workers."""

from __future__ import annotations

from typing import cast

import open_clip
import torch
import torch.nn.functional as F

from t2i_dist.config import ClipConfig
from t2i_dist.models.clip.encoders import load_clip, tokenizer_for


def clip_unavailable_reason(cfg: ClipConfig | None) -> str | None:
    if cfg is None:
        return "no CLIP model configured (eval.clip)"
    if not cfg.pretrained:
        return "eval.clip.pretrained is not set: a randomly initialised CLIP gives meaningless scores"
    return None


class ClipScorer:
    def __init__(self, cfg: ClipConfig, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        # open_clip.CLIP or CustomTextCLIP: the same visual/encode_* API (open_clip ships no type hints)
        self.model = cast(open_clip.CLIP, load_clip(cfg).to(self.device))
        self.tokenizer = tokenizer_for(cfg)
        pre = self.model.visual.preprocess_cfg
        self.size = tuple(pre["size"]) if isinstance(pre["size"], (tuple, list)) else (pre["size"],) * 2
        self.mean = torch.tensor(pre["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"], device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float at the vision tower's input size (bicubic, antialiased)."""
        x = images.to(self.device).float() / 255
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the CLIP's image embeddings (not normalised)."""
        return self.model.encode_image(self.preprocess(images))

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """Captions -> the CLIP's text embeddings (not normalised)."""
        return self.model.encode_text(self.tokenizer(captions).to(self.device))

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        image_emb = F.normalize(self.image_embeddings(images).float(), dim=-1)
        text_emb = F.normalize(self.text_embeddings(captions).float(), dim=-1)
        return 100 * (image_emb * text_emb).sum(dim=-1).clamp(min=0)
