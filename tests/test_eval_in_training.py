"""Evaluation inside a torch.distributed worker group: all_reduce of the sums, lockstep generation with a
real LDM plug-in, the same numbers on every rank and for any world size, and a refused alignment classifier
stopping every rank rather than leaving some waiting."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.eval.metrics import Partial
from t2i_dist.eval.stats import ClassifierStats, FeatureStats
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _partial_of(rank: int) -> Partial:
    rng = np.random.default_rng(rank)
    part = Partial(FeatureStats(2048).add(rng.random((3 + rank, 2048))))
    part.classifier = ClassifierStats(2, 5).add(rng.dirichlet(np.ones(5), 3 + rank), np.arange(3 + rank), 10)
    part.clip_sum, part.clip_count = 10.0 * (rank + 1), 3 + rank
    return part


def _reduce_rank(rank: int, world: int) -> dict:
    from t2i_dist.eval.fanout import all_reduce_partial

    return all_reduce_partial(_partial_of(rank)).to_arrays()


def test_all_reduce_of_partials_equals_their_merge():
    results = run_distributed(_reduce_rank, world=2)
    expected = Partial.merge([_partial_of(0), _partial_of(1)]).to_arrays()
    for arrays in results:
        assert int(arrays["inception/count"]) == 7
        np.testing.assert_allclose(arrays["inception/outer"], expected["inception/outer"], rtol=1e-13)
        np.testing.assert_array_equal(arrays["is/count"], expected["is/count"])
        np.testing.assert_allclose(arrays["clip"], expected["clip"])


def _config(shards: str, cache: str):
    from t2i_dist.models.registry import load_config

    return load_config(
        "ldm-tiny",
        [
            f"data.urls={shards}",
            "data.synthesize.holdout_samples=0",  # evaluate on the shards' own captions (no hold-out set here)
            "eval.every=5",
            "eval.num_samples=6",
            f"eval.reference_cache={cache}",
            "model.sampling.steps=2",
        ],
    )


def _refusal(rank: int, world: int, shards: str, cache: str) -> str:
    import torch

    from t2i_dist.eval.in_training import InTrainingEval

    try:
        InTrainingEval(_config(shards, cache), rank, world, torch.device("cpu"), batch_size=2)
    except Exception as exc:  # noqa: BLE001 - the test checks what each rank was told
        return f"{type(exc).__name__}: {exc}"
    return "not refused"


def _eval_rank(rank: int, world: int, shards: str, cache: str, too_few: str | None = None) -> tuple[str, dict]:
    import torch

    from t2i_dist.eval.in_training import InTrainingEval
    from t2i_dist.models.registry import build_plugin

    refused = _refusal(rank, world, too_few, cache) if too_few else ""  # the same processes: one spawn less
    cfg = _config(shards, cache)
    torch.manual_seed(0)  # the same random weights in every process
    plugin = build_plugin(cfg, torch.device("cpu"))
    evaluator = InTrainingEval(cfg, rank, world, torch.device("cpu"), batch_size=2)
    assert evaluator.due(10) and not evaluator.due(7)
    return refused, evaluator.run(plugin, 10)


def test_in_training_fid_is_the_same_on_every_rank_and_for_any_world_size(tmp_path, monkeypatch, alignment_probe):
    from t2i_dist.eval.alignment_cache import default_classifier_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the alignment classifier's per-user cache
    shards, too_few = tmp_path / "synthetic", tmp_path / "too-few"
    write_synthetic_shards(shards, 64, 32, 32, seed=0)
    write_synthetic_shards(too_few, 64, 32, 32, seed=1)
    # 64 samples are too few to train a trustworthy classifier: the session's one, cached for `shards`, is
    # what rank 0 finds on first use and hands to the other rank; for `too_few` it trains one and is refused
    cached = default_classifier_path(str(shards))
    cached.parent.mkdir(parents=True)
    shutil.copy(alignment_probe, cached)
    two = run_distributed(_eval_rank, world=2, args=(str(shards), str(tmp_path / "cache"), str(too_few)))
    # the refusal reaches every rank (none waits for rank 0's bytes), with the fix
    (first, _), (second, _) = two
    assert first.startswith("UnreliableClassifierError") and "data.synthesize.num_samples >= 4096" in first
    assert second.startswith("RuntimeError: rank 0 could not provide the alignment classifier") and "0.95" in second
    assert two[0][1] == two[1][1]
    metrics = two[0][1]
    assert metrics["eval/num_samples"] == 6
    assert metrics["eval/fid"] > 0 and metrics["eval/alignment_fid"] > 0
    assert 0 <= metrics["eval/alignment"] <= 1
    # the real images' alignment beside every generated figure, for the log line and the report
    for key in ("alignment", "alignment/colour", "alignment/shape"):
        assert f"eval/{key}" in metrics and f"eval/real/{key}" in metrics, key
    assert metrics["eval/real/alignment/colour"] >= 0.8
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert list((tmp_path / "home" / ".cache" / "t2i_dist").glob("alignment-*.pt")) == [cached]  # none refused
    ((_, one),) = run_distributed(_eval_rank, world=1, args=(str(shards), str(tmp_path / "cache")))
    assert one["eval/fid"] == pytest.approx(metrics["eval/fid"], rel=1e-4)
    assert one["eval/alignment"] == metrics["eval/alignment"]
