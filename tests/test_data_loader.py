"""ShardLoader and preflight on local shards: batches, rank split, exact resume, bad samples, latents."""

from __future__ import annotations

import io
import logging
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_dist.config import DataSection
from t2i_dist.data.shards import DataError, ShardLoader, expand_urls, preflight
from t2i_dist.data.synthetic import COLOURS, png_bytes, write_synthetic_shards
from t2i_dist.data.writing import write_shards


def numbered_samples(start: int, count: int, size: int = 16):
    """Samples whose caption ("sample 7") and pixels identify them."""
    for i in range(start, start + count):
        image = Image.new("RGB", (size, size), (i % 256, (i * 7) % 256, 90))
        yield {"__key__": f"{i:06d}", "png": png_bytes(image), "txt": f"sample {i}"}


def write_numbered_shards(out_dir: Path, num_shards: int, per_shard: int) -> list[str]:
    return write_shards(numbered_samples(0, num_shards * per_shard), out_dir, per_shard)


def data_cfg(urls, **overrides) -> DataSection:
    return DataSection(urls=urls if isinstance(urls, list) else str(urls), **{"loader_workers": 0, **overrides})


def take(loader: ShardLoader, n: int):
    return list(islice(iter(loader), n))


def test_batches_are_images_in_range_with_captions(tmp_path):
    write_synthetic_shards(tmp_path / "synth", 24, 8, 48)
    loader = ShardLoader(data_cfg(tmp_path / "synth", resolution=32, shuffle_buffer=8), batch_size=6)
    batches = take(loader, 5)  # 30 samples: crosses into the second epoch
    for batch in batches:
        assert batch.images.shape == (6, 3, 32, 32) and batch.images.dtype == torch.float32
        assert -1.0 <= batch.images.min() and batch.images.max() <= 1.0
        assert batch.latents is None and len(batch.captions) == 6
        assert all(any(c in caption for c in COLOURS) for caption in batch.captions)
    assert batches[0].images.std() > 0.1  # not a blank image
    assert loader.seen_count() == 30 and loader.skip_counts() == {} and loader.epoch == 1


def test_resize_keeps_aspect_and_crops_the_centre(tmp_path):
    # 64x32: red | green | blue; the centre 32x32 crop (plus the resampling filter's margin) is all green,
    # while squashing the whole width would bring red and blue in
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :8] = (255, 0, 0)
    image[:, 8:56] = (0, 255, 0)
    image[:, 56:] = (0, 0, 255)
    sample = {"__key__": "a", "png": png_bytes(Image.fromarray(image)), "txt": "stripes"}
    write_shards([sample], tmp_path / "s", 1)
    batch = next(iter(ShardLoader(data_cfg(tmp_path / "s", resolution=16, shuffle_buffer=0), batch_size=1)))
    assert torch.allclose(batch.images[0, 1], torch.ones(16, 16), atol=0.02)
    assert batch.images[0, 0].max() < -0.95 and batch.images[0, 2].max() < -0.95


def captions_of(batches) -> list[str]:
    return [c for b in batches for c in b.captions]


@pytest.mark.parametrize("num_shards,per_shard", [(4, 6), (1, 24)], ids=["split-by-shard", "split-by-sample"])
def test_ranks_read_disjoint_parts_that_cover_the_data(tmp_path, num_shards, per_shard):
    write_numbered_shards(tmp_path / "s", num_shards, per_shard)
    per_rank = [
        captions_of(take(ShardLoader(data_cfg(tmp_path / "s"), batch_size=4, rank=r, world_size=2, seed=5), 3))
        for r in range(2)
    ]
    assert len(set(per_rank[0])) == 12 and len(set(per_rank[1])) == 12
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {f"sample {i}" for i in range(24)}


def test_each_epoch_reshuffles_the_same_samples(tmp_path):
    write_numbered_shards(tmp_path / "s", 4, 6)
    captions = captions_of(take(ShardLoader(data_cfg(tmp_path / "s", shuffle_buffer=8), batch_size=6), 8))
    first, second = captions[:24], captions[24:]
    assert sorted(first) == sorted(second) and first != second


