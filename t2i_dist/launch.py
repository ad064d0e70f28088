"""Driver side of a training run: checks that fail fast, Ray connection, the TorchTrainer and the MLflow run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from t2i_dist.config import Config, flatten, redact, without_url_credentials
from t2i_dist.dist import backend_for
from t2i_dist.ray_env import forwarded_env, forwarded_secrets
from t2i_dist.tracking import create_run, local_store_uri, resolve_tracking_uri

log = logging.getLogger("t2i_dist.launch")

# on a busy machine importing torch/deepspeed in fresh workers can exceed Ray Train's 60 s default
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# worker prints are our step lines; Ray's print patch would echo each one twice
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

PREEMPTION_REQUEST_FILE = "preemption_request"


def storage_uri(cfg: Config) -> str:
    path = cfg.cluster.storage_path
    return path if "://" in path else str(Path(path).resolve())


def with_absolute_local_paths(cfg: Config) -> Config:
    """Workers run in other directories: relative local data paths are made absolute on the driver."""

    def absolute(url: str) -> str:
        return url if "://" in url or os.path.isabs(url) else os.path.abspath(url)

    raw = cfg.to_dict()
    urls = raw["data"]["urls"]
    raw["data"]["urls"] = [absolute(u) for u in urls] if isinstance(urls, list) else absolute(urls)
    if raw["eval"].get("captions"):
        raw["eval"]["captions"] = absolute(raw["eval"]["captions"])
    return cfg.revalidated(raw)


def check_storage(cfg: Config) -> None:
    uri = storage_uri(cfg)
    if uri.startswith("s3://"):
        from t2i_dist.storage import filesystem

        bucket = urlparse(uri).netloc
        fs, _ = filesystem(uri, cfg.data.s3)
        try:
            fs.ls(bucket)
        except Exception as exc:  # noqa: BLE001 - turned into one clear message
            raise SystemExit(
                f"cluster.storage_path={uri}: bucket {bucket!r} is not reachable ({type(exc).__name__}: {exc}); "
                "create it or fix AWS_ENDPOINT_URL / credentials"
            ) from None
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


def loggable_config(cfg: Config) -> dict[str, Any]:
    """The resolved config without secrets: secret-looking keys and credentials inside URLs are masked."""
    return without_url_credentials(redact(cfg.to_dict()))


def move_credentials_to_env(uri: str) -> str:
    """A tracking URI with user:password@ becomes the bare URI plus MLFLOW_TRACKING_USERNAME/PASSWORD, which
    MLflow reads itself: the URI is then safe to print, store in run files and hand to workers."""
    parsed = urlparse(uri)
    if not parsed.username and not parsed.password:
        return uri
    if parsed.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parsed.username)
    if parsed.password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parsed.password)
    return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[1]).geturl()


def start_tracking(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Create (or, for a relaunch of the same run, reuse) the MLflow run. Never fatal."""
    uri = move_credentials_to_env(resolve_tracking_uri(cfg.tracking.uri))
    info: dict[str, Any] = {"tracking_uri": uri, "fallback_dir": str(Path("runs", cfg.run.name).resolve())}
    previous = _read_run_info(run_dir, cfg)
    if previous and previous.get("tracking_uri") == uri:
        info["mlflow_run_id"] = previous["mlflow_run_id"]
        print(f"[t2i_dist] continuing MLflow run {info['mlflow_run_id']}")
        return info
    if not tracking_reachable(uri):
        fallback = local_store_uri()
        print(f"[t2i_dist] WARNING: MLflow at {uri} is unreachable; logging to the local store {fallback}")
        uri = info["tracking_uri"] = fallback
    params = flatten(loggable_config(cfg))
    params["global_batch_size"] = cfg.global_batch_size
    tags = {"t2i_dist.family": cfg.model.family, "t2i_dist.run_name": cfg.run.name}
    try:
        info["mlflow_run_id"] = create_run(
            uri,
            cfg.tracking.experiment,
            cfg.run.name,
            params,
            tags,
            yaml.safe_dump(loggable_config(cfg), sort_keys=False),
        )
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        print(f"[t2i_dist] WARNING: could not create an MLflow run ({type(exc).__name__}); training untracked")
        return info
    _write_run_info(run_dir, info, cfg)
    return info


def _run_info_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/t2i_run.json"


def _read_run_info(run_dir: str, cfg: Config) -> dict[str, Any] | None:
    from t2i_dist.storage import filesystem

    fs, path = filesystem(_run_info_path(run_dir), cfg.data.s3)
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_run_info(run_dir: str, info: dict[str, Any], cfg: Config) -> None:
    from t2i_dist.storage import filesystem

    fs, path = filesystem(_run_info_path(run_dir), cfg.data.s3)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump({k: info[k] for k in ("tracking_uri", "mlflow_run_id")}, fh)


