"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of the images both GALIP networks show the
frozen CLIP: random translation and cutout, the same kind of policy for real and fake images.

Why: a small frozen CLIP is easy to fool with pixel patterns a person does not see (the generator raises its
CLIP similarity while the images stay off-caption), and a discriminator on few images overfits. Augmenting
every image before CLIP reads it, differentiably so the generator's gradients pass through, is the standard
cure for both. Colour transforms are left out on purpose: colour is part of what a caption says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("translation", "cutout")


def translate(images: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ratio * size pixels in x and y, filling with zeros (mid-grey in [-1, 1])."""
    b, _, h, w = images.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), generator=generator).to(images.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    # index into a one-pixel zero border: sources that fall off the image read the border
    src_rows = (rows - dy + 1).clamp(0, h + 1).expand(b, h, w)
    src_cols = (cols - dx + 1).clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(images, (1, 1, 1, 1))
    batch = torch.arange(b, device=images.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, src_rows, src_cols].permute(0, 3, 1, 2)


def cutout(images: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Zero one square of side ratio * size at a random centre per image (it may overhang the border)."""
    b, _, h, w = images.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h, (b, 1, 1), generator=generator).to(images.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = ((rows - cy).abs() <= size_y // 2) & ((cols - cx).abs() <= size_x // 2)
    return images * (~inside).unsqueeze(1).to(images.dtype)


def diff_augment(
    images: torch.Tensor, policy: list[str], translation: float, cutout_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Apply the policy's transforms in order; a fresh draw per image, from `generator` (a CPU generator, so
    a resumed run draws the same)."""
    for name in policy:
        if name == "translation":
            images = translate(images, translation, generator)
        elif name == "cutout":
            images = cutout(images, cutout_ratio, generator)
        else:
            raise ValueError(f"unknown augmentation {name!r}; choose from {POLICIES}")
    return images
