"""python -m t2i_dist.precompute --config NAME|PATH [--images URLS] [--out DIR] [--workers K] [key=value ...]

Encodes image shards once with the latent diffusion model's frozen VAE and frozen text encoder, fanned out
over Ray tasks (a local Ray unless RAY_ADDRESS / cluster.address names a cluster), into new webdataset shards
the LDM then trains from with `data.format=latents` (see configs/ldm-tiny-latents.yaml):

    python -m t2i_dist.precompute --config ldm-tiny --out data/synthetic-latents
    python -m t2i_dist.train --config ldm-tiny-latents

Each output sample holds `latent.npy` (float16, C x h x w: the posterior *mean* times the VAE scaling factor
by default, the common precompute choice; `--latent sample` stores one posterior draw instead -- online
encoding draws a fresh one every epoch, which neither choice reproduces), `text.npy` (float16 token states,
L x width, read back as Batch.text["hidden"]) and `txt` (the caption, so caption dropout and logging still
work). Input shard i becomes output shard i; samples keep their keys and order. The set is written to a
temporary sibling directory and renamed into place at the end, with `precompute.json` beside the shards
recording the VAE, text model, resolution and a digest of the frozen weights that produced it. The LDM
refuses latent shards whose record does not match its own config (`check_latent_config`, `check_latent_model`).
The output directory must be local (a shared filesystem when tasks run on several machines); upload the
finished directory to S3 afterwards if the run reads from there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from t2i_dist.config import Config, ConfigError, DataSection, load_config, redact
from t2i_dist.data.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_NAME = "precompute.json"
MANIFEST_FORMAT = "t2i_dist.latents/1"
STORED_DTYPE = "float16"
LatentKind = Literal["mean", "sample"]


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
    m = cfg.model
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
    from t2i_dist.data.s3 import filesystem

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
    return (f"re-encode the images for this config: python -m t2i_dist.precompute --config <this config> "
            f"--images <image shards> --out <new directory>, then point data.urls at it (run {cfg.run.name!r})")


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
                f"t2i_dist.precompute, so nothing says which VAE and text encoder made them; {_remake_hint(cfg)}")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{directory}/{MANIFEST_NAME} has format {manifest.get('format')!r}, expected "
                            f"{MANIFEST_FORMAT!r}; {_remake_hint(cfg)}")
        diffs = _differences(manifest.get("identity", {}), wanted)
        if diffs:
            raise DataError(f"latent shards in {directory} do not match this run's model: " + "; ".join(diffs)
                            + f". {_remake_hint(cfg)}")
        manifests.append(manifest)
    return manifests


def shards_seen_here(cfg: Config) -> list[str] | None:
    """data.urls as this process can read them, or None when relative local paths do not resolve here: a Ray
    Train worker runs in a working directory of its own (the driver resolves the paths for the loader)."""
    from t2i_dist.data.s3 import is_remote
    from t2i_dist.data.sources import expand_urls

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
        raise DataError(f"latent shards hold latents of shape {list(batch_latents.shape[1:])} but this model "
                        f"works on {expected}; {_remake_hint(cfg)}")
    if batch_hidden is None or batch_hidden.shape[-1] != plugin.text_encoder.width:
        got = None if batch_hidden is None else list(batch_hidden.shape[1:])
        raise DataError(f"latent shards hold text states of shape {got} but this model's text encoder has width "
                        f"{plugin.text_encoder.width}; {_remake_hint(cfg)}")
    shards = shards_seen_here(cfg)
    if shards is None:
        log.info("data.urls %s does not resolve from %s; the shards' record is checked on the driver",
                 cfg.data.urls, os.getcwd())
        return
    vae_sha1, text_sha1 = weights_digest(plugin.vae), weights_digest(plugin.text_encoder)
    for manifest in check_latent_config(cfg, shards):
        where = manifest.get("out", "the latent shards")
        if manifest.get("scaling_factor") != plugin.latent_scale:
            raise DataError(f"{where}: latents were scaled by {manifest.get('scaling_factor')} but this VAE uses "
                            f"{plugin.latent_scale}; {_remake_hint(cfg)}")
        if manifest.get("vae_sha1") != vae_sha1 or manifest.get("text_sha1") != text_sha1:
            which = [n for n, a, b in (("VAE", manifest.get("vae_sha1"), vae_sha1),
                                       ("text encoder", manifest.get("text_sha1"), text_sha1)) if a != b]
            raise DataError(f"{where}: the frozen {' and '.join(which)} weights differ from the ones that encoded "
                            f"the shards (same names, other weights); {_remake_hint(cfg)}")


# ---------------------------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class EncodeJob:
    """One task's share: (output index, input URL) pairs. Plain data: it travels to Ray workers."""

    config: dict[str, Any]
    shards: list[tuple[int, str]]
    out_dir: str
    batch_size: int
    latent: LatentKind
    threads: int


