"""Evaluation inside a torch.distributed worker group: all_reduce of the sums, lockstep generation with a
real LDM plug-in, and the same numbers on every rank and for any world size."""

from __future__ import annotations

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


def _eval_rank(rank: int, world: int, shards: str, cache: str) -> dict:
    import torch

    from t2i_dist.eval.in_training import InTrainingEval
    from t2i_dist.models.registry import build_plugin, load_config

    cfg = load_config(
        "ldm-tiny",
        [
            f"data.urls={shards}",
            "eval.every=5",
            "eval.num_samples=6",
            f"eval.reference_cache={cache}",
            "model.sampling.steps=2",
        ],
    )
    torch.manual_seed(0)  # the same random weights in every process
    plugin = build_plugin(cfg, torch.device("cpu"))
    evaluator = InTrainingEval(cfg, rank, world, torch.device("cpu"), batch_size=2)
    assert evaluator.due(10) and not evaluator.due(7)
    return evaluator.run(plugin, 10)


def test_in_training_fid_is_the_same_on_every_rank_and_for_any_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the alignment classifier's per-user cache
    shards = tmp_path / "synthetic"
    write_synthetic_shards(shards, 64, 32, 32, seed=0)
    two = run_distributed(_eval_rank, world=2, args=(str(shards), str(tmp_path / "cache")))
    assert two[0] == two[1]
    metrics = two[0]
    assert metrics["eval/num_samples"] == 6
    assert metrics["eval/fid"] > 0 and metrics["eval/alignment_fid"] > 0
    assert 0 <= metrics["eval/alignment"] <= 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert len(list((tmp_path / "home" / ".cache" / "t2i_dist").glob("alignment-*.pt"))) == 1
    (one,) = run_distributed(_eval_rank, world=1, args=(str(shards), str(tmp_path / "cache")))
    assert one["eval/fid"] == pytest.approx(metrics["eval/fid"], rel=1e-4)
    assert one["eval/alignment"] == metrics["eval/alignment"]
