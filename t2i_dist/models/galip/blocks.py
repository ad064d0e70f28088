"""GALIP's building blocks: text/noise-conditioned affine modulation (DF-blocks) and the residual conv blocks
of Mate-G (fusion, G-blocks) and Mate-D (D-blocks)."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalAffine(nn.Module):
    """Per-channel scale and shift predicted from the condition by two small MLPs; starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.scale = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.shift = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        # identity at init, so a fresh generator is a plain conv net the condition then learns to steer
        scale_out, shift_out = cast(nn.Linear, self.scale[2]), cast(nn.Linear, self.shift[2])
        nn.init.zeros_(scale_out.weight)
        nn.init.ones_(scale_out.bias)
        nn.init.zeros_(shift_out.weight)
        nn.init.zeros_(shift_out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.scale(cond)[:, :, None, None] * x + self.shift(cond)[:, :, None, None]


class DFBlock(nn.Module):
    """Deep fusion block: two conditional affines, each followed by LeakyReLU."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.affine0 = ConditionalAffine(cond_dim, channels)
        self.affine1 = ConditionalAffine(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.affine0(x, cond), 0.2)
        return F.leaky_relu(self.affine1(x, cond), 0.2)


def shortcut_conv(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()


class FusionBlock(nn.Module):
    """Bridge feature predictor block: conv -> DF-block -> conv -> DF-block, plus a shortcut."""

    def __init__(self, cond_dim: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = shortcut_conv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.fuse1(self.conv1(x), cond)
        h = self.fuse2(self.conv2(h), cond)
        return self.shortcut(x) + h


class GBlock(nn.Module):
    """Image generator block: resize to `size`, then DF-block -> conv -> DF-block -> conv, plus a shortcut."""

    def __init__(self, cond_dim: int, in_ch: int, out_ch: int, size: int):
        super().__init__()
        self.size = size
        self.fuse1 = DFBlock(cond_dim, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut = shortcut_conv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        h = self.conv1(self.fuse1(x, cond))
        h = self.conv2(self.fuse2(h, cond))
        return self.shortcut(x) + h


class DBlock(nn.Module):
    """Mate-D block on CLIP feature maps: x + gamma * convs(x) [+ beta * next CLIP layer's features].
    gamma and beta start at 0, so the fresh discriminator sees the first CLIP layer unchanged."""

    def __init__(self, in_ch: int, out_ch: int, takes_clip_features: bool):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2),
        )
        self.shortcut = shortcut_conv(in_ch, out_ch)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1)) if takes_clip_features else None

    def forward(self, x: torch.Tensor, clip_features: torch.Tensor | None = None) -> torch.Tensor:
        out = self.shortcut(x) + self.gamma * self.residual(x)
        if self.beta is not None:
            assert clip_features is not None, "this block takes the next CLIP layer's features"
            out = out + self.beta * clip_features
        return out
