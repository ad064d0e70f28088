"""Run configuration: sections, YAML loading, dotted overrides and readable validation errors.

Every key is declared here or in a model family's config class, so a typo is an error that names the key
and what is allowed, raised on the driver before any cluster resource is touched. This module knows no
model family: the root schema's `model` section is assembled from the family registry
(`t2i_dist.models.registry.config_schema`), which passes itself to `validate` here.
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    # protected_namespaces: family configs may name fields model_* (pydantic reserves the prefix by default)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


TRAIN_CONFIG_HELP = (
    "a config of the {family} family (shipped name or path) trained before this run, as a run of its own; its "
    "exported weights are reused while that config is unchanged. A `pretrained` value takes precedence"
)


class ClipConfig(Section):
    """A frozen open_clip model, used by the families and by evaluation's CLIP score. `name` is an open_clip
    architecture (e.g. ViT-B-32) or a shipped tiny one (t2i-tiny-clip); `pretrained` is a local checkpoint
    file, an open_clip tag, or an `hf-hub:org/repo` id. None builds random weights (dry runs and tests)."""

    name: str = "t2i-tiny-clip"
    pretrained: str | None = None
    layer: Literal["last", "penultimate"] = "last"
    train_config: str | None = Field(None, description=TRAIN_CONFIG_HELP.format(family="clip"))


class FamilyConfig(Section):
    """Base of every family's `model:` section; the registry puts the families' subclasses in the schema."""

    family: str

    def check_compatible(self, cfg: Config) -> None:
        """Cross-section checks (raise ValueError with the fix); run at validation, before Ray starts."""

    def summary(self) -> dict[str, Any]:
        return {"family": self.family}


class RunSection(Section):
    name: str = "t2i"
    seed: int = 0
    max_steps: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=0, description="0 disables sample grids during training")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train may do from the last checkpoint")
    preemption_grace_s: float = Field(60.0, gt=0)
    preemption_poll_s: float = Field(
        30.0,
        gt=0,
        description="how often rank 0 looks for the driver's preemption "
        "request file (a storage call) and every rank asks Ray about node drains",
    )
    max_nonfinite_steps: int = Field(20, ge=1, description="abort after this many consecutive non-finite steps")
    deterministic: bool = False


class ClusterSection(Section):
    address: str | None = Field(None, description="Ray address; None uses RAY_ADDRESS or starts a local Ray")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker")
    storage_path: str = Field("runs", description="local directory or s3:// URI for checkpoints")
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    micro_batch_size: int = Field(8, ge=1, description="samples per worker per forward pass")
    grad_accum_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False,
        description="torch.compile the trained network (LDM UNet): ~8 % faster steps on "
        "CPU for ldm-tiny, after 1-2 min of compiling on the first step (cached afterwards)",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload; compiles DeepSpeed's CPU Adam on first use")


class OptimSection(Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)


class S3Section(Section):
    endpoint_url: str | None = Field(None, description="None uses AWS_ENDPOINT_URL / the AWS default")
    region: str | None = None
    anon: bool = False
    retries: int = Field(8, ge=0, description="read attempts with exponential backoff before a shard fails")


class SynthesizeSection(Section):
    enabled: bool = Field(False, description="write synthetic shards to data.urls' directory when missing")
    num_samples: int = Field(2048, ge=1)
    samples_per_shard: int = Field(256, ge=1)
    image_size: int = Field(64, ge=8)
    holdout_samples: int = Field(
        0,
        ge=0,
        description="also write this many samples of another seed to `<directory>-holdout`: the held-out set "
        "families without image generation (vae, clip) measure on when eval.captions is unset",
    )


class DataSection(Section):
    urls: str | list[str] = Field(..., description="shard paths, brace patterns, file:// or s3:// URLs")
    format: Literal["images", "latents"] = "images"
    resolution: int = Field(32, ge=8)
    shuffle_buffer: int = Field(256, ge=0)
    resampled: bool = False
    loader_workers: int = Field(1, ge=0)
    max_skip_fraction: float = Field(0.1, ge=0, le=1)
    s3: S3Section = S3Section()
    synthesize: SynthesizeSection = SynthesizeSection()


class TrackingSection(Section):
    uri: str | None = Field(None, description="None uses MLFLOW_TRACKING_URI, else a local store ./mlruns")
    experiment: str = "t2i_dist"
    sample_prompts: list[str] = [
        "a red circle",
        "a small blue square on the left",
        "a large green triangle at the top",
        "a yellow circle at the bottom right",
    ]
    samples_per_prompt: int = Field(2, ge=1)


class EvalSection(Section):
    every: int = Field(0, ge=0, description="in-training FID every N steps; 0 disables")
    num_samples: int = Field(64, ge=2)
    captions: str | None = Field(None, description="caption/image shards; None uses data.urls")
    inception_path: str | None = None
    reference_cache: str | None = None
    resolution: int | None = Field(None, ge=8, description="None uses data.resolution")
    resize: Literal["clean", "legacy_tf"] = Field("clean", description="resize to 299 px before Inception")
    inception_head_path: str | None = Field(None, description="full Inception weights with the classifier (IS)")
    clip: ClipConfig | None = Field(None, description="CLIP for CLIP score; needs pretrained weights")
    alignment_classifier: str | None = Field(None, description="None trains one on first use (synthetic data)")


class Config(Section):
    """The root schema's sections; `model` is narrowed to the registered families' union by the registry."""

    run: RunSection = RunSection()
    cluster: ClusterSection = ClusterSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    optim: OptimSection = OptimSection()
    data: DataSection
    tracking: TrackingSection = TrackingSection()
    eval: EvalSection = EvalSection()
    model: FamilyConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.cluster.backend == "nccl" and not self.cluster.use_gpu:
            raise ValueError("cluster.backend=nccl needs cluster.use_gpu=true; use gloo (or auto) on CPUs")
        if self.cluster.use_gpu and self.cluster.gpus_per_worker != 1:
            raise ValueError(
                f"cluster.use_gpu=true needs cluster.gpus_per_worker=1 (got {self.cluster.gpus_per_worker:g}): each "
                "worker trains on one whole GPU (NCCL cannot put two ranks on one GPU, and one worker drives one "
                "device); set cluster.gpus_per_worker=1 and cluster.num_workers to the number of GPUs"
            )
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        self.model.check_compatible(self)
        return self

    @property
    def global_batch_size(self) -> int:
        d = self.deepspeed
        return d.micro_batch_size * d.grad_accum_steps * self.cluster.num_workers

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def revalidated(self, raw: dict[str, Any]) -> Config:
        """A changed copy of this config, validated by the same (registry-assembled) schema."""
        return type(self).model_validate(raw)

    def with_random_weights(self) -> Config:
        """The same architectures with every `model.*.pretrained` dropped: counting and benchmarking offline."""
        raw = self.to_dict()
        for part in raw["model"].values():
            if isinstance(part, dict) and "pretrained" in part:
                part["pretrained"] = None
        return self.revalidated(raw)


ConfigT = TypeVar("ConfigT", bound=Config)


# ---------------------------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("t2i_dist.configs").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    shipped = resources.files("t2i_dist.configs") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            f"unknown config {name_or_path!r}: pass a YAML path or one of the shipped configs: "
            + ", ".join(shipped_configs())
        )
    return Path(str(shipped))


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """YAML with an optional `base: NAME|PATH` key, merged underneath (so study configs extend tiny ones)."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return deep_merge(_load_yaml(resolve_config_path(base), (*seen, path)), raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so 3, true, [1,2] and null work)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else ""
    return raw


