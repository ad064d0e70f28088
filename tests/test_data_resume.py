"""Exact resume of ShardLoader with loader worker processes and the default shuffle buffer.

Each test mirrors TrainLoop: a straight run iterates once and draws from the global torch RNG after every
batch (as the training's noise and timesteps do); the checkpoint keeps loader.state_dict() (through JSON)
and the torch RNG state; the relaunch restores both, then starts iterating. The next batches and the next
random numbers must be the ones the straight run got.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest
import torch

from t2i_dist.config import DataSection
from t2i_dist.data.shards import ShardLoader
from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.data.writing import write_shards

BATCH = 8
# 1130 samples in 12 shards (the last one short): readers get unequal shares, so their epochs end apart
NUM_SAMPLES, PER_SHARD = 1130, 100


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "synth"
    write_synthetic_shards(out, NUM_SAMPLES, PER_SHARD, 16)
    return out


def cfg_for(urls: Path, **overrides) -> DataSection:
    cfg = DataSection(urls=str(urls), resolution=16, **{"loader_workers": 2, **overrides})
    assert cfg.shuffle_buffer == 256  # the default, which every real run uses
    return cfg


@dataclass
class Run:
    batches: list
    draws: list[int]  # one torch.randint after each batch, like the training's timesteps
    epoch: int


def iterate(loader: ShardLoader, n: int) -> Run:
    stream = iter(loader)
    batches, draws = [], []
    for batch in islice(stream, n):
        batches.append(batch)
        draws.append(int(torch.randint(0, 1 << 30, ())))
    stream.close()  # a relaunch starts its own worker processes
    return Run(batches, draws, loader.epoch)


def straight_and_resumed(cfg: DataSection, head: int, tail: int, rank: int = 0, world_size: int = 1):
    """(straight run's batches head..head+tail, the resumed run's first `tail`, the saved state)."""
    torch.manual_seed(1)
    straight = ShardLoader(cfg, BATCH, rank, world_size, seed=3)
    stream = iter(straight)
    for _ in islice(stream, head):
        torch.randint(0, 1 << 30, ())
    state, rng = json.loads(json.dumps(straight.state_dict())), torch.get_rng_state()
    batches, draws = [], []
    for batch in islice(stream, tail):
        batches.append(batch)
        draws.append(int(torch.randint(0, 1 << 30, ())))
    stream.close()
    expected = Run(batches, draws, straight.epoch)

    torch.manual_seed(99)  # a fresh process: whatever the RNG was, the checkpoint's state is restored
    resumed = ShardLoader(cfg, BATCH, rank, world_size, seed=3)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    return expected, iterate(resumed, tail), state


def assert_same(expected: Run, got: Run) -> None:
    assert [b.captions for b in got.batches] == [b.captions for b in expected.batches]
    for x, y in zip(expected.batches, got.batches, strict=True):
        assert torch.equal(x.images, y.images)
    assert got.draws == expected.draws, "iterating the resumed loader moved the global torch RNG"
    assert got.epoch == expected.epoch


@pytest.mark.parametrize("head,tail", [(37, 25), (133, 30)], ids=["within-epoch", "across-epoch-boundary"])
def test_resume_with_two_loader_workers_gives_the_same_batches(shards, head, tail):
    expected, got, state = straight_and_resumed(cfg_for(shards), head, tail)
    assert_same(expected, got)
    assert state["batches"] == head
    if head > 100:
        # saved near the end of epoch 0 (141 batches); the tail reaches into epoch 1 for every reader
        assert state["epoch"] == 0 and got.epoch == 1


def test_resume_is_exact_on_each_of_two_ranks(shards):
    captions = []
    for rank in range(2):
        expected, got, _ = straight_and_resumed(cfg_for(shards), 21, 12, rank=rank, world_size=2)
        assert_same(expected, got)
        captions.append({c for b in got.batches for c in b.captions})
    # captions repeat in the synthetic set; the ranks still read different samples
    assert captions[0] != captions[1]


def test_iterating_with_workers_leaves_the_global_torch_rng_alone(shards):
    loader = ShardLoader(cfg_for(shards), BATCH)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    stream = iter(loader)
    next(stream)
    stream.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_latent_shape_check_survives_a_resume(tmp_path):
    # the first usable sample fixes the shapes a reader accepts; the odd sample right after the resume
    # point must still be skipped, not become the reference for everything after it
    import io

    import numpy as np

    def npy(shape) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float32))
        return buf.getvalue()

    samples = [{"__key__": f"{i:04d}", "latent.npy": npy((4, 8, 8)), "txt": f"latent {i}"} for i in range(6)]
    samples.insert(4, {"__key__": "odd", "latent.npy": npy((4, 4, 4)), "txt": "odd"})
    write_shards(samples, tmp_path / "lat", 10)
    cfg = DataSection(urls=str(tmp_path / "lat"), format="latents", shuffle_buffer=0, loader_workers=0)
    loader = ShardLoader(cfg, batch_size=2)
    stream = iter(loader)
    list(islice(stream, 2))
    state = json.loads(json.dumps(loader.state_dict()))
    tail = [b.captions for b in islice(stream, 4)]
    resumed = ShardLoader(cfg, batch_size=2)
    resumed.load_state_dict(state)
    assert [b.captions for b in islice(iter(resumed), 4)] == tail
    assert resumed.skip_counts() == loader.skip_counts() == {"shape_mismatch": 2}


def test_a_live_iterator_does_not_hang_interpreter_exit(shards):
    # readers ignore SIGTERM; multiprocessing's exit handler would otherwise wait for them forever
    script = textwrap.dedent(f"""
        from t2i_dist.config import DataSection
        from t2i_dist.data.shards import ShardLoader
        stream = iter(ShardLoader(DataSection(urls={str(shards)!r}, resolution=16, loader_workers=2), 4))
        next(stream)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
