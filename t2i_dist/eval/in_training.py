"""Evaluation inside the training worker group: every `eval.every` steps each rank generates images for its
contiguous share of `eval.num_samples` captions, accumulates sums, and one all_reduce gives every rank the
same FID (plus text alignment on the synthetic data set), which rank 0 logs.

Use from the training loop (all ranks, collectively):

    evaluator = InTrainingEval(cfg, rank, world_size, device) if cfg.eval.every else None
    ...
    if evaluator and evaluator.due(step):
        metrics = evaluator.run(plugin, step)     # {"eval/fid": ..., "eval/alignment": ...}

Ranks call `plugin.sample` the same number of times (short chunks are padded with discarded batches), so a
ZeRO-3 model, whose forward passes gather parameters collectively, cannot deadlock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from t2i_dist.data.sources import held_out_source
from t2i_dist.eval.alignment_cache import cache_dir, ensure_classifier
from t2i_dist.eval.fanout import ImageReader, all_reduce_partial, evaluate_chunk, split_contiguous
from t2i_dist.eval.generation import caption_seed, resize_generated
from t2i_dist.eval.inception import ExtractorSpec
from t2i_dist.eval.metrics import MetricSpec, Partial, Timer, pair_metrics, set_metrics
from t2i_dist.eval.reference import load_reference, reference_key, save_reference
from t2i_dist.eval.sources import Item, list_items

if TYPE_CHECKING:
    from t2i_dist.config import Config
    from t2i_dist.models.base import ModelPlugin

log = logging.getLogger(__name__)


@dataclass
class PluginGenerator:
    """Generates with a live plug-in, in `num_batches` lockstep batches (extra ones are discarded)."""

    plugin: ModelPlugin
    seed: int
    batch_size: int
    resolution: int | None
    num_batches: int

    def batches(self, items: list[Item]) -> Iterator[tuple[list[Item], list[torch.Tensor], float]]:
        for b in range(self.num_batches):
            chunk = items[b * self.batch_size : (b + 1) * self.batch_size]
            padding = chunk or items[-1:]  # same forward passes on every rank; the result is dropped
            seeds = [caption_seed(self.seed, it.index) for it in padding]
            with Timer() as timer:
                images = self.plugin.sample([it.caption or "" for it in padding], seeds)
            if chunk:
                yield chunk, resize_generated(images, self.resolution), timer.seconds


class InTrainingEval:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, batch_size: int = 8):
        e = cfg.eval
        self.every, self.rank, self.world = e.every, rank, world_size
        self.seed = cfg.run.seed
        self.batch_size = batch_size
        source, _ = held_out_source(cfg.data, e.captions)
        self.items = list_items(source, e.num_samples, need_captions=True, s3=cfg.data.s3)
        if len(self.items) < world_size:
            raise ValueError(f"eval.num_samples={len(self.items)} is below the {world_size} workers; raise it")
        self.chunk = split_contiguous(self.items, world_size)[rank]
        self.num_batches = math.ceil(math.ceil(len(self.items) / world_size) / batch_size)
        self.spec = MetricSpec(
            extractor=ExtractorSpec(
                e.inception_path, getattr(e, "resize", "clean"), getattr(e, "inception_head_path", None), batch_size=16
            ),
            resolution=getattr(e, "resolution", None) or cfg.data.resolution,
            keep_features=False,
            clip=getattr(e, "clip", None),
            alignment_path=self._alignment_classifier(cfg),
            device=str(device),
        )
        self.spec.check()
        self.cache_dir = e.reference_cache
        self.reference: Partial | None = None

    def _alignment_classifier(self, cfg: Config) -> str | None:
        """The configured classifier; on the synthetic data set, one trained on first use by rank 0 and sent
        to the other ranks (which may be on other nodes), so every rank judges with the same network. It learns
        from the training shards (data.urls), not the evaluation captions: a held-out set is too small to train a
        probe that passes the accuracy bar. Rank 0's failure (a classifier refused for too few samples) reaches
        every rank: none waits for the bytes."""
        configured = getattr(cfg.eval, "alignment_classifier", None)
        if configured or not cfg.data.synthesize.enabled:
            return configured
        if self.every > cfg.run.max_steps:
            return None  # no evaluation falls within the run: nothing to judge, no classifier to train
        folder = cache_dir()
        name: str | None = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                name = ensure_classifier(None, cfg.data.urls, s3=cfg.data.s3).name
            except Exception as exc:  # re-raised below, once the other ranks know
                error = exc
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            blob: list[Any] = [None]
            if self.rank == 0:
                blob = [(str(error) if error else None, name, (folder / name).read_bytes() if name else None)]
            torch.distributed.broadcast_object_list(blob, src=0)
            failure, name, data = blob[0]
            if self.rank != 0 and failure is not None:
                raise RuntimeError(f"rank 0 could not provide the alignment classifier: {failure}")
            if self.rank != 0 and not (folder / name).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f"{name}.{self.rank}.tmp"
                tmp.write_bytes(data)
                tmp.replace(folder / name)
        if error is not None:
            raise error
        return str(folder / cast(str, name))

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def _reference_stats(self) -> Partial:
        if self.reference is not None:
            return self.reference
        key = reference_key(self.items, self.spec)
        cached = load_reference(self.cache_dir, key) if self.cache_dir else None
        if cached is None:
            local = evaluate_chunk(ImageReader(self.spec.resolution), self.chunk, self.spec, len(self.items))
            cached = all_reduce_partial(local)
            if self.cache_dir and self.rank == 0:
                save_reference(self.cache_dir, key, cached)
        self.reference = cached
        return cached

    def run(self, plugin: ModelPlugin, step: int) -> dict[str, float]:
        """Collective: every rank calls it; every rank gets the same metrics."""
        real = self._reference_stats()
        producer = PluginGenerator(plugin, self.seed, self.batch_size, self.spec.resolution, self.num_batches)
        fake = all_reduce_partial(evaluate_chunk(producer, self.chunk, self.spec, len(self.items)))
        metrics = {
            **pair_metrics(fake, real),
            **set_metrics(fake),
            **{f"real/{k}": v for k, v in set_metrics(real).items()},
        }  # the ceiling, for the report
        out = {f"eval/{k}": float(v) for k, v in metrics.items() if not isinstance(v, bool)}
        out["eval/num_samples"] = float(fake.count)
        if fake.generated:
            out["eval/seconds_per_image"] = fake.generation_seconds / fake.generated
        return out
