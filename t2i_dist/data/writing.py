"""Writing webdataset shards into a directory so that an interrupted run leaves no half-written set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

SHARD_PATTERN = "shard-%06d.tar"


def existing_shards(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    return sorted(directory.glob("*.tar")) if directory.is_dir() else []


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int,
    max_shard_bytes: float = 3e9,
) -> list[str]:
    """Write samples (each with `__key__` and bytes/str values) to `out_dir/shard-%06d.tar`.

    Shards are written into a temporary sibling directory and moved into place only when all are complete.
    `out_dir` may be missing or hold no shards yet; one that already holds shards is refused, and so is an
    empty sample stream (ValueError)."""
    out_dir = Path(out_dir)
    if existing_shards(out_dir):
        raise FileExistsError(f"{out_dir} already holds shards; remove them or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the renamed directory should read like any other
    try:
        # mtime=0 so the same samples give byte-identical shards
        with wds.ShardWriter(
            str(tmp_dir / SHARD_PATTERN),
            maxcount=samples_per_shard,
            maxsize=max_shard_bytes,
            verbose=0,
            encoder=False,
            mtime=0,
        ) as sink:
            for sample in samples:
                sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
            written = sink.total
        if not written:
            raise ValueError(f"no samples to write to {out_dir}")
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return [str(p) for p in existing_shards(out_dir)]


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(tmp_dir, out_dir)  # atomic: the directory appears with every shard in it
        return
    # the directory holds other files (no shards): move shards one by one
    for path in sorted(tmp_dir.iterdir()):
        os.rename(path, out_dir / path.name)