def assert_same_batches(a, b):
    assert [x.captions for x in a] == [y.captions for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(tmp_path, workers):
    write_numbered_shards(tmp_path / "s", 4, 10)
    cfg = data_cfg(tmp_path / "s", shuffle_buffer=8, loader_workers=workers)
    uninterrupted = ShardLoader(cfg, batch_size=6, seed=3)
    stream = iter(uninterrupted)
    head = list(islice(stream, 3))
    state = uninterrupted.state_dict()
    tail = list(islice(stream, 8))  # 66 samples in all: past the end of the first epoch of every reader

    resumed = ShardLoader(cfg, batch_size=6, seed=3)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 8), tail)
    assert state["batches"] == 3 and resumed.seen_count() == uninterrupted.seen_count() == 66
    assert captions_of(head) != captions_of(tail[:3])


def test_resume_with_other_settings_restarts_the_saved_epoch(tmp_path, caplog):
    write_numbered_shards(tmp_path / "s", 2, 8)
    loader = ShardLoader(data_cfg(tmp_path / "s"), batch_size=4, seed=1)
    take(loader, 5)  # into epoch 1
    other = ShardLoader(data_cfg(tmp_path / "s"), batch_size=4, seed=2)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(loader.state_dict())
    assert "seed: 1 -> 2" in caplog.text and other.state_dict()["positions"] == [{"epoch": 1, "index": 0}]
    assert len(captions_of(take(other, 4))) == 16


def corrupt_samples() -> list[dict]:
    good = list(numbered_samples(100, 4))
    big = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    return [
        good[0],
        {"__key__": "undecodable", "png": b"\x89PNG not really", "txt": "broken bytes"},
        {"__key__": "empty-caption", "png": good[1]["png"], "txt": "   "},
        {"__key__": "no-caption", "png": good[1]["png"]},
        {"__key__": "no-image", "txt": "caption without image"},
        {"__key__": "too-large", "png": big, "txt": "a big picture"},
        *good[1:],
    ]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    write_numbered_shards(tmp_path / "s", 2, 10)
    write_shards(corrupt_samples(), tmp_path / "bad", 100)
    # each sample is 4 tar blocks (header and data of png and of txt): cut one shard inside the png data of
    # sample 3, the other one right after sample 3
    truncated = []
    for start, cut in ((200, 3 * 2048 + 512 + 40), (210, 4 * 2048)):
        shard = Path(write_shards(numbered_samples(start, 6), tmp_path / f"cut{start}", 6)[0])
        shard.write_bytes(shard.read_bytes()[:cut])
        truncated.append(str(shard))
    urls = [str(tmp_path / "s"), str(tmp_path / "bad"), *truncated]

    loader = ShardLoader(data_cfg(urls, max_skip_fraction=0.5), batch_size=5, max_pixels=40 * 40)
    captions = captions_of(take(loader, 12))  # 60 samples: past the first epoch
    counts = loader.skip_counts()
    assert set(counts) == {"undecodable_image", "missing_caption", "missing_image", "too_large", "corrupt_tar"}
    assert counts["missing_caption"] == 2 * counts["undecodable_image"]  # empty and absent captions
    assert loader.seen_count() == 60 + sum(counts.values())
    assert {f"sample {i}" for i in range(100, 104)} <= set(captions)
    assert counts["corrupt_tar"] == 2 * counts["too_large"]
    # samples before the cut are used (the one just before a cut inside data is lost with it)
    assert {"sample 201", "sample 213"} <= set(captions)
    assert not {"broken bytes", "a big picture", "caption without image"} & set(captions)


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_samples_abort_naming_the_worst_shard(tmp_path, workers):
    write_numbered_shards(tmp_path / "good", 3, 20)
    no_captions = ({"__key__": f"x{i:04d}", "png": s["png"]} for i, s in enumerate(numbered_samples(0, 20)))
    bad_shard = write_shards(no_captions, tmp_path / "bad", 20)[0]
    cfg = data_cfg([str(tmp_path / "good"), str(tmp_path / "bad")], max_skip_fraction=0.1, loader_workers=workers)
    with pytest.raises(DataError) as info:
        take(ShardLoader(cfg, batch_size=4), 40)
    message = str(info.value)
    assert "data.max_skip_fraction=0.1" in message and "missing_caption" in message
    assert f"Worst shards: {bad_shard} (" in message


