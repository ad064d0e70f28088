"""Checkpoints: every rank writes its DeepSpeed shards into a private temporary directory, plus a manifest of
sizes and checksums written last; ray.train.report then publishes them as one checkpoint (Ray registers it
only once every rank's upload finished). Restores verify the manifests before loading anything, so a
half-written checkpoint is refused instead of loaded.

Layout of a checkpoint directory:
  <engine>/state/...          DeepSpeed engine files (model/optimizer/scheduler shards per rank)
  trainer_state.json          step, world size, mlflow run id, the metrics published with it (rank 0)
  extra_state.pt              plug-in state outside the engines, e.g. EMA (rank 0's state_dict)
  inference.pt                gathered weights for sampling (rank 0)
  config.json                 the resolved config (rank 0)
  data_state/rank{r}.json     data-loader position of rank r
  rng_state/rank{r}.pt        torch RNG and the plug-in's own "rank" state of rank r (a resume draws the same
                              random numbers)
  manifest/rank{r}.json       files rank r wrote: sizes and sha256
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from t2i_dist.config import S3Section
from t2i_dist.models.base import ModelPlugin
from t2i_dist.storage import filesystem

if TYPE_CHECKING:  # sampling reads checkpoints without DeepSpeed
    from t2i_dist.engine.engines import TrainedNetwork

log = logging.getLogger(__name__)
TAG = "state"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else set()


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _atomic_torch_save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def write_checkpoint(
    directory: Path,
    engines: dict[str, TrainedNetwork],
    plugin: ModelPlugin,
    *,
    rank: int,
    world_size: int,
    step: int,
    data_state: dict[str, Any],
    config: dict[str, Any],
    run_info: dict[str, Any],
    before_manifest: Callable[[Path], None] | None = None,
) -> None:
    """Collective: every rank calls it with its own (local, private) directory. `before_manifest` runs when
    every file but the manifest is written (fault-injection tests kill a worker there).

    The manifest lists exactly the files this rank wrote, so a directory shared by several ranks (a shared
    file system) never lists another rank's half-written temporary file."""
    written: list[Path] = []
    for name, engine in engines.items():
        engine_dir = directory / name
        before = _files(engine_dir)
        engine.engine.save_checkpoint(str(engine_dir), tag=TAG, save_latest=False)  # ends with a barrier
        written += sorted(_files(engine_dir) - before)
    inference = plugin.inference_state()  # collective under ZeRO-3
    shared = plugin.state_dict()
    own = shared.pop("rank", {})
    if rank == 0:
        written.append(_atomic_torch_save(shared, directory / "extra_state.pt"))
        written.append(_atomic_torch_save(inference, directory / "inference.pt"))
        written.append(_atomic_write_bytes(directory / "config.json", json.dumps(config, indent=1).encode()))
        state = {"step": step, "world_size": world_size, **run_info}
        written.append(_atomic_write_bytes(directory / "trainer_state.json", json.dumps(state, indent=1).encode()))
    written.append(_atomic_write_bytes(directory / "data_state" / f"rank{rank}.json", json.dumps(data_state).encode()))
    rng = {**_rng_state(), "plugin": own}
    written.append(_atomic_torch_save(rng, directory / "rng_state" / f"rank{rank}.pt"))
    if before_manifest is not None:
        before_manifest(directory)
    manifest = {
        "rank": rank,
        "world_size": world_size,
        "step": step,
        "files": {
            str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(set(written))
        },
    }
    _atomic_write_bytes(directory / "manifest" / f"rank{rank}.json", json.dumps(manifest, indent=1).encode())


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify_checkpoint(directory: Path, check_hashes: bool = True) -> dict[str, Any]:
    """Raise CheckpointError unless every rank's manifest is present and every file it lists is intact."""
    directory = Path(directory)
    state_file = directory / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: trainer_state.json is missing")
    state = json.loads(state_file.read_text())
    manifests = [directory / "manifest" / f"rank{rank}.json" for rank in range(state["world_size"])]
    for rank, mf in enumerate(manifests):
        if not mf.is_file():
            raise CheckpointError(f"{directory}: manifest of rank {rank} is missing (interrupted save?)")
    for mf in manifests:
        for rel, meta in json.loads(mf.read_text())["files"].items():
            path = directory / rel
            if not path.is_file() or path.stat().st_size != meta["size"]:
                raise CheckpointError(f"{directory}: {rel} is missing or truncated")
            if check_hashes and _sha256(path) != meta["sha256"]:
                raise CheckpointError(f"{directory}: {rel} does not match its checksum")
    return state


