"""Exact resume through the real loop (no Ray, one process) with loader worker processes and the default
shuffle buffer: a run stopped at step 3 and resumed to 6 logs the same losses as one run straight to 6; a
finished run launched again trains nothing and says the evaluation it logged."""

from __future__ import annotations

from tests.dist_utils import run_distributed

OVERRIDES = [
    "cluster.num_workers=1",
    "deepspeed.micro_batch_size=4",
    "data.loader_workers=2",
    "data.synthesize.enabled=false",
    "run.log_every=1",
    "run.checkpoint_every=3",
    "run.sample_every=0",
    "eval.every=0",
    "optim.warmup_steps=0",
    "deepspeed.gradient_checkpointing=false",
]


def _losses(rank: int, world: int, shards: str, root: str, stops: list[int]) -> list[tuple[int, float]]:
    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    logged: list[tuple[int, float]] = []
    for max_steps in stops:  # each entry is one launch; later ones resume from the last checkpoint
        cfg = load_config("ldm-tiny", [*OVERRIDES, f"data.urls={shards}", f"run.max_steps={max_steps}"])
        loop = TrainLoop(cfg, local_context(cfg, root))
        loop.log_metrics = lambda m, step: logged.append((step, m["loss"])) if "loss" in m else None
        loop.run()
    return logged


def test_resumed_run_logs_the_same_losses_as_a_straight_one(tmp_path):
    from t2i_dist.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=160, samples_per_shard=40, image_size=32, seed=0)
    [straight] = run_distributed(_losses, world=1, args=(str(shards), str(tmp_path / "a"), [6]))
    [resumed] = run_distributed(_losses, world=1, args=(str(shards), str(tmp_path / "b"), [3, 6]))
    assert [s for s, _ in straight] == [1, 2, 3, 4, 5, 6] == [s for s, _ in resumed]
    assert resumed == straight  # every digit: same batches, noise and timesteps after the restore


def _finished_rerun(rank: int, world: int, shards: str, root: str, probe: str) -> list[str]:
    import contextlib
    import io

    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    said = []
    for _ in range(2):  # the second launch finds the run finished
        cfg = load_config(
            "ldm-tiny",
            [
                *OVERRIDES,
                "data.loader_workers=0",
                f"data.urls={shards}",
                "run.max_steps=2",
                "eval.every=2",
                "eval.num_samples=4",
                f"eval.alignment_classifier={probe}",
                "model.sampling.steps=2",
            ],
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            loop = TrainLoop(cfg, local_context(cfg, root))
            loop.run()
        said.append(out.getvalue())
    return said


def test_a_finished_run_launched_again_says_its_logged_evaluation(tmp_path, alignment_probe):
    from t2i_dist.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=32, samples_per_shard=16, image_size=32, seed=0)
    [(first, again)] = run_distributed(
        _finished_rerun, world=1, args=(str(shards), str(tmp_path / "run"), str(alignment_probe))
    )
    [evaluation] = [line for line in first.splitlines() if "evaluation at step 2:" in line]
    assert "step 1/2" not in again and "resumed from checkpoint at step 2" in again
    assert f"nothing left to train; evaluation logged at step 2: {evaluation.split('step 2: ', 1)[1]}" in again
