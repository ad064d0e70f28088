"""Latent shards and the frozen encoders that made them: the record t2i_dist.precompute writes
(`precompute.json`) and the checks that refuse shards made by other weights or settings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from t2i_dist.config import Config, ConfigError, DataSection
from t2i_dist.data.errors import DataError

if TYPE_CHECKING:
    from t2i_dist.models.ldm.config import LDMConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "precompute.json"
MANIFEST_FORMAT = "t2i_dist.latents/1"


# ---------------------------------------------------------------------------------------------- manifest


def weights_digest(module: nn.Module) -> str:
    """sha1 of a module's state (names, dtypes, shapes, bytes): equal only for identical frozen weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def config_identity(cfg: Config) -> dict[str, Any]:
    """What, in a config, decides the latents and text states: compared between the record and a run."""
    m = cast("LDMConfig", cfg.model)  # callers checked the family
    identity = {
        "vae": m.vae.model_dump(mode="json"),
        "text": m.text.model_dump(mode="json"),
        "resolution": cfg.data.resolution,
    }
    if m.vae.pretrained is None or m.text.pretrained is None:
        # random frozen weights come from the run seed (the plug-in is built right after manual_seed(seed))
        identity["seed"] = cfg.run.seed
    return identity


def manifest_dirs(shards: list[str]) -> list[str]:
    return list(dict.fromkeys(url.rsplit("/", 1)[0] if "/" in url else "." for url in shards))


def read_manifest(directory: str, data: DataSection) -> dict[str, Any] | None:
    from t2i_dist.storage import filesystem

    url = f"{directory.rstrip('/')}/{MANIFEST_NAME}"
    fs, path = filesystem(url, data.s3)
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DataError(f"{url} is not valid JSON ({exc}); re-run python -m t2i_dist.precompute") from None


def _remake_hint(cfg: Config) -> str:
    return (
        f"re-encode the images for this config: python -m t2i_dist.precompute --config <this config> "
        f"--images <image shards> --out <new directory>, then point data.urls at it (run {cfg.run.name!r})"
    )


def _differences(recorded: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: shards {json.dumps(a)} vs config {json.dumps(b)}")
    return out


def check_latent_config(cfg: Config, shards: list[str] | None = None) -> list[dict[str, Any]]:
    """Refuse latent shards whose precompute.json does not match this config (no model is built).

    Returns the manifests read. Raises DataError naming the differences and how to re-encode."""
    if cfg.model.family != "ldm":
        raise ConfigError(f"data.format=latents is for the ldm family; {cfg.model.family} trains on images")
    if shards is None:
        from t2i_dist.data.sources import expand_urls

        shards = expand_urls(cfg.data.urls, cfg.data.s3)
    manifests = []
    wanted = config_identity(cfg)
    for directory in manifest_dirs(shards):
        manifest = read_manifest(directory, cfg.data)
        if manifest is None:
            raise DataError(
                f"data.format=latents but {directory} has no {MANIFEST_NAME}: these shards were not written by "
                f"t2i_dist.precompute, so nothing says which VAE and text encoder made them; {_remake_hint(cfg)}"
            )
        if manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(
                f"{directory}/{MANIFEST_NAME} has format {manifest.get('format')!r}, expected "
                f"{MANIFEST_FORMAT!r}; {_remake_hint(cfg)}"
            )
        diffs = _differences(manifest.get("identity", {}), wanted)
        if diffs:
            raise DataError(
                f"latent shards in {directory} do not match this run's model: "
                + "; ".join(diffs)
                + f". {_remake_hint(cfg)}"
            )
        manifests.append(manifest)
    return manifests


def shards_seen_here(cfg: Config) -> list[str] | None:
    """data.urls as this process can read them, or None when relative local paths do not resolve here: a Ray
    Train worker runs in a working directory of its own (the driver resolves the paths for the loader)."""
    from t2i_dist.data.sources import expand_urls
    from t2i_dist.storage import is_remote

    shards = expand_urls(cfg.data.urls, cfg.data.s3)
    local = [url.removeprefix("file://") for url in shards if not is_remote(url)]
    return shards if all(os.path.isfile(path) for path in local) else None


def check_latent_model(plugin: Any, batch_latents: torch.Tensor, batch_hidden: torch.Tensor | None) -> None:
    """What a training worker checks on its first latent batch (LDMPlugin.encode_batch): the batch's shapes
    against the model, and, where the shards can be found from this process, check_latent_config plus the
    frozen weights themselves, so random weights built from another seed, or another file behind the same
    name, are refused too."""
    cfg = plugin.cfg
    expected = [plugin.latent_channels, plugin.latent_size, plugin.latent_size]
    if list(batch_latents.shape[1:]) != expected:
        raise DataError(
            f"latent shards hold latents of shape {list(batch_latents.shape[1:])} but this model "
            f"works on {expected}; {_remake_hint(cfg)}"
        )
    if batch_hidden is None or batch_hidden.shape[-1] != plugin.text_encoder.width:
        got = None if batch_hidden is None else list(batch_hidden.shape[1:])
        raise DataError(
            f"latent shards hold text states of shape {got} but this model's text encoder has width "
            f"{plugin.text_encoder.width}; {_remake_hint(cfg)}"
        )
    shards = shards_seen_here(cfg)
    if shards is None:
        log.info(
            "data.urls %s does not resolve from %s; the shards' record is checked on the driver",
            cfg.data.urls,
            os.getcwd(),
        )
        return
    vae_sha1, text_sha1 = weights_digest(plugin.vae), weights_digest(plugin.text_encoder)
    for manifest in check_latent_config(cfg, shards):
        where = manifest.get("out", "the latent shards")
        if manifest.get("scaling_factor") != plugin.latent_scale:
            raise DataError(
                f"{where}: latents were scaled by {manifest.get('scaling_factor')} but this VAE uses "
                f"{plugin.latent_scale}; {_remake_hint(cfg)}"
            )
        if manifest.get("vae_sha1") != vae_sha1 or manifest.get("text_sha1") != text_sha1:
            which = [
                n
                for n, a, b in (
                    ("VAE", manifest.get("vae_sha1"), vae_sha1),
                    ("text encoder", manifest.get("text_sha1"), text_sha1),
                )
                if a != b
            ]
            raise DataError(
                f"{where}: the frozen {' and '.join(which)} weights differ from the ones that encoded "
                f"the shards (same names, other weights); {_remake_hint(cfg)}"
            )


def encoder_record(plugin: Any) -> dict[str, Any]:
    """What the frozen encoders of a plug-in produce: scale, shapes and weight digests."""
    size = plugin.latent_size
    return {
        "scaling_factor": plugin.latent_scale,
        "latent_shape": [plugin.latent_channels, size, size],
        "text_shape": list(plugin.text_encoder([""])["hidden"].shape[1:]),
        "vae_sha1": weights_digest(plugin.vae),
        "text_sha1": weights_digest(plugin.text_encoder),
    }
