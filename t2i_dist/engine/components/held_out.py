"""The family's own measure on a fixed held-out batch, for families trained as components of another (a VAE,
a CLIP): every `run.sample_every` steps and at the end, in place of prompt grids and FID."""

from __future__ import annotations

import logging

import torch

from t2i_dist import dist
from t2i_dist.batch import Batch
from t2i_dist.config import Config
from t2i_dist.data.sources import held_out_source
from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.eval.sources import list_items, read_images
from t2i_dist.images import png_bytes_of_grid

log = logging.getLogger(__name__)


def held_out_batch(cfg: Config) -> Batch:
    """`eval.num_samples` captioned images of `eval.captions`, else of the synthetic hold-out set, else of
    data.urls, in source order: the same batch at every measurement and in every process."""
    source, held_out = held_out_source(cfg.data, cfg.eval.captions)
    if not held_out and dist.rank() == 0:
        log.warning("measuring on training images (set eval.captions to a held-out set): %s", source)
    items = list_items(source, cfg.eval.num_samples, need_captions=True, s3=cfg.data.s3)
    images = torch.stack([img for _, img in read_images(items, cfg.data.resolution, cfg.data.s3)])
    return Batch([it.caption or "" for it in items], images=images.float() / 127.5 - 1)


class HeldOutMeasure(Component):
    collective = True  # the measure may gather a ZeRO-3 partitioned network

    def __init__(self, cfg: Config) -> None:
        self.batch = held_out_batch(cfg)
        self.last: dict[str, float] = {}

    def start(self, loop: Loop) -> None:
        if loop.step == 0:
            self.measure(loop)  # the untrained model's figure: the baseline the run improves on

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        every, last = loop.cfg.run.sample_every, outcome.step == loop.cfg.run.max_steps
        if (last or (every and outcome.step % every == 0)) and not outcome.stop:
            self.measure(loop)
            # published with the checkpoint that follows (Checkpoints runs later in the same step)
            loop.last_metrics = {**loop.last_metrics, **self.last}

    def finish(self, loop: Loop) -> None:
        if self.last:
            loop.say("held-out: " + ", ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in sorted(self.last.items())))

    def measure(self, loop: Loop) -> None:
        metrics, images = loop.plugin.measure(self.batch.to(loop.device))
        self.last = metrics
        if loop.rank != 0:
            return
        loop.log_metrics(metrics, loop.step)
        if images is not None and loop.tracker:
            loop.tracker.log_image(
                png_bytes_of_grid(images, min(len(self.batch), 8)), f"held_out/step_{loop.step:06d}.png"
            )