def load_raw_config(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML (with its `base:` chain) and the overrides, merged but not yet validated."""
    return apply_overrides(_load_yaml(resolve_config_path(name_or_path)), overrides or [])


def validate(schema: type[ConfigT], families: dict[str, type[FamilyConfig]], raw: dict[str, Any]) -> ConfigT:
    """Validate `raw` against a root schema whose `model` is the union of `families` (name -> config class)."""
    model = raw.get("model")
    family = model.get("family") if isinstance(model, dict) else None
    if isinstance(model, dict) and family not in families:
        known = ", ".join(sorted(families))
        raise ConfigError(f"invalid config:\n  unknown model.family {family!r}; registered families: {known}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw, families)) from None


def _allowed_keys(loc: tuple[Any, ...], raw: dict[str, Any], families: dict[str, type[FamilyConfig]]) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            # inside a dict, or a key of the model union's member: pick the member named by 'family'
            return []
        annotation = field.annotation
        if part == "model":
            family = raw.get("model", {}).get("family") if isinstance(raw.get("model"), dict) else None
            annotation = families.get(family) if isinstance(family, str) else None
        model = annotation
        if model is None or not hasattr(model, "model_fields"):
            return []
    return sorted(model.model_fields)


def format_validation_error(exc: ValidationError, raw: dict[str, Any], families: dict[str, type[FamilyConfig]]) -> str:
    lines = []
    for err in exc.errors():
        # the discriminated union inserts the family's tag into the location: drop it
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in families))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc, raw, families)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?)"
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = f"missing required key '{key}'"
        else:
            got = err.get("input")
            shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
            msg = f"bad value for '{key}': {err['msg']} (got {shown})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


# `scheme://user:password@` in any string value (tracking URIs, S3 endpoints)
URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?P<userinfo>[^/@\s]+)@")


def without_url_credentials(obj: Any) -> Any:
    """Every string with `scheme://user:password@host` gets `scheme://***@host` (recursively in dicts and lists)."""
    if isinstance(obj, str):
        return URL_USERINFO.sub(r"\g<scheme>***@", obj)
    if isinstance(obj, dict):
        return {k: without_url_credentials(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_url_credentials(v) for v in obj]
    return obj


def redact(obj: Any) -> Any:
    """Drop values whose key looks secret, so configs can be logged anywhere."""
    secret_words = ("secret", "password", "token", "access_key", "credential", "api_key")
    if isinstance(obj, dict):
        return {
            k: ("***" if any(w in str(k).lower() for w in secret_words) and v else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
