"""python -m t2i_dist.train --config NAME|PATH [key.sub=value ...]

Validates everything it can on the driver (config, shards, storage, tracking) before any Ray worker starts,
then trains on a Ray cluster (joined through RAY_ADDRESS / cluster.address, else started locally). A config
whose frozen parts name a `train_config` (model.vae / model.text / model.clip) trains those first, each as a
run of its own, or reuses their exported weights when that config's run already finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from t2i_dist.config import Config, ConfigError, shipped_configs
from t2i_dist.launch import TrainingError, TrainResult
from t2i_dist.models.registry import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="ldm-shapes", help=f"shipped name ({', '.join(shipped_configs())}) or path")
    parser.add_argument("--resume", default=None, help="start from this checkpoint directory (local or s3://)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print parameter counts and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.zero_stage=3")
    return parser.parse_args(argv)


def _verified_resume(resume_arg: str | None, cfg: Config) -> str | None:
    if not resume_arg:
        return None
    # checked before an MLflow run is made: a refused start leaves nothing behind
    resume = resume_arg if "://" in resume_arg else os.path.abspath(resume_arg)
    from t2i_dist.engine.checkpoint import CheckpointError, verify_checkpoint_at

    try:
        verify_checkpoint_at(resume, cfg.data.s3)
    except CheckpointError as exc:
        raise TrainingError(f"--resume {resume_arg}: {exc}", 2) from None
    return resume


def check_inputs(cfg: Config) -> list[str]:
    """The shards this run reads, after the driver's checks of data and storage (TrainingError on bad input)."""
    from t2i_dist import launch
    from t2i_dist.data.shards import DataError, preflight

    try:
        shards = preflight(cfg.data)
    except DataError as exc:
        raise TrainingError(str(exc), 2) from None
    launch.check_storage(cfg)
    return shards


def run_training(cfg: Config, resume: str | None = None) -> TrainResult:
    """One training run on Ray: preflight, MLflow run, TorchTrainer.fit. Raises TrainingError."""
    from t2i_dist import launch, ray_env

    shards = check_inputs(cfg)
    cfg = launch.with_absolute_local_paths(cfg)
    print(
        f"[t2i_dist] {cfg.model.family} run '{cfg.run.name}': {len(shards)} shards, {cfg.cluster.num_workers} "
        f"workers, global batch {cfg.global_batch_size}, {cfg.run.max_steps} steps"
    )
    resume = _verified_resume(resume, cfg)
    run_dir = f"{launch.storage_uri(cfg).rstrip('/')}/{cfg.run.name}"
    run_info = launch.start_tracking(cfg, run_dir)
    # workers get the resolved list: their working directory is not the driver's
    run_info["shards"] = [s if "://" in s else os.path.abspath(s) for s in shards]
    run_info["run_dir"] = run_dir  # where a restarted worker group looks when Ray hands back no checkpoint
    if resume:
        run_info["resume"] = resume
    ray_env.connect_ray(cfg)
    trainer = launch.build_trainer(cfg, run_info)
    start = time.time()
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        text = str(root).strip()
        print(f"[t2i_dist] the last good checkpoint (if any) is under {run_dir}", file=sys.stderr)
        raise TrainingError(f"training failed: {text.splitlines()[-1] if text else repr(root)}", 1) from None
    elapsed = time.time() - start
    checkpoint = None
    if result.checkpoint:
        # remote storage hands back a path inside the bucket
        base = launch.storage_uri(cfg)
        checkpoint = result.checkpoint.path
        if "://" in base and "://" not in checkpoint:
            checkpoint = f"{base.split('://')[0]}://{checkpoint}"
    print(f"[t2i_dist] finished in {elapsed:.0f}s; last checkpoint: {checkpoint}")
    if run_info.get("mlflow_run_id"):
        _finalise_mlflow(run_info, checkpoint)
    metrics = dict(result.metrics or {})
    return TrainResult(checkpoint, run_dir, run_info, elapsed, {k: v for k, v in metrics.items() if _is_number(v)})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finalise_mlflow(run_info: dict[str, Any], checkpoint: str | None) -> None:
    from t2i_dist.tracking import client_for

    try:
        client = client_for(run_info["tracking_uri"])
        client.set_tag(run_info["mlflow_run_id"], "t2i_dist.checkpoint", str(checkpoint))
        client.set_terminated(run_info["mlflow_run_id"])
    except Exception as exc:  # noqa: BLE001
        print(f"[t2i_dist] WARNING: could not finalise the MLflow run ({type(exc).__name__})")
    uri = run_info["tracking_uri"]
    print(f"[t2i_dist] MLflow run {run_info['mlflow_run_id']} at {uri}")
    if uri.startswith(("file:", "sqlite:")):
        print(f"[t2i_dist] open the UI with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")


def train_with_components(cfg: Config, resume: str | None = None) -> TrainResult:
    """Stage 0 (the frozen parts the config asks to train, reused when already trained), then the run."""
    from t2i_dist.components import resolve_components

    # this run's own bad input is refused before stage 0 trains anything
    check_inputs(cfg)
    _verified_resume(resume, cfg)
    cfg = resolve_components(cfg, run_training)
    return run_training(cfg, resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from t2i_dist.params import print_parameter_counts

    if args.dry_run:
        print_parameter_counts(cfg)
        return 0
    try:
        result = train_with_components(cfg, args.resume)
    except (TrainingError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, TrainingError) else 2
    from t2i_dist.models.registry import family

    if result.checkpoint and family(cfg.model.family).generates_images:
        sample = f"python -m t2i_dist.sample --checkpoint {result.checkpoint}"
        print(f'[t2i_dist] sample with: {sample} --prompt "a red circle"')
    elif result.checkpoint:
        print(f"[t2i_dist] export with: python -m t2i_dist.export --checkpoint {result.checkpoint} --out DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
