"""Stage 0: the frozen parts a config asks to train first (`train_config` of model.vae, model.text or
model.clip), each trained as a run of its own and exported, or reused when already trained.

The export lives next to the component's checkpoints, `<storage_path>/<run.name>/export/`, with a record of
the config that trained it (`component.json`). It is reused while that config is unchanged; a changed config
with a run already in that directory is refused (its checkpoints would be resumed under other settings).
The component runs log to the same MLflow server and experiment as the run that asked for them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2i_dist.config import ClipConfig, Config, ConfigError
from t2i_dist.launch import storage_uri
from t2i_dist.models.registry import load_config
from t2i_dist.models.vae.config import VAEConfig

if TYPE_CHECKING:
    from t2i_dist.launch import TrainResult

RECORD = "component.json"
Part = VAEConfig | ClipConfig


@dataclass
class Component:
    field: str  # dotted path of the frozen part in the config, e.g. "model.vae"
    cfg: Config  # the component's own training config

    @property
    def export_dir(self) -> Path:
        return Path(storage_uri(self.cfg)) / self.cfg.run.name / "export"  # local: remote ones are refused

    @property
    def digest(self) -> str:
        settings = self.cfg.to_dict()
        settings.pop("tracking", None)  # where it is logged does not change the weights
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def requested_components(cfg: Config) -> list[tuple[str, Part]]:
    """(dotted field, section) of every frozen part of the model section that names a train_config and no
    `pretrained` (which takes precedence: an override such as model.vae.pretrained=DIR is obeyed)."""
    found = []
    for name in type(cfg.model).model_fields:
        section = getattr(cfg.model, name)
        if isinstance(section, VAEConfig | ClipConfig) and section.train_config:
            if section.pretrained:
                print(f"[t2i_dist] model.{name}.pretrained is set: {section.train_config!r} is not trained for it")
                continue
            found.append((f"model.{name}", section))
    return found


def component_config(cfg: Config, field: str, section: Part) -> Config:
    """The component's config, logged where the parent logs; refused early if it cannot serve `field`."""
    train_config = str(section.train_config)
    logged_with = [f"tracking.experiment={cfg.tracking.experiment}"]
    if cfg.tracking.uri:
        logged_with.append(f"tracking.uri={cfg.tracking.uri}")
    comp = load_config(train_config, logged_with)
    wanted = "vae" if isinstance(section, VAEConfig) else "clip"
    if comp.model.family != wanted:
        raise ConfigError(
            f"{field}.train_config={train_config!r} is a {comp.model.family} config; {field} needs a {wanted} one"
        )
    if "://" in comp.cluster.storage_path:
        raise ConfigError(
            f"{field}.train_config={train_config!r} stores its run at {comp.cluster.storage_path}; its export must be "
            "read by every worker from a path, so train it on shared storage (a local or mounted cluster.storage_path) "
            "or train and export it yourself (python -m t2i_dist.train, then t2i_dist.export) and set "
            f"{field}.pretrained"
        )
    trained = getattr(comp.model, "clip", None)
    if isinstance(section, ClipConfig) and isinstance(trained, ClipConfig) and trained.name != section.name:
        raise ConfigError(
            f"{field}.name={section.name!r} but {train_config!r} trains {trained.name!r}: use one architecture in both"
        )
    return comp


def read_record(component: Component) -> dict[str, Any] | None:
    try:
        return json.loads((component.export_dir / RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return None


def train_and_export(component: Component, train: Callable[[Config], TrainResult]) -> dict[str, Any]:
    from t2i_dist.export import export_checkpoint

    result = train(component.cfg)
    if not result.checkpoint:
        raise ConfigError(f"{component.cfg.run.name}: training left no checkpoint to export")
    staging = component.export_dir.with_name("export.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    artifact = export_checkpoint(result.checkpoint, staging)
    record = {
        "config_digest": component.digest,
        "family": component.cfg.model.family,
        "artifact": artifact.name if artifact != staging else ".",
        "checkpoint": result.checkpoint,
        "seconds": round(result.seconds, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "metrics": {k: v for k, v in result.metrics.items() if k.startswith("held_out/")},
    }
    (staging / RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(component.export_dir, ignore_errors=True)
    staging.rename(component.export_dir)  # the record and the weights appear together
    return record


def resolve_components(cfg: Config, train: Callable[[Config], TrainResult]) -> Config:
    """`cfg` with every requested component's `pretrained` set to its export (trained now when missing)."""
    raw = cfg.to_dict()
    for field, section in requested_components(cfg):
        component = Component(field, component_config(cfg, field, section))
        record = read_record(component)
        name = component.cfg.run.name
        if record is None or record.get("config_digest") != component.digest:
            if record is not None:
                run_dir = component.export_dir.parent
                raise ConfigError(
                    f"{run_dir} holds a {name} run trained from another version of {section.train_config!r}; "
                    f"move it away (or give the changed config another run.name) to train it again"
                )
            print(f"[t2i_dist] stage 0: training {field} with {section.train_config!r} (run '{name}')")
            record = train_and_export(component, train)
        else:
            shown = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(record.get("metrics", {}).items()))
            print(f"[t2i_dist] stage 0: reusing {field} from run '{name}' ({record['finished']}; {shown})")
        artifact = component.export_dir / record["artifact"]
        target: dict[str, Any] = raw
        for part in field.split("."):
            target = target[part]
        target.update(pretrained=str(artifact), train_config=None)
        if component.cfg.model.family == "vae":
            target["scaling_factor"] = None  # the export's measured factor
    return cfg.revalidated(raw)
