"""What the report needs from an MLflow run: parameters, last and historic metrics, the latest sample grid,
and the numbers derived from them (epochs, time per epoch, img/s)."""

from __future__ import annotations

import ast
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CURVES = ("loss", "eval/fid", "eval/alignment")


@dataclass
class RunSummary:
    run_id: str
    name: str
    family: str
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    start_ms: int | None = None
    end_ms: int | None = None
    grid_png: bytes | None = None
    grid_step: int | None = None
    checkpoint: str | None = None  # the final checkpoint, tagged by t2i_dist.train

    # -- derived numbers ---------------------------------------------------------------------------------
    def param_int(self, key: str) -> int | None:
        value = self.params.get(key)
        try:
            return int(float(value)) if value is not None else None
        except ValueError:
            return None

    @property
    def global_batch(self) -> int | None:
        direct = self.param_int("global_batch_size")
        if direct:
            return direct
        parts = [
            self.param_int(k)
            for k in ("deepspeed.micro_batch_size", "deepspeed.grad_accum_steps", "cluster.num_workers")
        ]
        return math.prod(parts) if all(parts) else None  # type: ignore[arg-type]

    @property
    def steps(self) -> int | None:
        loss = self.history.get("loss")
        return loss[-1][0] if loss else self.param_int("run.max_steps")

    @property
    def img_per_s(self) -> float | None:
        """Median throughput over the logged windows (the first window also holds start-up)."""
        values = [v for _, v in self.history.get("img_per_s", []) if math.isfinite(v) and v > 0]
        if len(values) > 2:
            values = values[1:]
        return statistics.median(values) if values else self.metrics.get("img_per_s")

    def dataset_size(self, override: int | None = None) -> int | None:
        if override:
            return override
        if str(self.params.get("data.synthesize.enabled", "")).lower() == "true":
            return self.param_int("data.synthesize.num_samples")
        return self.param_int("data.num_samples")

    def epochs(self, dataset_size: int | None) -> float | None:
        if not (dataset_size and self.steps and self.global_batch):
            return None
        return self.steps * self.global_batch / dataset_size

    def seconds_per_epoch(self, dataset_size: int | None) -> float | None:
        rate = self.img_per_s
        return dataset_size / rate if dataset_size and rate else None

    @property
    def wall_seconds(self) -> float | None:
        if self.start_ms and self.end_ms:
            return (self.end_ms - self.start_ms) / 1000
        return None

    @property
    def sample_prompts(self) -> list[str]:
        raw = self.params.get("tracking.sample_prompts")
        try:
            value = ast.literal_eval(raw) if raw else []
        except (ValueError, SyntaxError):
            return []
        return [str(v) for v in value] if isinstance(value, list) else []


def _latest_grid(client: Any, run_id: str) -> tuple[bytes | None, int | None]:
    try:
        files = [f.path for f in client.list_artifacts(run_id, "samples") if f.path.endswith(".png")]
    except Exception:  # noqa: BLE001 - a run without artifacts still gets its tables
        return None, None
    if not files:
        return None, None
    latest = max(files, key=lambda p: int("".join(c for c in Path(p).stem if c.isdigit()) or 0))
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, latest, tmp)
        data = Path(local).read_bytes()
    digits = "".join(c for c in Path(latest).stem if c.isdigit())
    return data, int(digits) if digits else None


def load_run(client: Any, run_id: str) -> RunSummary:
    run = client.get_run(run_id)
    params = dict(run.data.params)
    tags = dict(run.data.tags)
    history = {}
    for key in (*CURVES, "img_per_s"):
        points = client.get_metric_history(run_id, key)
        if points:
            history[key] = sorted((int(p.step), float(p.value)) for p in points)
    grid, grid_step = _latest_grid(client, run_id)
    return RunSummary(
        run_id=run_id,
        name=tags.get("mlflow.runName") or run.info.run_name or run_id[:8],
        family=params.get("model.family") or tags.get("t2i_dist.family", "?"),
        params=params,
        metrics=dict(run.data.metrics),
        history=history,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        grid_png=grid,
        grid_step=grid_step,
        checkpoint=tags.get("t2i_dist.checkpoint") if tags.get("t2i_dist.checkpoint") not in (None, "None") else None,
    )