def verify_remote_checkpoint(url: str, s3: S3Section | None = None) -> dict[str, Any]:
    """verify_checkpoint for a checkpoint in remote storage (s3://...): every rank's manifest present and every
    listed file there at its size; checksums are checked where the files are read (restore on the workers)."""
    fs, root = filesystem(url, s3 or S3Section())
    root = root.rstrip("/")
    try:
        with fs.open(f"{root}/trainer_state.json", "rb") as fh:
            state = json.loads(fh.read())
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint: trainer_state.json is missing") from None
    for rank in range(state["world_size"]):
        try:
            with fs.open(f"{root}/manifest/rank{rank}.json", "rb") as fh:
                listed = json.loads(fh.read())["files"]
        except FileNotFoundError:
            raise CheckpointError(f"{url}: manifest of rank {rank} is missing (interrupted save?)") from None
        for rel, meta in listed.items():
            try:
                size = fs.info(f"{root}/{rel}")["size"]
            except FileNotFoundError:
                size = None
            if size != meta["size"]:
                raise CheckpointError(f"{url}: {rel} is missing or truncated")
    return state


def verify_checkpoint_at(url: str, s3: S3Section | None = None, check_hashes: bool = True) -> dict[str, Any]:
    """verify_checkpoint for a local directory, verify_remote_checkpoint for s3://...; the trainer state."""
    if "://" in url:
        return verify_remote_checkpoint(url, s3)
    return verify_checkpoint(Path(url), check_hashes=check_hashes)


def newest_complete_checkpoint(run_dir: str, s3: S3Section | None = None) -> str | None:
    """The complete checkpoint of the highest step among a run's published `checkpoint_*` directories (local
    or s3://), or None. Ray Train registers a reported checkpoint only when its controller next polls the
    workers: a worker that dies first leaves a published, complete checkpoint Ray does not hand back."""
    fs, root = filesystem(run_dir, s3 or S3Section())
    root = root.rstrip("/")
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return None
    best: tuple[int, str] | None = None
    for name in names:
        if not name.startswith("checkpoint_") or name.endswith(".tmp"):
            continue
        url = f"{run_dir.rstrip('/')}/{name}"
        try:
            state = verify_checkpoint_at(url, s3, check_hashes=False)
        except (CheckpointError, OSError, ValueError, KeyError):
            continue  # interrupted or partial: never resumed from
        if best is None or state["step"] > best[0]:
            best = (int(state["step"]), url)
    return best[1] if best else None


def restore_checkpoint(
    directory: Path,
    engines: dict[str, TrainedNetwork],
    plugin: ModelPlugin,
    *,
    rank: int,
    world_size: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load engines and plug-in state; returns (trainer_state, this rank's data state or None)."""
    state = verify_checkpoint(directory, check_hashes=rank == 0)
    for name, engine in engines.items():
        path, _ = engine.engine.load_checkpoint(
            str(directory / name), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load engine {name!r}")
    plugin_state = torch.load(directory / "extra_state.pt", map_location="cpu", weights_only=False)
    data_state = None
    data_file = directory / "data_state" / f"rank{rank}.json"
    if state["world_size"] == world_size and data_file.is_file():
        data_state = json.loads(data_file.read_text())
    rng_file = directory / "rng_state" / f"rank{rank}.pt"
    if state["world_size"] == world_size and rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        _set_rng_state(rng)
        plugin_state["rank"] = rng.get("plugin", {})
    elif state["world_size"] != world_size:
        log.warning(
            "checkpoint was written by %d workers, now %d: data position restarts at the epoch start",
            state["world_size"],
            world_size,
        )
    plugin.load_state_dict(plugin_state)
    return state, data_state


def new_local_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="t2i-ckpt-"))


def remove_local_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def load_for_inference(checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, inference state) from a checkpoint directory, local or remote (s3://); only the two files
    sampling needs are read, not the optimizer shards."""
    fs, root = filesystem(checkpoint, S3Section())
    root = root.rstrip("/")
    config_path, weights_path = f"{root}/config.json", f"{root}/inference.pt"
    if not fs.exists(config_path) or not fs.exists(weights_path):
        raise CheckpointError(
            f"{checkpoint} is not a t2i_dist checkpoint (config.json / inference.pt missing); pass a "
            "checkpoint_* directory from the run's storage path"
        )
    manifest_path = f"{root}/manifest/rank0.json"
    if not fs.exists(manifest_path):
        raise CheckpointError(
            f"{checkpoint} is incomplete: manifest/rank0.json is missing (interrupted save?); "
            "use an earlier checkpoint_* directory of the run"
        )
    with fs.open(manifest_path, "rb") as fh:
        listed = json.loads(fh.read())["files"]
    contents = {}
    for name, path in (("config.json", config_path), ("inference.pt", weights_path)):
        with fs.open(path, "rb") as fh:
            contents[name] = fh.read()
        if name not in listed or hashlib.sha256(contents[name]).hexdigest() != listed[name]["sha256"]:
            raise CheckpointError(f"{checkpoint}: {name} does not match its manifest (truncated or replaced)")
    config = json.loads(contents["config.json"])
    state = torch.load(io.BytesIO(contents["inference.pt"]), map_location="cpu", weights_only=False)
    return config, state
