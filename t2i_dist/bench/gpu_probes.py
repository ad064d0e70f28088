"""What the GPU check (bench/gpu_check.py) measures with and reports: its sizes, the result table, where a
plug-in's tensors live, and which modules ask for mlflow or ray on the Ray-free, tracking-off path."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sizes:
    steps: int  # tiny training steps (a checkpoint at the last)
    more_steps: int  # after the restore
    images32: int
    warmup: int  # study throughput: untimed steps, then timed ones
    timed: int
    study_batch: int
    study_images: int  # 128 px images (online encoding, GALIP)
    latent_images: int  # of those, encoded for the latents variant (on the CPU, by t2i_dist.precompute)


FULL = Sizes(
    steps=50, more_steps=5, images32=512, warmup=3, timed=10, study_batch=64, study_images=512, latent_images=128
)
QUICK = Sizes(steps=3, more_steps=2, images32=32, warmup=1, timed=2, study_batch=2, study_images=8, latent_images=4)


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float]] = []

    def check(self, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 - every check reports; the exit status carries failures
            traceback.print_exc()
            detail, ok = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300], False
        seconds = time.perf_counter() - start
        self.rows.append((name, "ok" if ok else "FAIL", detail, seconds))
        print(f"[gpu_check] {'ok  ' if ok else 'FAIL'} {name} ({seconds:.0f} s): {detail}", flush=True)

    def table(self, header: str) -> str:
        lines = [header, "", "| check | result | detail | s |", "|---|---|---|---|"]
        lines += [f"| {n} | {r} | {d.replace('|', '/')} | {s:.0f} |" for n, r, d, s in self.rows]
        return "\n".join(lines) + "\n"


def off_device(plugin: Any, device: torch.device) -> list[str]:
    """Attributes of the plug-in (modules, EMA shadows, cached tensor dicts) holding tensors off `device`."""
    wrong = []
    for name, value in vars(plugin).items():
        if isinstance(value, torch.nn.Module):
            tensors = [*value.parameters(), *value.buffers()]
        else:
            tensors = getattr(value, "shadow_params", None) or (list(value.values()) if isinstance(value, dict) else [])
        if any(isinstance(t, torch.Tensor) and t.device.type != device.type for t in tensors):
            wrong.append(name)
    return wrong


def to_cpu_fp32(state: dict[str, Any]) -> dict[str, Any]:
    return {part: {k: v.detach().float().cpu() for k, v in tensors.items()} for part, tensors in state.items()}


class ImportWatch:
    """Records which module first asks for mlflow or ray (a meta path finder that finds nothing itself)."""

    WATCHED = ("mlflow", "ray")

    def __init__(self) -> None:
        self.importers: dict[str, set[str]] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in self.WATCHED:
            frame: Any = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            self.importers.setdefault(name, set()).add(frame.f_globals.get("__name__", "?") if frame else "?")


WATCH = ImportWatch()


def imports_clean() -> str:
    ours = {n: sorted(i for i in who if i.startswith("t2i_dist")) for n, who in WATCH.importers.items()}
    if any(ours.values()):
        raise AssertionError(f"imported on the Ray-free, tracking-off path by our code: {ours}")
    others = "; ".join(
        f"{n} asked for by {', '.join(sorted(who))} ({'loaded' if n in sys.modules else 'absent'})"
        for n, who in sorted(WATCH.importers.items())
    )
    return "no Tracker in any loop; no t2i_dist module imports mlflow or ray" + (f"; {others}" if others else "")
