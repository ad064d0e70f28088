"""Mate-D's trainable part: a CLIP feature extractor over feature maps taken from several frozen CLIP-ViT
layers, then a quality assessor on those features joined with the sentence vector.

Its input is the stacked CLIP features, not pixels: the frozen ViT runs outside (vision.py), so the
matching-aware gradient penalty differentiates with respect to exactly these features and the sentence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i_dist.models.galip.blocks import DBlock
from t2i_dist.models.galip.config import GALIPConfig


class ClipFeatureExtractor(nn.Module):
    """features[:, 0] -> D-blocks each adding the next layer's features -> a final D-block to ndf*8 channels."""

    def __init__(self, clip_width: int, num_layers: int, out_channels: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            DBlock(clip_width, clip_width, takes_clip_features=True) for _ in range(num_layers - 1)
        )
        self.main = DBlock(clip_width, out_channels, takes_clip_features=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features[:, 0]
        for i, block in enumerate(self.blocks):
            x = block(x, features[:, i + 1])
        return self.main(x)


class QualityAssessor(nn.Module):
    """Image features concatenated with the sentence vector (tiled over the grid) -> one score per sample.
    Two valid convolutions shrink the grid to 1x1 (4x4 then 4x4 on ViT-B/32's 7x7 grid)."""

    def __init__(self, in_channels: int, sentence_dim: int, mid_channels: int, grid: int):
        super().__init__()
        first = (grid + 1) // 2
        self.conv1 = nn.Conv2d(in_channels + sentence_dim, mid_channels, first, bias=False)
        self.conv2 = nn.Conv2d(mid_channels, 1, grid - first + 1, bias=False)

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        tiled = sentence.to(features.dtype)[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        x = F.leaky_relu(self.conv1(torch.cat([features, tiled], dim=1)), 0.2)
        return self.conv2(x).flatten()


class MateDiscriminator(nn.Module):
    def __init__(self, m: GALIPConfig, clip_width: int, clip_grid: int, sentence_dim: int):
        super().__init__()
        self.extractor = ClipFeatureExtractor(clip_width, len(m.feature_layers), m.ndf * 8)
        self.assessor = QualityAssessor(m.ndf * 8, sentence_dim, m.ndf * 2, clip_grid)

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """CLIP features (B, layers, width, g, g) and sentence vectors (B, D) -> scores (B,)."""
        return self.assessor(self.extractor(features), sentence)
