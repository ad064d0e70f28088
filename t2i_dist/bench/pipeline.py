"""Benchmark 2: the data pipeline. One reader (what one loader worker runs) streaming the benchmark's shards
from a local moto S3 server and from local disk, side by side with training steps of benchmark 1, so its
headroom over what training consumes is a ratio of neighbouring measurements; and the share of step time
the training loop spends waiting for its next batch (loader_workers as configured)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from t2i_dist.bench import step
from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, ratio_row
from t2i_dist.bench.timing import side_by_side

BENCH = "2 data pipeline"
WAIT_GOAL = 0.05


class Reader:
    """One in-process reader (data.loader_workers=0) over `urls`; segments of `batches` batches."""

    def __init__(self, ctx: BenchContext, urls: str, fmt: str, batches: int):
        from t2i_dist.data.shards import ShardLoader

        cfg = ctx.ldm_config()
        data = cfg.data.model_copy(update={"urls": urls, "format": fmt, "loader_workers": 0})
        self.batch_size = cfg.deepspeed.micro_batch_size
        self.batches = batches
        self.iterator: Iterator = iter(ShardLoader(data, self.batch_size, 0, 1, cfg.run.seed))
        self.segment()  # fills the shuffle buffer and opens the first shards

    def segment(self) -> float:
        start = time.perf_counter()
        for _ in range(self.batches):
            next(self.iterator)
        return self.batches * self.batch_size / (time.perf_counter() - start)


def run(ctx: BenchContext) -> list[Row]:
    variants = step.variants(ctx)
    server = ctx.s3()
    images_s3 = server.upload_dir(ctx.image_shards(), "bench-images")
    latents_s3 = server.upload_dir(ctx.latent_shards(), "bench-latents")
    batches = 8 if ctx.quick else 16
    readers = {
        "images_local": Reader(ctx, str(ctx.image_shards()), "images", batches),
        "images_s3": Reader(ctx, images_s3, "images", batches),
        "latents_local": Reader(ctx, str(ctx.latent_shards()), "latents", batches),
        "latents_s3": Reader(ctx, latents_s3, "latents", batches),
    }
    online, latents = variants["ours_online"], variants["ours_latents"]
    online.wait_fractions.clear()
    latents.wait_fractions.clear()
    steps = ctx.sizes.steps
    candidates = {name: r.segment for name, r in readers.items()}
    candidates["train_online"] = lambda: online.segment(steps)
    candidates["train_latents"] = lambda: latents.segment(steps)
    ctx.say(f"{BENCH}: 4 readers and 2 training variants, {ctx.sizes.rounds} rounds")
    s = side_by_side(candidates, ctx.sizes.rounds)
    rates = ", ".join(f"{k} {s.median(k):.0f}" for k in s.values)
    rows = [
        ratio_row(
            BENCH,
            "S3 server / local disk, one reader, image shards",
            s.ratio("images_s3", "images_local"),
            None,
            f"median samples/s: {rates}",
            s.spread("images_s3", "images_local"),
        ),
        ratio_row(
            BENCH,
            "S3 server / local disk, one reader, latent shards",
            s.ratio("latents_s3", "latents_local"),
            None,
            "moto on loopback: no network latency, but every read goes through HTTP and s3fs",
            s.spread("latents_s3", "latents_local"),
        ),
        ratio_row(
            BENCH,
            "headroom: one S3 reader / training consumption (online encoding)",
            s.ratio("images_s3", "train_online"),
            3.0,
            "reader decodes PNGs; training is benchmark 1's 'ours (online)' on one thread",
            s.spread("images_s3", "train_online"),
        ),
        ratio_row(
            BENCH,
            "headroom: one S3 reader / training consumption (precomputed latents)",
            s.ratio("latents_s3", "train_latents"),
            3.0,
            "",
            s.spread("latents_s3", "train_latents"),
        ),
    ]
    workers = online.cfg.data.loader_workers
    for name, variant in (("online encoding", online), ("precomputed latents", latents)):
        waits = sorted(variant.wait_fractions)
        median = waits[len(waits) // 2]
        rows.append(
            Row(
                BENCH,
                f"data wait share of step time ({name})",
                f"{100 * median:.1f} %",
                f"< {100 * WAIT_GOAL:.0f} %",
                "met" if median < WAIT_GOAL else "missed",
                f"median over {len(waits)} segments, loader_workers={workers}, local shards; range "
                f"{100 * waits[0]:.1f}-{100 * waits[-1]:.1f} %",
            )
        )
    return rows
