"""Model families, looked up by the config's `model.family`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from t2i_dist.models.base import ModelPlugin


def plugin_class(family: str) -> type[ModelPlugin]:
    # imported lazily: the driver validates configs without loading diffusers or open_clip
    if family == "ldm":
        from t2i_dist.models.ldm import LDMPlugin

        return LDMPlugin
    if family == "galip":
        from t2i_dist.models.galip.plugin import GALIPPlugin

        return GALIPPlugin
    raise ValueError(f"unknown model family {family!r}; known: ldm, galip")
