"""Parameter counts of a config's networks without allocating them (accelerate's meta-device init)."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights

from t2i_dist.config import Config
from t2i_dist.models.base import parameter_counts as plugin_parameter_counts
from t2i_dist.models.registry import build_plugin


def parameter_counts(cfg: Config) -> dict[str, int]:
    with init_empty_weights():
        plugin = build_plugin(cfg.with_random_weights(), torch.device("meta"))
    return plugin_parameter_counts(plugin)


def print_parameter_counts(cfg: Config) -> dict[str, int]:
    counts = parameter_counts(cfg)
    print(f"[t2i_dist] {cfg.model.family} parameters ({cfg.run.name}):")
    for name, n in counts.items():
        print(f"  {name:<28} {n / 1e6:10.2f}M")
    return counts
