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

from t2i_dist.config import Config, ConfigError, DataSection, redact
from t2i_dist.data.errors import DataError
from t2i_dist.eval.fanout import split_contiguous
from t2i_dist.launch import TrainingError
from t2i_dist.models.ldm.latents import (  # noqa: F401 - re-exported: the tool's own record and checks
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    check_latent_config,
    check_latent_model,
    config_identity,
    encoder_record,
    weights_digest,
)
from t2i_dist.models.registry import family, load_config, validate_config

log = logging.getLogger(__name__)

STORED_DTYPE = "float16"
LatentKind = Literal["mean", "sample"]


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
    from t2i_dist.models.ldm.plugin import LDMPlugin

    torch.manual_seed(cfg.run.seed)
    return LDMPlugin(cfg, torch.device("cpu"))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _encode(
    plugin: Any, images: torch.Tensor, captions: list[str], latent: LatentKind, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
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
        assert decoded.image is not None  # decoded as "images"
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

    from t2i_dist.storage import register_gopen

    torch.set_num_threads(job.threads)
    cfg = validate_config(job.config)
    register_gopen(cfg.data.s3)
    plugin = build_encoders(cfg)
    written = 0
    skipped: Counter[str] = Counter()
    start = time.perf_counter()
    for index, url in job.shards:
        final = Path(job.out_dir) / f"shard-{index:06d}.tar"
        partial = final.with_suffix(".tar.tmp")
        generator = torch.Generator().manual_seed(zlib.crc32(f"{cfg.run.seed}/{index}".encode()))
        with open(partial, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=0) as sink:
            for keys, captions, images in image_batches(url, cfg.data.resolution, job.batch_size, skipped):
                z, hidden = _encode(plugin, images, captions, job.latent, generator)
                for key, caption, zi, hi in zip(keys, captions, z, hidden, strict=True):
                    sink.write(
                        {
                            "__key__": key,
                            "latent.npy": npy_bytes(zi),
                            "text.npy": npy_bytes(hi),
                            "txt": caption.encode(),
                        }
                    )
                written += len(keys)
        os.replace(partial, final)
    return {
        "samples": written,
        "skipped": dict(skipped),
        "seconds": time.perf_counter() - start,
        "record": encoder_record(plugin),
    }


def run_jobs(jobs: list[EncodeJob], workers: int, address: str | None) -> list[dict[str, Any]]:
    """workers == 0 encodes in this process; otherwise one Ray task per job."""
    if workers == 0:
        return [encode_shards(job) for job in jobs]
    import ray

    from t2i_dist.ray_env import forwarded_env

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
        raise ConfigError(
            f"config {cfg.run.name!r} reads latent shards (data.format=latents): give the image "
            "shards to encode with --images"
        )
    update: dict[str, Any] = {"format": "images"}
    if images is not None:
        # an explicit source must exist: synthesising into it would surprise
        update.update(urls=images, synthesize=cfg.data.synthesize.model_copy(update={"enabled": False}))
    return cfg.data.model_copy(update=update)


def output_dir(cfg: Config, out: str | None) -> Path:
    if out is None:
        urls = cfg.data.urls
        if cfg.data.format != "latents" or not isinstance(urls, str) or "://" in urls or any(c in urls for c in "*?[{"):
            raise ConfigError(
                "give --out DIR (only a latents config whose data.urls is one local directory names its own output)"
            )
        out = urls
    if "://" in out and not out.startswith("file://"):
        raise ConfigError(
            f"--out {out}: write latent shards to a local (or shared) directory, then upload it; "
            "a remote rename would not be atomic"
        )
    path = Path(out.removeprefix("file://"))
    from t2i_dist.data.writing import existing_shards

    if existing_shards(path) or (path / MANIFEST_NAME).exists():
        raise FileExistsError(f"{path} already holds shards; remove it or choose another --out")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose another --out")
    return path


def build_manifest(
    cfg: Config, source: list[str], out: Path, latent: LatentKind, results: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    records = {json.dumps(r["record"], sort_keys=True) for r in results}
    if len(records) != 1:
        raise RuntimeError(
            f"encoding tasks built different frozen encoders ({sorted(records)}); random weights "
            "must come from the same seed and library versions on every machine"
        )
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


def check_trains_on_latents(cfg: Config) -> None:
    """Before any output directory is named or any shard read: only a family that trains on latents."""
    if not family(cfg.model.family).trains_on_latents:
        raise ConfigError(
            f"config {cfg.run.name!r} is a {cfg.model.family} config, which trains on images: "
            "precompute encodes latents for a latent diffusion config (e.g. ldm-tiny)"
        )


def precompute(
    cfg: Config,
    out: Path,
    images: str | list[str] | None = None,
    workers: int = 2,
    batch_size: int = 32,
    latent: LatentKind = "mean",
    threads: int = 1,
    address: str | None = None,
) -> dict[str, Any]:
    """Encode the image shards of `images` (default: the config's data.urls) into `out`; returns the manifest."""
    from t2i_dist.data.sources import preflight

    check_trains_on_latents(cfg)
    shards = preflight(source_section(cfg, images))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        start = time.perf_counter()
        pairs = list(enumerate(shards))
        parts = max(1, min(workers, len(pairs)))
        config = cfg.to_dict()
        jobs = [
            EncodeJob(config, chunk, str(tmp), batch_size, latent, threads)
            for chunk in split_contiguous(pairs, parts)
            if chunk
        ]
        results = run_jobs(jobs, workers, address or cfg.cluster.address)
        seconds = time.perf_counter() - start
        if not sum(r["samples"] for r in results):
            raise DataError(
                f"no usable image in {len(shards)} shard(s) (skipped: "
                f"{[r['skipped'] for r in results]}); check --images"
            )
        manifest = build_manifest(cfg, shards, out.resolve(), latent, results, seconds)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked in output_dir): replaced by the finished set
        os.rename(tmp, out)  # atomic: the directory appears complete, manifest included
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.precompute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ldm-tiny", help="ldm config whose VAE/text encoder encode the images")
    parser.add_argument(
        "--images",
        action="append",
        default=None,
        help="image shards to encode (path, directory, brace pattern, s3://); repeatable; "
        "default: the config's data.urls",
    )
    parser.add_argument(
        "--out", default=None, help="new local directory for the latent shards (default: data.urls of a latents config)"
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks (0: encode in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--latent",
        choices=["mean", "sample"],
        default="mean",
        help="store the posterior mean (default) or one posterior sample, times the scaling factor",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.resolution=64")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.threads < 1 or args.batch_size < 1:
        parser.error("--workers must be >= 0, --threads and --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_trains_on_latents(cfg)
        out = output_dir(cfg, args.out)
        images = args.images[0] if args.images and len(args.images) == 1 else args.images
        from t2i_dist.components import resolve_components
        from t2i_dist.train import run_training

        cfg = resolve_components(cfg, run_training)  # encode with the trained parts, as training will
        manifest = precompute(cfg, out, images, args.workers, args.batch_size, args.latent, args.threads)
    except (ConfigError, DataError, FileExistsError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = manifest["samples"] / max(manifest["seconds"], 1e-9)
    print(
        f"[t2i_dist] encoded {manifest['samples']} samples from {len(manifest['source'])} shard(s) into {out} "
        f"in {manifest['seconds']:.1f}s ({rate:.1f} samples/s; skipped {manifest['skipped'] or 'none'}); "
        f"latent {manifest['latent']} {manifest['latent_shape']}, text {manifest['text_shape']}, {STORED_DTYPE}"
    )
    print(
        f"[t2i_dist] train with: python -m t2i_dist.train --config {args.config} data.format=latents "
        f"data.urls={out} data.synthesize.enabled=false"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