def build_encoders(cfg: Config):
    """The LDM plug-in built exactly as a training worker builds it (manual_seed(run.seed) first), so random
    frozen weights are the ones training will use."""
    from t2i_dist.models.ldm import LDMPlugin

    torch.manual_seed(cfg.run.seed)
    return LDMPlugin(cfg, torch.device("cpu"))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _encode(plugin: Any, images: torch.Tensor, captions: list[str], latent: LatentKind,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        posterior = plugin.vae.encode(images).latent_dist
        z = posterior.mean if latent == "mean" else posterior.sample(generator)
        z = (z * plugin.latent_scale).numpy().astype(STORED_DTYPE)
        hidden = plugin.text_encoder(captions)["hidden"].numpy().astype(STORED_DTYPE)
    if not (np.isfinite(z).all() and np.isfinite(hidden).all()):
        raise ValueError("latents or text states overflow float16; this VAE/text encoder needs float32 storage")
    return z, hidden


def image_batches(url: str, resolution: int, batch_size: int, skipped: Counter):
    """(keys, captions, images) batches of one image shard, in shard order; unusable samples are counted."""
    from t2i_dist.data.decode import MAX_IMAGE_PIXELS, SkipSample, decode_sample
    from t2i_dist.data.stream import ERROR_KEY, shard_items

    pending: list[tuple[str, str, torch.Tensor]] = []
    for item in shard_items(url):
        try:
            if ERROR_KEY in item:
                raise SkipSample(item[ERROR_KEY])
            decoded = decode_sample(item, "images", resolution, MAX_IMAGE_PIXELS)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        pending.append((item["__key__"], decoded.caption, decoded.image))
        if len(pending) == batch_size:
            yield [p[0] for p in pending], [p[1] for p in pending], torch.stack([p[2] for p in pending])
            pending = []
    if pending:
        yield [p[0] for p in pending], [p[1] for p in pending], torch.stack([p[2] for p in pending])


def encode_shards(job: EncodeJob) -> dict[str, Any]:
    """Encode this job's shards into out_dir/shard-%06d.tar (each written as .tmp, then renamed); returns counts
    and the record of what encoded them."""
    import webdataset as wds

    from t2i_dist.config import validate_config
    from t2i_dist.data.s3 import register_gopen

    torch.set_num_threads(job.threads)
    cfg = validate_config(job.config)
    register_gopen(cfg.data.s3)
    plugin = build_encoders(cfg)
    written, skipped = 0, Counter()
    start = time.perf_counter()
    for index, url in job.shards:
        final = Path(job.out_dir) / f"shard-{index:06d}.tar"
        partial = final.with_suffix(".tar.tmp")
        generator = torch.Generator().manual_seed(zlib.crc32(f"{cfg.run.seed}/{index}".encode()))
        with open(partial, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=0) as sink:
            for keys, captions, images in image_batches(url, cfg.data.resolution, job.batch_size, skipped):
                z, hidden = _encode(plugin, images, captions, job.latent, generator)
                for key, caption, zi, hi in zip(keys, captions, z, hidden, strict=True):
                    sink.write({"__key__": key, "latent.npy": npy_bytes(zi), "text.npy": npy_bytes(hi),
                                "txt": caption.encode()})
                written += len(keys)
        os.replace(partial, final)
    return {"samples": written, "skipped": dict(skipped), "seconds": time.perf_counter() - start,
            "record": encoder_record(plugin)}


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


def split_contiguous(items: list[Any], parts: int) -> list[list[Any]]:
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]


def run_jobs(jobs: list[EncodeJob], workers: int, address: str | None) -> list[dict[str, Any]]:
    """workers == 0 encodes in this process; otherwise one Ray task per job."""
    if workers == 0:
        return [encode_shards(job) for job in jobs]
    import ray

    from t2i_dist.launch import forwarded_env

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"env_vars": forwarded_env()})
        else:
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False)
            started = True
    try:
        task = ray.remote(num_cpus=jobs[0].threads, max_retries=1)(encode_shards)
        return ray.get([task.remote(job) for job in jobs])
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- driver

def source_section(cfg: Config, images: str | list[str] | None) -> DataSection:
    if images is None and cfg.data.format != "images":
        raise ConfigError(f"config {cfg.run.name!r} reads latent shards (data.format=latents): give the image "
                          "shards to encode with --images")
    update: dict[str, Any] = {"format": "images"}
    if images is not None:
        # an explicit source must exist: synthesising into it would surprise
        update.update(urls=images, synthesize=cfg.data.synthesize.model_copy(update={"enabled": False}))
    return cfg.data.model_copy(update=update)


