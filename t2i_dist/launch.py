"""Driver side of a training run: checks that fail fast, Ray connection, the TorchTrainer and the MLflow run."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from t2i_dist.config import Config, flatten, redact
from t2i_dist.tracking import create_run, resolve_tracking_uri

log = logging.getLogger("t2i_dist.launch")

# on a busy machine importing torch/deepspeed in fresh workers can exceed Ray Train's 60 s default
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# worker prints are our step lines; Ray's print patch would echo each one twice
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

# environment the workers need when the driver joins a remote cluster (their raylet's env is not ours)
FORWARDED_ENV_PREFIXES = ("AWS_", "MLFLOW_", "T2I_", "HF_", "S3_")


def storage_uri(cfg: Config) -> str:
    path = cfg.cluster.storage_path
    return path if "://" in path else str(Path(path).resolve())


def check_storage(cfg: Config) -> None:
    uri = storage_uri(cfg)
    if uri.startswith("s3://"):
        from t2i_dist.data.s3 import filesystem

        bucket = urlparse(uri).netloc
        fs, _ = filesystem(uri, cfg.data.s3)
        try:
            fs.ls(bucket)
        except Exception as exc:  # noqa: BLE001 - turned into one clear message
            raise SystemExit(
                f"cluster.storage_path={uri}: bucket {bucket!r} is not reachable ({type(exc).__name__}: {exc}); "
                "create it or fix AWS_ENDPOINT_URL / credentials") from None
    elif "://" not in uri:
        try:
            Path(uri).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"cluster.storage_path={uri} is not writable: {exc}") from None


def tracking_reachable(uri: str, timeout_s: float = 3.0) -> bool:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def start_tracking(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Create (or, for a relaunch of the same run, reuse) the MLflow run. Never fatal."""
    uri = resolve_tracking_uri(cfg.tracking.uri)
    info: dict[str, Any] = {"tracking_uri": uri, "fallback_dir": str(Path("runs", cfg.run.name).resolve())}
    previous = _read_run_info(run_dir, cfg)
    if previous and previous.get("tracking_uri") == uri:
        info["mlflow_run_id"] = previous["mlflow_run_id"]
        print(f"[t2i_dist] continuing MLflow run {info['mlflow_run_id']}")
        return info
    if not tracking_reachable(uri):
        fallback = Path("mlruns").resolve().as_uri()
        print(f"[t2i_dist] WARNING: MLflow at {uri} is unreachable; logging to the local store {fallback}")
        uri = info["tracking_uri"] = fallback
    params = flatten(redact(cfg.to_dict()))
    params["global_batch_size"] = cfg.global_batch_size
    tags = {"t2i_dist.family": cfg.model.family, "t2i_dist.run_name": cfg.run.name}
    try:
        info["mlflow_run_id"] = create_run(uri, cfg.tracking.experiment, cfg.run.name, params, tags,
                                           yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        print(f"[t2i_dist] WARNING: could not create an MLflow run ({type(exc).__name__}); training untracked")
        return info
    _write_run_info(run_dir, info, cfg)
    return info


def _run_info_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/t2i_run.json"


def _read_run_info(run_dir: str, cfg: Config) -> dict[str, Any] | None:
    from t2i_dist.data.s3 import filesystem

    fs, path = filesystem(_run_info_path(run_dir), cfg.data.s3)
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_run_info(run_dir: str, info: dict[str, Any], cfg: Config) -> None:
    from t2i_dist.data.s3 import filesystem

    fs, path = filesystem(_run_info_path(run_dir), cfg.data.s3)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump({k: info[k] for k in ("tracking_uri", "mlflow_run_id")}, fh)


def connect_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
    ray.init(num_cpus=max(int(needed), os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.WARNING)


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def ray_storage_filesystem(uri: str, cfg: Config):
    """A pyarrow view of the fsspec filesystem the data pipeline uses (same endpoint and retries). Ray ships
    it to its controller process, which does not share the driver's environment, so the driver's resolved
    credentials travel inside it (pickled into Ray's object store, never logged)."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from t2i_dist.data.s3 import storage_options

    options = storage_options(uri, cfg.data.s3)
    if uri.startswith(("s3://", "s3a://")) and not cfg.data.s3.anon:
        import botocore.session

        credentials = botocore.session.get_session().get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return PyFileSystem(FSSpecHandler(fs)), path


def build_trainer(cfg: Config, run_info: dict[str, Any], resume: str | None = None):
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from t2i_dist.engine.worker import train_worker

    c = cfg.cluster
    backend = c.backend if c.backend != "auto" else ("nccl" if c.use_gpu else "gloo")
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    env = {**forwarded_env(), "OMP_NUM_THREADS": str(c.threads_per_worker)}
    storage_path, storage_filesystem = storage_uri(cfg), None
    if "://" in storage_path:
        # the same fsspec filesystem (endpoint, credentials, retries) the data pipeline uses, for Ray too
        storage_filesystem, storage_path = ray_storage_filesystem(storage_path, cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_info": run_info},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
        resume_from_checkpoint=Checkpoint(resume) if resume else None,
    )
