"""The model families, by name: the root config schema and the plug-in for a config come from here.

A family is a folder under `models/` whose `__init__.py` exports `SPEC` (a `FamilySpec`), plus its name in
`BUILTIN` below. A family defined elsewhere (a team's own package, a test) calls `register(SPEC)`, or
declares an entry point in the group `t2i_dist.families` so that every process (Ray workers included)
finds it. Nothing outside a family's folder branches on its name.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import Annotated, Any, Union

import torch
from pydantic import Field, create_model

from t2i_dist.config import Config, ConfigError, FamilyConfig, load_raw_config, validate
from t2i_dist.models import clip, galip, ldm, vae
from t2i_dist.models.base import FamilySpec, ModelPlugin

log = logging.getLogger(__name__)

BUILTIN: tuple[FamilySpec, ...] = (ldm.SPEC, galip.SPEC, vae.SPEC, clip.SPEC)
ENTRY_POINT_GROUP = "t2i_dist.families"

_registered: dict[str, FamilySpec] = {spec.name: spec for spec in BUILTIN}
_entry_points_loaded = False


def register(spec: FamilySpec) -> None:
    """Add a family (or replace one of the same name); the config schema is rebuilt on next use."""
    _registered[spec.name] = spec
    config_schema.cache_clear()


def unregister(name: str) -> None:
    _registered.pop(name, None)
    config_schema.cache_clear()


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(point.load())
        except Exception as exc:  # noqa: BLE001 - a broken third-party family must not hide the others
            log.warning("model family entry point %s could not be loaded: %s", point.value, exc)


def families() -> dict[str, FamilySpec]:
    _load_entry_points()
    return dict(_registered)


def family(name: str) -> FamilySpec:
    known = families()
    if name not in known:
        raise ConfigError(f"unknown model family {name!r}; registered: {', '.join(sorted(known))}")
    return known[name]


@functools.cache
def config_schema() -> type[Config]:
    """The root schema: every section of `Config`, with `model` the union of the registered families."""
    classes = tuple(spec.config_class for spec in families().values())
    model_type: Any = Annotated[Union[classes], Field(discriminator="family")] if len(classes) > 1 else classes[0]  # noqa: UP007
    schema = create_model("Config", __base__=Config, model=(model_type, ...))
    # picklable by reference (Ray ships configs to tasks): module __getattr__ below resolves the name
    schema.__module__, schema.__qualname__ = __name__, "Config"
    return schema


def __getattr__(name: str) -> Any:
    if name == "Config":
        return config_schema()
    raise AttributeError(name)


def validate_config(raw: dict[str, Any]) -> Config:
    configs: dict[str, type[FamilyConfig]] = {n: s.config_class for n, s in families().items()}
    return validate(config_schema(), configs, raw)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A shipped config name or a YAML path, with dotted overrides, validated against the registry's schema."""
    return validate_config(load_raw_config(name_or_path, overrides))


def build_plugin(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> ModelPlugin:
    return family(cfg.model.family).plugin_class()(cfg, device, dtype)
