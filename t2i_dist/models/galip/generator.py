"""Mate-G: bridge feature predictor -> (text-conditioned prompts) frozen CLIP-ViT -> image generator.

The frozen ViT is passed to forward() rather than held as a submodule, so the DeepSpeed engine wrapping
Mate-G owns only trainable weights (ZeRO never partitions or casts the shared CLIP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i_dist.models.galip.blocks import FusionBlock, GBlock
from t2i_dist.models.galip.config import GALIPConfig
from t2i_dist.models.galip.vision import ClipVision


def generator_channels(ngf: int, resolution: int) -> list[int]:
    """Channels entering each G-block, then leaving the last: one block per doubling from 8 px up."""
    blocks = int(math.log2(resolution)) - 2
    return [ngf * min(2**i, 8) for i in range(blocks + 1)][::-1]


class BridgeFeaturePredictor(nn.Module):
    """Noise -> a (bridge_channels, grid, grid) map -> fusion blocks conditioned on (z, T) -> CLIP-width map that
    stands in for the ViT's patch embeddings."""

    def __init__(self, m: GALIPConfig, cond_dim: int, clip_width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.channels = m.bridge_channels
        self.fc = nn.Linear(m.noise_dim, m.bridge_channels * grid * grid)
        self.blocks = nn.ModuleList(
            FusionBlock(cond_dim, m.bridge_channels, m.bridge_mid_channels, m.bridge_channels)
            for _ in range(m.bridge_blocks)
        )
        self.to_clip = nn.Conv2d(m.bridge_channels, clip_width, 5, 1, 2)

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.fc(noise).view(noise.shape[0], self.channels, self.grid, self.grid)
        for block in self.blocks:
            x = block(x, cond)
        return self.to_clip(x)


class PromptPredictor(nn.Module):
    """(z, T) -> one prompt token per selected ViT block, as (B, len(blocks), width)."""

    def __init__(self, cond_dim: int, clip_width: int, blocks: list[int]):
        super().__init__()
        self.blocks = list(blocks)
        self.width = clip_width
        self.fc = nn.Linear(cond_dim, clip_width * len(self.blocks)) if self.blocks else None

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            return cond.new_zeros(cond.shape[0], 0, self.width)
        return self.fc(cond).view(cond.shape[0], len(self.blocks), self.width)

    def by_block(self, prompts: torch.Tensor) -> dict[int, torch.Tensor]:
        # outside forward(): ZeRO-3's module hooks expect tensors or str-keyed containers as outputs
        return {block: prompts[:, i] for i, block in enumerate(self.blocks)}


class ImageGenerator(nn.Module):
    """CLIP-ViT output map -> G-blocks (DF-blocks, nearest upsampling) -> RGB at `resolution`."""

    def __init__(self, ngf: int, cond_dim: int, clip_width: int, resolution: int):
        super().__init__()
        channels = generator_channels(ngf, resolution)
        self.from_clip = nn.Conv2d(clip_width, channels[0], 5, 1, 2)
        sizes = [8 * 2**i for i in range(len(channels) - 1)]
        self.blocks = nn.ModuleList(
            GBlock(cond_dim, c_in, c_out, size)
            for c_in, c_out, size in zip(channels[:-1], channels[1:], sizes, strict=True)
        )
        self.to_rgb = nn.Conv2d(channels[-1], 3, 3, 1, 1)

    def forward(self, clip_map: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.from_clip(clip_map)
        for block in self.blocks:
            x = block(x, cond)
        return self.to_rgb(F.leaky_relu(x, 0.2))


class MateGenerator(nn.Module):
    def __init__(self, m: GALIPConfig, sentence_dim: int, clip_width: int, clip_grid: int, resolution: int):
        super().__init__()
        cond_dim = m.noise_dim + sentence_dim
        self.noise_dim = m.noise_dim
        self.bridge = BridgeFeaturePredictor(m, cond_dim, clip_width, clip_grid)
        self.prompts = PromptPredictor(cond_dim, clip_width, m.prompt_blocks)
        self.image = ImageGenerator(m.ngf, cond_dim, clip_width, resolution)
        self.clip_weight = m.bridge_clip_weight

    def forward(self, noise: torch.Tensor, sentence: torch.Tensor, vision: ClipVision) -> torch.Tensor:
        """Noise (B, noise_dim) and CLIP sentence vectors (B, D) -> images (B, 3, R, R), roughly in [-1, 1]."""
        cond = torch.cat([noise, sentence.to(noise.dtype)], dim=1)
        bridge = self.bridge(noise, cond)
        tokens, _ = vision.run_blocks(
            vision.tokens_from_grid(bridge), prompts=self.prompts.by_block(self.prompts(cond))
        )
        clip_map = vision.grid_from_tokens(tokens)
        return self.image(bridge + self.clip_weight * clip_map, cond)
