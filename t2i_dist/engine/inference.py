"""A plug-in ready to sample, from a checkpoint directory (local or s3://), outside any training run."""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal, get_args

import torch

from t2i_dist.engine.checkpoint import load_for_inference
from t2i_dist.models.base import ModelPlugin
from t2i_dist.models.registry import build_plugin, family, validate_config

log = logging.getLogger(__name__)

UntrainedScope = Literal["networks", "system"]


def sample_options(family_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The sampling options this family accepts; options it does not take are reported and dropped (GALIP
    generates in one forward pass: no sampler, steps or guidance)."""
    spec = family(family_name)
    accepted, ignored = spec.split_options(options, spec.sample_options)
    if ignored:
        log.warning("the %s family takes no %s; ignored", family_name, ", ".join(ignored))
    return accepted


def load_plugin(
    checkpoint: str, device: str = "cpu", untrained: UntrainedScope | None = None, **load_options: Any
) -> ModelPlugin:
    """Networks rebuilt from the checkpoint's config, weights from its inference state. `load_options` are
    the family's FamilySpec.load_options (e.g. use_ema for latent diffusion); others are dropped.

    `untrained` is a baseline a trained model's figures are compared with, under the same protocol:
    "networks" keeps the trained networks at the run's seeded initial weights and its frozen parts as
    configured (e.g. the UNet at step 0 on the trained autoencoder); "system" also builds every frozen
    part at random weights instead of loading its `pretrained` (nothing trained anywhere: what the run
    started from when its components had to be trained too)."""
    if untrained is not None and untrained not in get_args(UntrainedScope):
        raise ValueError(f"untrained must be None or one of {get_args(UntrainedScope)}, got {untrained!r}")
    config, state = load_for_inference(checkpoint)
    config.setdefault("deepspeed", {})["compile"] = False  # a training speed-up; sampling runs eager
    cfg = validate_config(config)
    if untrained == "system":
        cfg = cfg.with_random_weights()
    spec = family(cfg.model.family)
    accepted, _ = spec.split_options(load_options, spec.load_options)
    torch.manual_seed(cfg.run.seed)
    plugin = build_plugin(cfg, torch.device(device), torch.float32)
    trained_parts = plugin.trainables() if untrained else {}
    initial = {name: copy.deepcopy(t.module.state_dict()) for name, t in trained_parts.items()}
    # loaded in full even when untrained: the frozen parts a plug-in keeps in its state (a random CLIP) and
    # the sampling set-up come from there; then only the trained networks go back to their initial weights
    plugin.load_inference_state(state, **accepted)
    if untrained:
        for name, trainable in trained_parts.items():
            trainable.module.load_state_dict(initial[name])
    return plugin