def output_dir(cfg: Config, out: str | None) -> Path:
    if out is None:
        urls = cfg.data.urls
        if cfg.data.format != "latents" or not isinstance(urls, str) or "://" in urls or any(c in urls for c in "*?[{"):
            raise ConfigError("give --out DIR (only a latents config whose data.urls is one local directory "
                              "names its own output)")
        out = urls
    if "://" in out and not out.startswith("file://"):
        raise ConfigError(f"--out {out}: write latent shards to a local (or shared) directory, then upload it; "
                          "a remote rename would not be atomic")
    path = Path(out.removeprefix("file://"))
    from t2i_dist.data.writing import existing_shards

    if existing_shards(path) or (path / MANIFEST_NAME).exists():
        raise FileExistsError(f"{path} already holds shards; remove it or choose another --out")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose another --out")
    return path


def build_manifest(cfg: Config, source: list[str], out: Path, latent: LatentKind,
                   results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    records = {json.dumps(r["record"], sort_keys=True) for r in results}
    if len(records) != 1:
        raise RuntimeError(f"encoding tasks built different frozen encoders ({sorted(records)}); random weights "
                           "must come from the same seed and library versions on every machine")
    skipped: Counter = Counter()
    for r in results:
        skipped.update(r["skipped"])
    return {
        "format": MANIFEST_FORMAT,
        "identity": config_identity(cfg),
        "latent": latent,
        "dtype": STORED_DTYPE,
        **results[0]["record"],
        "samples": sum(r["samples"] for r in results),
        "skipped": dict(skipped),
        "source": source,
        "out": str(out),
        "seconds": round(seconds, 3),  # wall time, start-up (imports, model builds) included
        "encode_seconds": round(sum(r["seconds"] for r in results), 3),  # summed over tasks, encoding loops only
        "model": redact(cfg.model.model_dump(mode="json")),
    }


def precompute(cfg: Config, out: Path, images: str | list[str] | None = None, workers: int = 2,
               batch_size: int = 32, latent: LatentKind = "mean", threads: int = 1,
               address: str | None = None) -> dict[str, Any]:
    """Encode the image shards of `images` (default: the config's data.urls) into `out`; returns the manifest."""
    from t2i_dist.data.sources import preflight

    if cfg.model.family != "ldm":
        raise ConfigError(f"precompute encodes for the ldm family; config {cfg.run.name!r} is {cfg.model.family}")
    shards = preflight(source_section(cfg, images))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        start = time.perf_counter()
        pairs = list(enumerate(shards))
        parts = max(1, min(workers, len(pairs)))
        config = cfg.to_dict()
        jobs = [EncodeJob(config, chunk, str(tmp), batch_size, latent, threads)
                for chunk in split_contiguous(pairs, parts)]
        results = run_jobs(jobs, workers, address or cfg.cluster.address)
        seconds = time.perf_counter() - start
        if not sum(r["samples"] for r in results):
            raise DataError(f"no usable image in {len(shards)} shard(s) (skipped: "
                            f"{[r['skipped'] for r in results]}); check --images")
        manifest = build_manifest(cfg, shards, out.resolve(), latent, results, seconds)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked in output_dir): replaced by the finished set
        os.rename(tmp, out)  # atomic: the directory appears complete, manifest included
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m t2i_dist.precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ldm-tiny", help="ldm config whose VAE/text encoder encode the images")
    parser.add_argument("--images", action="append", default=None,
                        help="image shards to encode (path, directory, brace pattern, s3://); repeatable; "
                             "default: the config's data.urls")
    parser.add_argument("--out", default=None, help="new local directory for the latent shards (default: "
                                                    "data.urls of a latents config)")
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks (0: encode in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latent", choices=["mean", "sample"], default="mean",
                        help="store the posterior mean (default) or one posterior sample, times the scaling factor")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.resolution=64")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.threads < 1 or args.batch_size < 1:
        parser.error("--workers must be >= 0, --threads and --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = output_dir(cfg, args.out)
        images = args.images[0] if args.images and len(args.images) == 1 else args.images
        manifest = precompute(cfg, out, images, args.workers, args.batch_size, args.latent, args.threads)
    except (ConfigError, DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = manifest["samples"] / max(manifest["seconds"], 1e-9)
    print(f"[t2i_dist] encoded {manifest['samples']} samples from {len(manifest['source'])} shard(s) into {out} "
          f"in {manifest['seconds']:.1f}s ({rate:.1f} samples/s; skipped {manifest['skipped'] or 'none'}); "
          f"latent {manifest['latent']} {manifest['latent_shape']}, text {manifest['text_shape']}, {STORED_DTYPE}")
    print(f"[t2i_dist] train with: python -m t2i_dist.train --config {args.config} data.format=latents "
          f"data.urls={out} data.synthesize.enabled=false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
