"""Watching and disturbing a training run from the test process: waiting for progress, the workers' PIDs and
mid-save markers, MLflow histories in arrival order, and searching every artefact for leaked secrets."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_LINE = re.compile(r"step (\d+)/\d+")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or written half


def worker_pid(marker_dir: Path, rank: int) -> int | None:
    """PID of the live worker of `rank` (each worker group writes its PIDs when it starts)."""
    try:
        return int((marker_dir / f"rank{rank}.pid").read_text())
    except (OSError, ValueError):
        return None


def save_marker(marker_dir: Path, step: int, rank: int) -> dict[str, Any] | None:
    """{'pid', 'directory'} once `rank` is paused inside the save of `step`."""
    return read_json(marker_dir / f"save-step{step}-rank{rank}.json")


def last_step_printed(path: Path) -> int:
    """The last step line ('step 7/40 | ...') in a driver's captured output."""
    try:
        steps = STEP_LINE.findall(path.read_text(errors="replace"))
    except OSError:
        return 0
    return int(steps[-1]) if steps else 0


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric in the order it was logged (a restart shows as a step going back)."""
    return [
        (m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    ]


def single_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, f"experiment {experiment!r} holds {len(runs)} runs, expected exactly one"
    return runs[0]


def logged_steps(client, experiment: str, key: str = "loss") -> list[int]:
    """Steps of `key` logged so far in the (single) run of `experiment`; [] while there is none."""
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] if runs else []
    except Exception:  # noqa: BLE001 - the server may be down on purpose
        return []


def mlflow_texts(client, run_id: str) -> dict[str, str]:
    """Everything MLflow holds for a run as text: params, tags, metric names and every artifact's bytes."""
    run = client.get_run(run_id)
    texts = {
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "metrics": json.dumps(sorted(run.data.metrics)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(client.download_artifacts(run_id, "", tmp))
        for path in root.rglob("*"):
            if path.is_file():
                texts[f"artifact {path.relative_to(root)}"] = path.read_bytes().decode("latin-1")
    return texts


def files_containing(roots: Iterable[Path], secrets: Iterable[str]) -> list[str]:
    """'path: secret' for every file under `roots` that contains one of `secrets`."""
    needles = [s.encode() for s in secrets]
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {n.decode()}" for n in needles if n in data]
    return found


def ray_logs_dir() -> Path:
    """The log directory of the Ray cluster this test process started (workers' stdout/stderr, Ray's own)."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


@dataclass
class Disturbance:
    """A background action during a blocking call; its error (or timeout) is re-raised by `check()`."""

    action: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def check(self, timeout_s: float = 60) -> Any:
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        assert not self.thread.is_alive(), "the background action did not finish"
        return self.result
