"""Frozen open_clip models: text token states for cross-attention, sentence vectors, and the vision tower.

Weights come from a local file, an open_clip pretrained tag or an `hf-hub:` id (real loading code); with no
`pretrained` the architecture is built with random weights, which is what tests and dry runs use offline.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import cast

import open_clip
import torch
from torch import nn

from t2i_dist.config import ClipConfig


@cache
def _register_shipped_configs() -> None:
    open_clip.add_model_config(resources.files("t2i_dist.models.clip") / "configs")


def create_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build (and load) an open_clip CLIP model as open_clip returns it: training mode, gradients on. The one
    loading path for frozen and trained CLIPs, so a file the clip family exports loads like any checkpoint."""
    _register_shipped_configs()
    if cfg.name not in open_clip.list_models() and not cfg.name.startswith("hf-hub:"):
        raise ValueError(
            f"unknown CLIP architecture {cfg.name!r}; use an open_clip name such as ViT-B-32 "
            f"or a shipped one: t2i-tiny-clip"
        )
    return open_clip.create_model(cfg.name, pretrained=cfg.pretrained, device=device)


def load_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build (and load) an open_clip CLIP model in eval mode with gradients off ("meta" for counting)."""
    model = create_clip(cfg, device)
    model.eval().requires_grad_(False)
    return model


def tokenizer_for(cfg: ClipConfig):
    _register_shipped_configs()
    return open_clip.get_tokenizer(cfg.name)


class FrozenClipText(nn.Module):
    """Token-level hidden states (B, L, width) and a pooled sentence embedding (B, embed_dim)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    text_projection: torch.Tensor | nn.Linear
    attn_mask: torch.Tensor | None

    def __init__(self, cfg: ClipConfig, model: nn.Module | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        model = model if model is not None else load_clip(cfg, device)
        clip = cast(open_clip.CLIP, model)  # the text tower's parts (open_clip ships no type hints)
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.text_pool_type = getattr(model, "text_pool_type", "argmax")
        self.tokenizer = tokenizer_for(cfg)
        self.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    def train(self, mode: bool = True) -> FrozenClipText:
        return super().train(False)  # frozen: dropout stays off whatever the caller sets

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = self.token_embedding.weight.device
        tokens = self.tokenize(captions).to(device)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        mask = self.attn_mask[: tokens.shape[1], : tokens.shape[1]] if self.attn_mask is not None else None
        if self.cfg.layer == "penultimate":
            for block in self.transformer.resblocks[:-1]:
                x = block(x, attn_mask=mask)
            hidden = self.ln_final(x)
            x = self.transformer.resblocks[-1](x, attn_mask=mask)
        else:
            x = self.transformer(x, attn_mask=mask)
            hidden = None
        x = self.ln_final(x)
        hidden = x if hidden is None else hidden
        pooled = x[torch.arange(x.shape[0], device=device), tokens.argmax(dim=-1)]
        proj = self.text_projection
        pooled = pooled @ proj if isinstance(proj, torch.Tensor) else proj(pooled)
        return {"hidden": hidden, "pooled": pooled}
