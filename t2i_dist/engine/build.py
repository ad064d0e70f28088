"""One builder for "plug-in + engines + loader", used by the loop, the benchmarks and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2i_dist import dist
from t2i_dist.config import Config
from t2i_dist.data.shards import ShardLoader
from t2i_dist.engine.engines import TrainedNetwork, build_engines
from t2i_dist.engine.precision import Placement
from t2i_dist.models.base import ModelPlugin, parameter_counts
from t2i_dist.models.registry import build_plugin


@dataclass
class Training:
    plugin: ModelPlugin
    engines: dict[str, TrainedNetwork]
    counts: dict[str, int]
    loader: ShardLoader | None


def build_training(
    cfg: Config,
    placement: Placement,
    rank: int,
    world_size: int,
    *,
    shards: list[str] | None = None,
    with_loader: bool = True,
) -> Training:
    """Identical initial weights on every rank (seeded by run.seed), then a per-rank RNG for everything after
    (noise, dropout, data order), so ranks draw different random numbers."""
    torch.manual_seed(cfg.run.seed)
    plugin = build_plugin(cfg, placement.device, placement.dtype)
    counts = parameter_counts(plugin)
    engines = build_engines(cfg, placement, plugin.trainables())
    plugin.attach_engines(dict(engines))
    torch.manual_seed(dist.rank_seed(cfg.run.seed, rank))
    loader = None
    if with_loader:
        loader = ShardLoader(
            cfg.data,
            cfg.deepspeed.micro_batch_size,
            rank,
            world_size,
            cfg.run.seed,
            shards=shards,
            pin_memory=placement.device.type == "cuda",
        )
    return Training(plugin, engines, counts, loader)
