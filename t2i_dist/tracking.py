"""MLflow tracking that never stops training: rank 0 queues metrics/artifacts, a background thread sends them
and retries with backoff while the server is away; whatever is still unsent at the end is written to a local
JSONL fallback whose path is reported."""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_dist.config import without_url_credentials

log = logging.getLogger(__name__)

# The MLflow client's own retries would block training for minutes while a server is down; we retry
# in the background instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_tracking_uri(configured: str | None, workdir: str | os.PathLike = ".") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return local_store_uri(workdir)


def local_store_uri(workdir: str | os.PathLike = ".") -> str:
    """The default store: sqlite under ./mlruns (MLflow 3 no longer accepts a plain directory store)."""
    root = Path(workdir, "mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database, not in the current directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_run(
    uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], config_yaml: str
) -> str:
    """Driver side: create the run, log parameters and the resolved config; returns the run id."""
    from mlflow.entities import Param, RunTag

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    )
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, config_yaml, "config/resolved.yaml")
    client.set_tag(run.info.run_id, "mlflow.runName", run_name)
    for k, v in tags.items():
        client.log_batch(run.info.run_id, tags=[RunTag(k, v)])
    return run.info.run_id


@dataclass
class _Item:
    kind: str  # metrics | image | text | tags | flush | terminate
    payload: Any
    attempts: int = 0
    created: float = field(default_factory=time.time)


class Tracker:
    """Queue-backed MLflow logger for rank 0. All public calls return at once and never raise."""

    def __init__(self, uri: str, run_id: str, fallback_dir: str | os.PathLike, max_backoff_s: float = 30.0):
        self.uri, self.run_id = uri, run_id
        self.fallback_dir = Path(fallback_dir)
        self.max_backoff_s = max_backoff_s
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._pending: list[_Item] = []
        self._warned = False
        self.sent = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a retry back-off short (at close)
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._queue.put(_Item("metrics", (clean, step, ts)))

    def log_image(self, png_bytes: bytes, artifact_file: str) -> None:
        self._queue.put(_Item("image", (png_bytes, artifact_file)))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is sent; at once False while MLflow is known to be down (the
        records stay queued for the retries and, at the end, the fallback file)."""
        if self._warned or not self._thread.is_alive():
            return False
        done = threading.Event()
        self._queue.put(_Item("flush", done))
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> Path | None:
        """Flush; what cannot be sent within the timeout goes to a JSONL fallback file (path returned). While
        MLflow is down this costs one more attempt, not the whole timeout."""
        self._queue.put(_Item("terminate", None))
        self._wake.set()
        self._thread.join(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        leftover = self._pending + self._drain()
        leftover = [i for i in leftover if i.kind not in ("terminate", "flush")]
        if not leftover:
            return None
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        path = self.fallback_dir / f"mlflow-unsent-{self.run_id}.jsonl"
        with path.open("a") as fh:
            for item in leftover:
                fh.write(json.dumps(_to_json(item)) + "\n")
        log.warning(
            "MLflow at %s was unreachable: %d records saved to %s",
            without_url_credentials(self.uri),
            len(leftover),
            path,
        )
        return path

    # -- sender side ------------------------------------------------------------------------------------
    def _drain(self) -> list[_Item]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        client = None
        backoff = 1.0
        while not self._stop.is_set():
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.5))
                except queue.Empty:
                    continue
            self._pending.extend(self._drain())
            try:
                client = client or client_for(self.uri)
                while self._pending:
                    item = self._pending[0]
                    if item.kind == "terminate":
                        self._pending.pop(0)
                        if not self._pending and self._queue.empty():
                            return
                        continue
                    if item.kind == "flush":
                        item.payload.set()
                        self._pending.pop(0)
                        continue
                    self._send(client, item)
                    self._pending.pop(0)
                    self.sent += 1
                backoff = 1.0
                if self._warned:
                    log.warning("MLflow reachable again; buffered records sent")
                    self._warned = False
            except Exception as exc:  # noqa: BLE001 - any tracking failure must stay non-fatal
                if not self._warned:
                    log.warning(
                        "MLflow unreachable (%s); buffering %d records and retrying",
                        type(exc).__name__,
                        len(self._pending),
                    )
                    self._warned = True
                if any(i.kind == "terminate" for i in self._pending):
                    return  # closing while MLflow is down: close() writes the rest to the fallback file
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, self.max_backoff_s)

    def _send(self, client: Any, item: _Item) -> None:
        from mlflow.entities import Metric

        if item.kind == "metrics":
            metrics, step, ts = item.payload
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        elif item.kind == "image":
            data, artifact_file = item.payload
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp, Path(artifact_file).name)
                local.write_bytes(data)
                client.log_artifact(self.run_id, str(local), str(Path(artifact_file).parent))


def _to_json(item: _Item) -> dict[str, Any]:
    if item.kind == "image":
        return {"kind": "image", "artifact_file": item.payload[1], "bytes": len(item.payload[0])}
    return {"kind": item.kind, "payload": item.payload}
