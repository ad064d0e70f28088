"""Image grids and PNG output."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_pil_grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """[0,1] NCHW -> one PIL image, `nrow` images per row."""
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.float().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return path


def prompt_seeds(prompts: list[str], per_prompt: int, base_seed: int = 0) -> tuple[list[str], list[int]]:
    """Expand prompts into (prompt, seed) pairs, grouped by seed index so each grid row is one seed."""
    flat_prompts, seeds = [], []
    for i in range(per_prompt):
        for prompt in prompts:
            flat_prompts.append(prompt)
            seeds.append(base_seed + i)
    return flat_prompts, seeds


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes_of_grid(images: torch.Tensor, nrow: int) -> bytes:
    return png_bytes(to_pil_grid(images, nrow))
