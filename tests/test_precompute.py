"""Precomputed latents: a real Ray fan-out writes latent shards equal to what the frozen encoders give, the
LDM reads them back, refuses shards made for another model, and trains from them with the config switch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i_dist.data.decode import decode_image
from t2i_dist.data.errors import DataError
from t2i_dist.data.shards import ShardLoader
from t2i_dist.data.stream import shard_items
from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.models.registry import load_config
from t2i_dist.precompute import MANIFEST_NAME, build_encoders, check_latent_config, precompute
from t2i_dist.precompute import main as precompute_main

pytestmark = pytest.mark.slow

# random frozen parts (no stage-0 training), a factor-2 VAE with 4 latent channels (16x16x4 latents at 32 px):
# the latents are compared with what those encoders give
RANDOM_PARTS = [
    "model.vae.train_config=null",
    "model.text.train_config=null",
    "model.vae.block_out_channels=[32, 64]",
    "model.vae.latent_channels=4",
]
OVERRIDES = ["data.synthesize.enabled=false", "deepspeed.micro_batch_size=4", *RANDOM_PARTS]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    write_synthetic_shards(out, num_samples=36, samples_per_shard=12, image_size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def latent_dir(ray_cluster, image_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "set"
    cfg = load_config("ldm-tiny", OVERRIDES)
    manifest = precompute(cfg, out, images=str(image_shards), workers=2, batch_size=5)
    assert manifest["samples"] == 36
    return out


def latents_config(latent_dir: Path, *extra: str):
    return load_config("ldm-tiny-latents", [*OVERRIDES, f"data.urls={latent_dir}", *extra])


def test_fan_out_writes_the_frozen_encoders_output(latent_dir, image_shards):
    assert sorted(p.name for p in latent_dir.iterdir()) == [
        MANIFEST_NAME,
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert not list(latent_dir.parent.glob(".*partial*")), "the temporary directory must be gone"
    manifest = json.loads((latent_dir / MANIFEST_NAME).read_text())
    assert manifest["latent"] == "mean" and manifest["dtype"] == "float16"
    vae = load_config("ldm-tiny", OVERRIDES).model.vae
    side = 32 // 2 ** (len(vae.block_out_channels) - 1)  # 32 px images through the config's VAE factor
    assert manifest["latent_shape"] == [vae.latent_channels, side, side] and manifest["skipped"] == {}

    source = sorted(image_shards.glob("*.tar"))[1]
    written = list(shard_items(str(latent_dir / "shard-000001.tar")))
    originals = list(shard_items(str(source)))
    assert [s["__key__"] for s in written] == [s["__key__"] for s in originals]  # input order, same keys
    assert written[0]["txt"] == originals[0]["txt"]

    plugin = build_encoders(load_config("ldm-tiny", OVERRIDES))
    images = torch.stack([decode_image(s["png"], 32, 2**30) for s in originals])
    with torch.no_grad():
        expected = plugin.vae.encode(images).latent_dist.mean * plugin.latent_scale
        hidden = plugin.text_encoder([s["txt"].decode() for s in originals])["hidden"]
    import io

    stored = torch.from_numpy(np.stack([np.load(io.BytesIO(s["latent.npy"])) for s in written]).astype(np.float32))
    stored_text = np.stack([np.load(io.BytesIO(s["text.npy"])) for s in written])
    assert stored_text.dtype == np.float16
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(stored_text.astype(np.float32)), hidden, atol=2e-3, rtol=2e-3)


def test_ldm_reads_matching_latent_shards(latent_dir):
    cfg = latents_config(latent_dir)
    batch = next(iter(ShardLoader(cfg.data, batch_size=4)))
    assert batch.images is None and batch.latents.shape == (4, 4, 16, 16)
    plugin = build_encoders(cfg)
    latents, hidden = plugin.encode_batch(batch)  # runs the record and weight checks
    assert hidden.shape == (4, 32, 64) and torch.equal(latents, batch.latents)


def test_ldm_refuses_latents_of_another_model(latent_dir, tmp_path):
    with pytest.raises(DataError, match="resolution: shards 32 vs config 64"):
        check_latent_config(latents_config(latent_dir, "data.resolution=64"))
    with pytest.raises(DataError, match="seed: shards 0 vs config 1"):
        check_latent_config(latents_config(latent_dir, "run.seed=1"))
    with pytest.raises(DataError, match="vae.latent_channels"):
        check_latent_config(latents_config(latent_dir, "model.vae.latent_channels=8"))

    # the same names over other weights: only the digest tells, and encode_batch checks it
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in latent_dir.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tampered / MANIFEST_NAME).read_text())
    manifest["vae_sha1"] = "0" * 40
    (tampered / MANIFEST_NAME).write_text(json.dumps(manifest))
    cfg = latents_config(tampered)
    batch = next(iter(ShardLoader(cfg.data, batch_size=4)))
    with pytest.raises(DataError, match="frozen VAE weights differ"):
        build_encoders(cfg).encode_batch(batch)

    (tampered / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match="no precompute.json"):
        check_latent_config(cfg)


def test_cli_refuses_bad_requests_and_leaves_nothing_behind(latent_dir, image_shards, tmp_path, capsys):
    assert (
        precompute_main(
            ["--config", "ldm-tiny", "--images", str(image_shards), "--out", str(latent_dir), *RANDOM_PARTS]
        )
        == 2
    )
    assert "already holds shards" in capsys.readouterr().err
    assert precompute_main(["--config", "ldm-tiny-latents", "--workers", "0", *RANDOM_PARTS]) == 2
    assert "--images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shard-000000.tar").write_bytes(b"not a tar archive" * 100)
    out = tmp_path / "never"
    assert (
        precompute_main(
            ["--config", "ldm-tiny", "--workers", "0", "--images", str(broken), "--out", str(out), *RANDOM_PARTS]
        )
        == 2
    )
    assert "no usable image" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".never.partial*"))


def test_ldm_trains_from_latent_shards(ray_cluster, latent_dir, workdir):
    from t2i_dist.train import main as train_main

    Path("latents").symlink_to(latent_dir)  # a relative data.urls, as in the shipped config
    args = [
        "--config",
        "ldm-tiny-latents",
        "data.urls=latents",
        "cluster.num_workers=2",
        "deepspeed.micro_batch_size=4",
        "data.loader_workers=0",
        "run.max_steps=4",
        "run.log_every=2",
        "run.checkpoint_every=4",
        "run.sample_every=0",
        "eval.every=0",
        "run.max_failures=0",
        "model.sampling.steps=2",
        "tracking.samples_per_prompt=1",
        "run.name=from-latents",
        *RANDOM_PARTS,
    ]
    assert train_main(args) == 0
    assert list(Path("runs/from-latents").glob("checkpoint_*"))


def test_precompute_refuses_a_galip_config_and_latents_of_another_shape(latent_dir, image_shards, capsys):
    from t2i_dist.config import ConfigError

    # GALIP trains on pixels: there is nothing to precompute for it
    with pytest.raises(ConfigError, match="data.format=latents is for the ldm family"):
        check_latent_config(load_config("galip-tiny", ["data.synthesize.enabled=false", f"data.urls={latent_dir}"]))
    assert precompute_main(["--config", "galip-tiny", "--workers", "0", "--images", str(image_shards)]) == 2
    assert "galip" in capsys.readouterr().err.lower()

    # latents whose shape is not this model's are refused on the first batch, naming both shapes
    cfg = latents_config(latent_dir)
    plugin = build_encoders(cfg)
    batch = next(iter(ShardLoader(cfg.data, batch_size=4)))
    batch.latents = batch.latents[:, :, :4, :4]
    with pytest.raises(DataError, match=r"latents of shape \[4, 4, 4\] but this model works on \[4, 16, 16\]"):
        plugin.encode_batch(batch)
