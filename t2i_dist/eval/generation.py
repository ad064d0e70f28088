"""Images generated from a checkpoint, one per caption, with a seed derived from (base seed, caption index):
which worker generates a caption, and in which batch, does not change its image."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from t2i_dist.eval.inception import pil_to_uint8, to_uint8
from t2i_dist.eval.metrics import Timer
from t2i_dist.eval.sources import Item, center_crop_resize


def caption_seed(base_seed: int, index: int) -> int:
    """A well-mixed 31-bit seed per caption (SeedSequence hashing: neighbouring indices are unrelated)."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint32)[0] >> 1)


def checkpoint_config(path: str) -> dict[str, Any]:
    """The resolved config saved in a checkpoint directory (local or s3://), without loading weights."""
    url = path.rstrip("/") + "/config.json"
    fs, fs_path = fsspec.core.url_to_fs(url)
    if not fs.exists(fs_path):
        raise FileNotFoundError(
            f"{path} is not a t2i_dist checkpoint (no config.json); pass a checkpoint_* directory of a run"
        )
    with fs.open(fs_path, "r") as f:
        return json.loads(f.read())


def resize_generated(images: torch.Tensor, resolution: int | None) -> list[torch.Tensor]:
    """[0,1] NCHW -> uint8 CHW at the protocol resolution (PIL bicubic, as real images are prepared)."""
    quantised = to_uint8(images)
    if resolution is None or tuple(quantised.shape[-2:]) == (resolution, resolution):
        return list(quantised)
    from PIL import Image

    return [
        pil_to_uint8(center_crop_resize(Image.fromarray(img.permute(1, 2, 0).numpy()), resolution)) for img in quantised
    ]


@dataclass(frozen=True)
class CheckpointGenerator:
    """`load_plugin(checkpoint, device)` makes the plug-in (engine/inference.py's, given by the entry point):
    a module-level function, so the generator travels to Ray tasks."""

    checkpoint: str
    load_plugin: Callable[[str, str], Any]
    seed: int = 0
    batch_size: int = 8
    resolution: int | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def batches(self, items: list[Item]) -> Iterator[tuple[list[Item], list[torch.Tensor], float]]:
        plugin = self.load_plugin(self.checkpoint, self.device)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            seeds = [caption_seed(self.seed, it.index) for it in chunk]
            with Timer() as timer:
                images = plugin.sample([it.caption or "" for it in chunk], seeds, **self.options)
            yield chunk, resize_generated(images, self.resolution), timer.seconds