def test_latent_shards_fill_latents_and_text(tmp_path):
    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"{i:04d}",
            "latent.npy": npy(rng.normal(size=(4, 8, 8)).astype(np.float16)),
            "text.npy": npy(rng.normal(size=(7, 16)).astype(np.float32)),
            "pooled.npy": npy(rng.normal(size=(16,)).astype(np.float32)),
            "txt": f"latent {i}",
        }
        for i in range(6)
    ]
    samples.append({**samples[0], "__key__": "odd", "latent.npy": npy(np.zeros((4, 4, 4), np.float32))})
    write_shards(samples, tmp_path / "lat", 10)
    loader = ShardLoader(data_cfg(tmp_path / "lat", format="latents", shuffle_buffer=0), batch_size=3)
    batches = take(loader, 3)  # the odd sample comes 7th: it is read (and skipped) for the third batch
    batch = batches[0]
    assert batch.images is None and batch.latents.shape == (3, 4, 8, 8) and batch.latents.dtype == torch.float32
    assert batch.text["hidden"].shape == (3, 7, 16) and batch.text["pooled"].shape == (3, 16)
    assert captions_of(batches)[:6] == [f"latent {i}" for i in range(6)]
    assert loader.skip_counts() == {"shape_mismatch": 1}


# ------------------------------------------------------------------------------------------------ preflight


def test_preflight_names_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match=f"data.urls '{tmp_path / 'nowhere'}' does not exist.*synthesize"):
        preflight(data_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no shards found .*holds no"):
        preflight(data_cfg(tmp_path / "empty"))
    write_numbered_shards(tmp_path / "s", 2, 2)
    with pytest.raises(DataError, match="1 shard\\(s\\) do not exist.*shard-000002.tar"):
        preflight(data_cfg(str(tmp_path / "s" / "shard-{000000..000002}.tar")))
    assert preflight(data_cfg(f"file://{tmp_path}/s/shard-*.tar")) == expand_urls(str(tmp_path / "s"))


def test_preflight_synthesizes_once_when_enabled(tmp_path):
    target = tmp_path / "synthetic"
    cfg = DataSection(
        urls=str(target / "shard-{000000..000002}.tar"),
        synthesize={"enabled": True, "num_samples": 12, "samples_per_shard": 4, "image_size": 16},
    )
    shards = preflight(cfg)
    assert [Path(s).name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    stamp = Path(shards[0]).stat().st_mtime_ns
    assert preflight(cfg) == shards and Path(shards[0]).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="writes shards to one local directory"):
        preflight(DataSection(urls="s3://bucket/x", synthesize={"enabled": True}))


def test_resampled_mode_draws_shards_with_replacement_and_resumes(tmp_path):
    write_numbered_shards(tmp_path / "s", 4, 5)
    cfg = data_cfg(tmp_path / "s", resampled=True, shuffle_buffer=0)
    loader = ShardLoader(cfg, batch_size=5, seed=4)
    stream = iter(loader)
    head = list(islice(stream, 8))
    state = loader.state_dict()
    tail = list(islice(stream, 4))
    shards_drawn = [int(b.captions[0].split()[1]) // 5 for b in head]  # one batch = one whole shard here
    # an epoch is 4 draws; with replacement (and this seed) they are not a permutation of the 4 shards
    assert sorted(shards_drawn[:4]) != [0, 1, 2, 3] and len(set(shards_drawn)) > 1
    resumed = ShardLoader(cfg, batch_size=5, seed=4)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), tail)
