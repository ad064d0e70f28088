"""Mate-D's trainable part: a CLIP feature extractor over feature maps taken from several frozen CLIP-ViT
layers, then a quality assessor on those features joined with the sentence vector.

Its input is the stacked CLIP features: the frozen ViT runs outside (vision.py), so the matching-aware gradient
penalty differentiates with respect to exactly these features and the sentence. With `model.pixel_branch` it
also reads the (augmented) pixels CLIP was shown, through a small conv stack joined to the CLIP features at the
ViT's patch grid: a ViT's patch embedding projects each patch linearly to its width (192 values to 64 in the
tiny CLIP), so detail inside one patch, such as a small shape's outline, can be invisible to a CLIP-only
discriminator.

With `model.projection` the score also gets a projection term (Miyato & Koyama, ICLR 2018): the inner product
of the pooled image features with a linear map of the sentence vector. The concatenation path alone must learn
every image-text interaction through the assessor's narrow first convolution (ndf * 2 channels)."""

from __future__ import annotations

import math

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
    Two valid convolutions shrink the grid to 1x1 (4x4 then 4x4 on ViT-B/32's 7x7 grid); with `projection`,
    plus <mean-pooled features, W sentence>."""

    def __init__(self, in_channels: int, sentence_dim: int, mid_channels: int, grid: int, projection: bool = False):
        super().__init__()
        first = (grid + 1) // 2
        self.conv1 = nn.Conv2d(in_channels + sentence_dim, mid_channels, first, bias=False)
        self.conv2 = nn.Conv2d(mid_channels, 1, grid - first + 1, bias=False)
        self.project = nn.Linear(sentence_dim, in_channels, bias=False) if projection else None

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        sentence = sentence.to(features.dtype)
        tiled = sentence[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        x = F.leaky_relu(self.conv1(torch.cat([features, tiled], dim=1)), 0.2)
        scores = self.conv2(x).flatten()
        if self.project is None:
            return scores
        pooled = F.leaky_relu(features, 0.2).mean(dim=(2, 3))
        return scores + (pooled * self.project(sentence)).sum(dim=1)


class PixelFeatureExtractor(nn.Module):
    """[-1, 1] images -> stride-2 convs (one per halving towards the CLIP grid) -> (B, out_channels, g, g)."""

    def __init__(self, resolution: int, grid: int, base_channels: int, out_channels: int):
        super().__init__()
        halvings = max(0, int(math.log2(resolution / grid)))
        widths = [min(base_channels * 2**i, out_channels) for i in range(halvings)] + [out_channels]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*layers)
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.convs(images)
        # a resolution that is not the grid times a power of two (224 px ViT-B/32 on 128 px images) is pooled
        return x if x.shape[-1] == self.grid else F.adaptive_avg_pool2d(x, self.grid)


class MateDiscriminator(nn.Module):
    def __init__(self, m: GALIPConfig, clip_width: int, clip_grid: int, sentence_dim: int, resolution: int = 0):
        super().__init__()
        self.extractor = ClipFeatureExtractor(clip_width, len(m.feature_layers), m.ndf * 8)
        if m.pixel_branch and resolution <= 0:
            raise ValueError("model.pixel_branch needs the image resolution")
        self.pixels = PixelFeatureExtractor(resolution, clip_grid, m.ndf, m.ndf * 8) if m.pixel_branch else None
        channels = m.ndf * 8 * (2 if self.pixels is not None else 1)
        self.assessor = QualityAssessor(channels, sentence_dim, m.ndf * 2, clip_grid, m.projection)

    def forward(
        self, features: torch.Tensor, sentence: torch.Tensor, pixels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CLIP features (B, layers, width, g, g), sentence vectors (B, D) and, with a pixel branch, the images
        CLIP read (B, 3, R, R) -> scores (B,)."""
        x = self.extractor(features)
        if self.pixels is not None:
            if pixels is None:
                raise ValueError("this discriminator has a pixel branch: pass the images CLIP read")
            x = torch.cat([x, self.pixels(pixels.to(x.dtype))], dim=1)
        return self.assessor(x, sentence)
