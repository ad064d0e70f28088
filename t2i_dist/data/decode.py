"""Turning one raw webdataset sample into training tensors, or into the reason it has to be skipped.

Images: the shorter side is resized to data.resolution and the centre is cropped, giving float32 in [-1, 1],
CHW. Latent shards: `latent.npy` (C, h, w) becomes Batch.latents and every other `<name>.npy` becomes
Batch.text[name] (`hidden.npy`, `pooled.npy` as FrozenClipText produces; `text.npy` is read as "hidden").
Captions come from `txt`, else from json["caption"].
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
LATENT_KEY = "latent.npy"
TEXT_KEY_ALIASES = {"text": "hidden"}
# images above this many pixels are skipped before their pixels are decoded
MAX_IMAGE_PIXELS = 8192 * 8192


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decoded:
    caption: str
    image: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    text: dict[str, torch.Tensor] = field(default_factory=dict)


def read_caption(sample: dict[str, Any]) -> str:
    caption = ""
    if isinstance(sample.get("txt"), bytes):
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption and isinstance(sample.get("json"), bytes):
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
    if not caption:
        raise SkipSample("missing_caption")
    return caption


def decode_image(data: bytes, resolution: int, max_pixels: int) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise SkipSample("too_large")
        if image.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale in the DCT when that still covers the target: the shorter side
            # stays >= resolution, and the pixels decoded (and resized) drop by up to 64x for web-sized photos
            image.draft("RGB", (resolution, resolution))
        image = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    except SkipSample:
        raise
    except Image.DecompressionBombError:
        raise SkipSample("too_large") from None
    except Exception:  # noqa: BLE001 - whatever PIL raises for broken bytes, the sample is unusable
        raise SkipSample("undecodable_image") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0)


def _load_npy(data: bytes) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False))
    except Exception:  # noqa: BLE001 - any parse failure means the sample is unusable
        raise SkipSample("undecodable_latent") from None


def decode_latents(sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if LATENT_KEY not in sample:
        raise SkipSample("missing_latent")
    latent = _load_npy(sample[LATENT_KEY])
    text = {}
    for key, value in sample.items():
        if key.endswith(".npy") and key != LATENT_KEY:
            name = key[: -len(".npy")]
            text[TEXT_KEY_ALIASES.get(name, name)] = _load_npy(value)
    return latent, text


def decode_sample(
    sample: dict[str, Any], fmt: Literal["images", "latents"], resolution: int, max_pixels: int
) -> Decoded:
    """Decode a raw sample (bytes per key); raises SkipSample with the reason when it is unusable."""
    caption = read_caption(sample)
    if fmt == "latents":
        latent, text = decode_latents(sample)
        return Decoded(caption, latent=latent, text=text)
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SkipSample("missing_image")
    return Decoded(caption, image=decode_image(sample[key], resolution, max_pixels))


def shape_signature(decoded: Decoded) -> tuple:
    """Shapes that must agree within a batch (latent shards written with mixed settings would not stack)."""
    if decoded.latent is None:
        return ()
    return (tuple(decoded.latent.shape), tuple(sorted((k, tuple(v.shape)) for k, v in decoded.text.items())))


def collate(samples: list[Decoded]) -> dict[str, Any]:
    first = samples[0]
    return {
        "captions": [s.caption for s in samples],
        # a batch holds one kind of sample: when the first has images (latents), all have them
        "images": torch.stack([cast(torch.Tensor, s.image) for s in samples]) if first.image is not None else None,
        "latents": torch.stack([cast(torch.Tensor, s.latent) for s in samples]) if first.latent is not None else None,
        "text": {k: torch.stack([s.text[k] for s in samples]) for k in first.text},
    }
