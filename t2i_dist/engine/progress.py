"""Step lines for people: step, loss, img/s, data-wait share and ETA."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepMeter:
    """Throughput over a window of recent steps (the first steps include warm-up and are excluded)."""

    def __init__(self, start_step: int, max_steps: int, global_batch: int):
        self.start_step, self.max_steps, self.global_batch = start_step, max_steps, global_batch
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_data_wait = 0.0
        self.img_per_s = float("nan")
        self.data_wait_fraction = float("nan")

    def add(self, data_wait_s: float) -> None:
        self.window_steps += 1
        self.window_data_wait += data_wait_s

    def close_window(self) -> None:
        elapsed = time.perf_counter() - self.window_start
        if self.window_steps and elapsed > 0:
            self.img_per_s = self.window_steps * self.global_batch / elapsed
            self.data_wait_fraction = self.window_data_wait / elapsed
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_data_wait = 0.0

    def eta(self, step: int) -> str:
        if self.img_per_s != self.img_per_s or self.img_per_s <= 0:
            return "?"
        return format_duration((self.max_steps - step) * self.global_batch / self.img_per_s)

    def line(self, step: int, metrics: dict[str, float]) -> str:
        parts = [f"step {step}/{self.max_steps}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss")]
        parts += [
            f"{self.img_per_s:.1f} img/s",
            f"data wait {100 * self.data_wait_fraction:.0f}%",
            f"ETA {self.eta(step)}",
        ]
        return " | ".join(parts)
