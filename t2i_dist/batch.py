"""The unit the data pipeline hands the training loop: one micro-batch of captions with pixels or latents."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One micro-batch. `images` are float in [-1, 1], NCHW; precomputed shards fill `latents`/`text` instead."""

    captions: list[str]
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    text: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.captions,
            move(self.images),
            move(self.latents),
            {k: v.to(device, non_blocking=True) for k, v in self.text.items()},
        )
