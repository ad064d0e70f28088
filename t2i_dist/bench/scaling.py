"""Benchmark 3: data-parallel scaling of the real training entry (Ray Train TorchTrainer + DeepSpeed), 1 vs 2
workers with one torch thread each, alternating 1- and 2-worker runs. img/s is the loop's own figure over
the second half of each run (after start-up and warm-up), with the global batch (micro-batch x workers), so
2 workers at perfect scaling report twice the img/s. Runs on the precomputed latents of benchmark 1.
The loop's data-wait share from the same runs is reported too."""

from __future__ import annotations

import statistics
from typing import Any

from t2i_dist.bench import ceiling
from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, ratio_row
from t2i_dist.bench.timing import side_by_side

BENCH = "3 scaling"
GOAL = 1.7


def fit(ctx: BenchContext, workers: int, index: int) -> dict[str, Any]:
    from t2i_dist import launch
    from t2i_dist.data.shards import preflight

    steps = ctx.sizes.fit_steps
    cfg = ctx.ldm_config(
        f"data.urls={ctx.latent_shards()}",
        "data.format=latents",
        "deepspeed.gradient_checkpointing=false",
        f"cluster.num_workers={workers}",
        "cluster.threads_per_worker=1",
        "cluster.cpus_per_worker=1",
        f"cluster.storage_path={ctx.workdir / 'runs'}",
        f"run.name=scale-{workers}w-{index}",
        f"run.max_steps={steps}",
        f"run.log_every={steps // 2}",
        f"run.checkpoint_every={steps}",
        "run.sample_every=0",
        "eval.every=0",
        "run.max_failures=0",
        "model.sampling.steps=1",
        "tracking.samples_per_prompt=1",
        "tracking.sample_prompts=[a red circle]",
    )
    run_info = {
        "tracking_uri": (ctx.workdir / "mlruns").as_uri(),
        "fallback_dir": str(ctx.workdir / "fallback"),
        "shards": preflight(cfg.data),
    }
    result = launch.build_trainer(cfg, run_info).fit()
    metrics = dict(result.metrics or {})
    if "img_per_s" not in metrics:
        raise RuntimeError(f"the {workers}-worker run reported no img_per_s (metrics: {sorted(metrics)})")
    return metrics


def run(ctx: BenchContext) -> list[Row]:
    ctx.ray()
    ctx.latent_shards()
    waits: dict[int, list[float]] = {1: [], 2: []}
    counter = iter(range(1000))

    def measure(workers: int) -> float:
        i = next(counter)
        ctx.say(f"{BENCH}: Ray Train run {i} with {workers} worker(s)")
        metrics = fit(ctx, workers, i)
        waits[workers].append(float(metrics.get("data_wait_fraction", float("nan"))))
        return float(metrics["img_per_s"])

    s = side_by_side(
        {"1 worker": lambda: measure(1), "2 workers": lambda: measure(2), **ceiling.candidates(ctx)}, ctx.sizes.fits
    )
    detail = (
        f"median img/s: 1 worker {s.median('1 worker'):.1f}, 2 workers {s.median('2 workers'):.1f}; "
        f"{s.rounds} pair(s) of runs, {ctx.sizes.fit_steps} steps each, micro-batch per worker fixed"
    )
    rows = [
        ratio_row(
            BENCH,
            "samples/s, 2 / 1 Ray workers (1 thread each)",
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
            "what two 1-thread processes could gain at best",
            s.spread("ceiling 2", "ceiling 1"),
        ),
    ]
    rows.append(
        Row(
            BENCH,
            "data wait share in the training loop (1 / 2 workers)",
            f"{100 * statistics.median(waits[1]):.1f} % / {100 * statistics.median(waits[2]):.1f} %",
            "< 5 %",
            "met" if max(statistics.median(waits[1]), statistics.median(waits[2])) < 0.05 else "missed",
            "the loop's own data_wait_fraction, latent shards, loader_workers=1",
        )
    )
    return rows
