"""Periodic work around the training step. Each component owns its schedule; the loop calls every hook of
every component in the order of `engine.loop.default_components` (documented there)."""

from t2i_dist.engine.components.base import Component, StepOutcome

__all__ = ["Component", "StepOutcome"]