def ray_storage_filesystem(uri: str, cfg: Config):
    """A pyarrow view of the fsspec filesystem the data pipeline uses (same endpoint and retries). Ray ships
    it to its controller process, which does not share the driver's environment, so the driver's resolved
    credentials travel inside it (pickled into Ray's object store, never logged)."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from t2i_dist.storage import storage_options

    options = storage_options(uri, cfg.data.s3)
    if uri.startswith(("s3://", "s3a://")) and not cfg.data.s3.anon:
        import botocore.session

        credentials = botocore.session.get_session().get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return PyFileSystem(FSSpecHandler(fs)), path


def build_trainer(cfg: Config, run_info: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from t2i_dist.engine.ray_worker import train_worker

    c = cfg.cluster
    backend = backend_for(c.backend, c.use_gpu)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    env = {**forwarded_env(), "OMP_NUM_THREADS": str(c.threads_per_worker)}
    storage_path, storage_filesystem = storage_uri(cfg), None
    if "://" in storage_path:
        # the same fsspec filesystem (endpoint, credentials, retries) the data pipeline uses, for Ray too
        storage_filesystem, storage_path = ray_storage_filesystem(storage_path, cfg)
    request = f"{storage_uri(cfg).rstrip('/')}/{cfg.run.name}/{PREEMPTION_REQUEST_FILE}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": without_url_credentials(cfg.to_dict()),
            "secret_env": forwarded_secrets(),
            "run_info": {**run_info, "preemption_request": request},
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        # ray.train exports Train v2's RunConfig at runtime; type checkers see the v1 one (no worker_runtime_env)
        run_config=RunConfig(  # type: ignore[call-arg]
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return PreemptibleTrainer(trainer, request, cfg, run_info)


class PreemptibleTrainer:
    """TorchTrainer.fit plus the driver's part of fault handling.

    SIGTERM (what Kubernetes sends the driver's pod, and Slurm every process of a job) writes a request file
    into the run directory, which every worker group polls: the workers checkpoint at the end of their
    current step and return, so fit returns normally and the next launch resumes. A worker that gets SIGTERM
    itself does the same. If the workers have not stopped within run.preemption_grace_s the driver stops
    (with the last checkpoint kept). Tracking records that could not be sent are reported at the end."""

    def __init__(self, trainer: Any, request_url: str, cfg: Config, run_info: dict[str, Any]):
        self.trainer = trainer
        self.request_url = request_url
        self.cfg = cfg
        self.run_info = run_info
        self.preempted = False
        self.stopped_by_signal: int | None = None  # the driver stops without waiting for the workers
        self._grace_timer: threading.Timer | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def _request_fs(self):
        from t2i_dist.storage import filesystem

        return filesystem(self.request_url, self.cfg.data.s3)

    def _clear_request(self) -> None:
        fs, path = self._request_fs()
        if fs.exists(path):
            fs.rm(path)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.preempted:
            # asked again (or the grace period ran out): stop now. Raised inside Ray's wait for the
            # workers, which hands on any SystemExit as exit code 1: fit() restores this one's
            self.stopped_by_signal = signum
            raise SystemExit(128 + signum)
        self.preempted = True
        grace = self.cfg.run.preemption_grace_s
        print(
            f"[t2i_dist] SIGTERM: asking the workers to checkpoint and stop (run.preemption_grace_s={grace:g})",
            flush=True,
        )
        fs, path = self._request_fs()
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as fh:
            fh.write(f"{time.time()}\n")
        self._grace_timer = threading.Timer(grace, self._grace_over)
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _grace_over(self) -> None:
        print(
            f"[t2i_dist] the workers did not stop within run.preemption_grace_s={self.cfg.run.preemption_grace_s:g}"
            "; stopping the driver (the last periodic checkpoint is kept)",
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    def fit(self) -> Any:
        self._clear_request()  # a request left by an earlier launch is not meant for this one
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if main else None
        started = time.time()
        try:
            result = self.trainer.fit()
        except SystemExit:
            if self.stopped_by_signal is None:
                raise
            run_dir = self.request_url.rsplit("/", 1)[0]
            print(
                f"[t2i_dist] stopped by SIGTERM before the workers checkpointed; relaunch the same command to "
                f"resume from the last checkpoint under {run_dir}",
                flush=True,
            )
            raise SystemExit(128 + self.stopped_by_signal) from None
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            if main:  # None: the previous handler was not installed from Python
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            self._clear_request()
            self._report_unsent_records(started)
        step = (result.metrics or {}).get("step")
        if step is not None and step < self.cfg.run.max_steps:
            # the workers stopped early without an error: a SIGTERM reached them or this driver
            print(
                f"[t2i_dist] preempted at step {step} of {self.cfg.run.max_steps}: relaunch the same command "
                "to resume from its checkpoint"
            )
        return result

    def _report_unsent_records(self, since: float) -> None:
        run_id = self.run_info.get("mlflow_run_id")
        path = Path(self.run_info.get("fallback_dir", "."), f"mlflow-unsent-{run_id}.jsonl")
        if run_id and path.is_file() and path.stat().st_mtime >= since:
            print(f"[t2i_dist] WARNING: MLflow was unreachable; unsent tracking records were saved to {path}")


class TrainingError(RuntimeError):
    """A run could not start (bad input: exit 2) or failed (exit 1); the message says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    checkpoint: str | None
    run_dir: str
    run_info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
