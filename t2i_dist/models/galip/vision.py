"""The frozen CLIP-ViT that both GALIP networks run inside: block by block, with optional prompt tokens and
feature taps, differentiable with respect to its inputs (Mate-G's gradients flow through it)."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


def require_batch_first(transformer: nn.Module, what: str) -> None:
    """This code feeds open_clip's transformer blocks (B, L, D) tokens, as open_clip >= 2.26 builds them; older
    releases build (L, B, D) blocks, which would silently attend across the batch instead of the sequence."""
    attention = [
        b.attn
        for b in getattr(transformer, "resblocks", [])
        if isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
    ]
    if not getattr(transformer, "batch_first", False) or not all(a.batch_first for a in attention):
        raise ValueError(
            f"{what}: open_clip built sequence-first transformer blocks (L, B, D), but this code runs them "
            f"batch-first (B, L, D); install open_clip_torch>=2.26 (open_clip "
            f"{getattr(open_clip, '__version__', '?')} is installed)"
        )


class ClipVision(nn.Module):
    """Wraps `open_clip` `model.visual` (a plain ViT with a class token). Parameters stay frozen; gradients
    still reach the inputs. `checkpoint_blocks` recomputes each block in backward instead of storing its
    activations (the frozen ViT dominates Mate-G's activation memory)."""

    mean: torch.Tensor  # buffers registered in __init__
    std: torch.Tensor

    def __init__(self, clip_model: nn.Module, checkpoint_blocks: bool = False):
        super().__init__()
        visual = clip_model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"GALIP needs a ViT CLIP image tower, got {type(visual).__name__}; use e.g. ViT-B-32")
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError("GALIP needs a CLIP ViT pooled by its class token (pool_type 'tok', no attention pool)")
        require_batch_first(visual.transformer, "GALIP's CLIP ViT")
        self.visual = visual
        self.checkpoint_blocks = checkpoint_blocks
        pre = open_clip.get_model_preprocess_cfg(clip_model)
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ClipVision:
        return super().train(False)  # frozen: stays in eval mode whatever the caller sets

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid(self) -> int:
        return self.visual.grid_size[0]

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images at any size -> CLIP's input (its size, its mean/std), differentiably."""
        x = (images + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            downscaling = x.shape[-1] > self.image_size
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=downscaling
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def tokens_from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Patch-embedding-like maps (B, width, g, g) -> token sequence (B, 1 + g*g, width) ready for block 0."""
        x = grid.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.visual.positional_embedding.to(x.dtype)
        return self.visual.ln_pre(x)

    def tokens_from_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_grid(self.visual.conv1(self.normalize(images)))

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        if self.checkpoint_blocks and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def run_blocks(
        self,
        x: torch.Tensor,
        prompts: dict[int, torch.Tensor] | None = None,
        taps: list[int] | None = None,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks 0..stop-1. Block i in `prompts` sees one extra token (B, width) appended to the sequence
        and dropped after it; `taps` lists blocks whose output feature maps (B, width, g, g) are returned."""
        prompts = prompts or {}
        taps = taps or []
        features = []
        for i in range(self.depth if stop is None else stop):
            if i in prompts:
                x = self._block(i, torch.cat([x, prompts[i].to(x.dtype).unsqueeze(1)], dim=1))[:, :-1]
            else:
                x = self._block(i, x)
            if i in taps:
                features.append(self.grid_from_tokens(x))
        return x, features

    def grid_from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g*g, width) -> (B, width, g, g), dropping the class token."""
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], self.width, self.grid, self.grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens -> CLIP image embedding (class token, ln_post, projection)."""
        pooled = self.visual.ln_post(x[:, 0])
        proj = self.visual.proj
        return pooled @ proj.to(pooled.dtype) if proj is not None else pooled

    def encode(
        self, images: torch.Tensor, taps: list[int], with_embedding: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[-1, 1] images -> stacked tap features (B, len(taps), width, g, g) and, if asked, the image embedding
        (then all blocks run; otherwise only up to the last tap)."""
        stop = None if with_embedding else max(taps) + 1
        x, features = self.run_blocks(self.tokens_from_images(images), taps=taps, stop=stop)
        return torch.stack(features, dim=1), (self.embed(x) if with_embedding else None)
