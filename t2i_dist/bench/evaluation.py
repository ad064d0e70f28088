"""Benchmark 5: FID fan-out throughput, 1 vs 2 Ray workers, alternating. Each run is the CLI's path
(t2i_dist.eval.fanout.fan_out_ray): read the benchmark's image shards, Inception features, per-worker sums
merged on the driver. Worker processes are warmed up first (Inception loaded), so the ratio is about the
fan-out, not process start-up."""

from __future__ import annotations

import time

from t2i_dist.bench import ceiling
from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, ratio_row, unavailable
from t2i_dist.bench.timing import side_by_side

BENCH = "5 evaluation"
GOAL = 1.7


def run(ctx: BenchContext) -> list[Row]:
    try:
        from t2i_dist.eval.fanout import ImageReader, fan_out_ray
        from t2i_dist.eval.inception import ExtractorSpec
        from t2i_dist.eval.metrics import MetricSpec
        from t2i_dist.eval.sources import list_items
    except Exception as exc:  # noqa: BLE001 - reported as a row
        return [unavailable(BENCH, "FID images/s, 2 / 1 Ray workers", f"t2i_dist.eval is not importable: {exc}")]
    ctx.ray()
    resolution = ctx.ldm_config().data.resolution
    items = list_items(str(ctx.image_shards()), ctx.sizes.eval_images)
    spec = MetricSpec(ExtractorSpec(batch_size=8), resolution=resolution, keep_features=False)
    reader = ImageReader(resolution, batch_size=8)
    ctx.say(f"{BENCH}: warming up Ray workers")
    for _ in range(2):
        fan_out_ray(reader, items[:16], spec, 2)

    def images_per_s(workers: int) -> float:
        start = time.perf_counter()
        part = fan_out_ray(reader, items, spec, workers)
        if part.count != len(items):
            raise RuntimeError(f"{workers}-worker fan-out counted {part.count} of {len(items)} images")
        return len(items) / (time.perf_counter() - start)

    ctx.say(f"{BENCH}: {len(items)} images, {ctx.sizes.rounds} rounds")
    s = side_by_side(
        {"1 worker": lambda: images_per_s(1), "2 workers": lambda: images_per_s(2), **ceiling.candidates(ctx)},
        ctx.sizes.rounds,
    )
    detail = (
        f"{len(items)} images at {resolution} px -> Inception 299 px, batch 8, 1 CPU per task; median images/s "
        f"1 worker {s.median('1 worker'):.1f}, 2 workers {s.median('2 workers'):.1f}"
    )
    return [
        ratio_row(
            BENCH,
            "FID images/s, 2 / 1 Ray workers",
            s.ratio("2 workers", "1 worker"),
            GOAL,
            detail,
            s.spread("2 workers", "1 worker"),
        ),
        ratio_row(
            BENCH,
            "machine ceiling in the same rounds: pure compute, 2 / 1 Ray tasks",
            s.ratio("ceiling 2", "ceiling 1"),
            None,
            ceiling.__doc__.split(":")[0],
            s.spread("ceiling 2", "ceiling 1"),
        ),
    ]
