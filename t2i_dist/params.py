"""Parameter counts of a config's networks without allocating them (accelerate's meta-device init)."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights

from t2i_dist.config import Config
from t2i_dist.models import plugin_class


def _without_pretrained(cfg: Config) -> Config:
    """The same architecture with random weights: counting must work offline."""
    raw = cfg.to_dict()
    for part in raw["model"].values():
        if isinstance(part, dict) and "pretrained" in part:
            part["pretrained"] = None
    return Config.model_validate(raw)


def parameter_counts(cfg: Config) -> dict[str, int]:
    with init_empty_weights():
        plugin = plugin_class(cfg.model.family)(_without_pretrained(cfg), torch.device("meta"))
    return plugin.parameter_counts()


def print_parameter_counts(cfg: Config) -> dict[str, int]:
    counts = parameter_counts(cfg)
    print(f"[t2i_dist] {cfg.model.family} parameters ({cfg.run.name}):")
    for name, n in counts.items():
        print(f"  {name:<28} {n / 1e6:10.2f}M")
    return counts
