"""FID fanned out over Ray: K-independence, self-distance, agreement with torchmetrics, the folder-mode CLI
and its errors on bad input."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from t2i_dist.data.synthetic import render_sample, write_synthetic_shards
from t2i_dist.eval.fanout import ImageReader, fan_out_ray, split_contiguous
from t2i_dist.eval.inception import ExtractorSpec, InceptionExtractor
from t2i_dist.eval.metrics import MetricSpec
from t2i_dist.eval.sources import SourceError, list_items, read_images
from t2i_dist.eval.stats import frechet_distance
from t2i_dist.evaluate import main as evaluate_main

pytestmark = pytest.mark.slow
N = 16
RES = 32


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Real: synthetic shards (2 shards of 8). Fake: a folder of PNGs from another seed, slightly noisy."""
    root = tmp_path_factory.mktemp("eval-sets")
    real = write_synthetic_shards(root / "real", N, 8, RES, seed=0)
    fake_dir = root / "fake"
    fake_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        image, _ = render_sample(i, RES, seed=1)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 21, (RES, RES, 3)), 0, 255).astype(np.uint8)
        from PIL import Image

        Image.fromarray(noisy).save(fake_dir / f"{i:04d}.png")
    return {"real": str(root / "real"), "real_shards": real, "fake": str(fake_dir), "root": root}


@pytest.fixture(scope="module")
def spec() -> MetricSpec:
    return MetricSpec(ExtractorSpec(batch_size=8), resolution=RES)


@pytest.fixture(scope="module")
def partials(ray_cluster, image_sets, spec):
    reader = ImageReader(RES, batch_size=8)
    out = {}
    for name in ("real", "fake"):
        items = list_items(image_sets[name])
        out[name] = {k: fan_out_ray(reader, items, spec, k) for k in (1, 2)}
    return out


def test_split_contiguous_covers_items_in_order():
    chunks = split_contiguous(list(range(7)), 3)
    assert chunks == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_contiguous([1], 2) == [[1], []]


def test_sources_list_shards_and_folders_in_order(image_sets):
    real = list_items(image_sets["real"])
    assert [it.index for it in real] == list(range(N))
    assert [it.key for it in real] == [f"{i:08d}" for i in range(N)]
    assert all(it.caption and it.attrs.get("colour") for it in real)
    assert len(list_items(image_sets["real"], 5)) == 5
    fake = list_items(image_sets["fake"])
    assert [it.key for it in fake] == [f"{i:04d}.png" for i in range(N)]
    ((_, image),) = read_images(real[3:4], RES)
    expected, _ = render_sample(3, RES, seed=0)
    assert torch.equal(image, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))


def test_fid_over_two_workers_equals_fid_over_one(partials):
    real, fake = partials["real"], partials["fake"]
    assert real[1].count == real[2].count == N
    np.testing.assert_array_equal(fake[2].indices, np.arange(N))
    fid1 = frechet_distance(fake[1].inception, real[1].inception)
    fid2 = frechet_distance(fake[2].inception, real[2].inception)
    assert fid1 > 1.0
    assert fid2 == pytest.approx(fid1, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero(partials):
    real = partials["real"]
    assert frechet_distance(real[1].inception, real[2].inception) == pytest.approx(0.0, abs=1e-6)


def test_fid_agrees_with_torchmetrics_on_the_same_features(partials, image_sets):
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = InceptionExtractor(ExtractorSpec(batch_size=8))

    class Features(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(extractor.features(images)).double()

    metric = FrechetInceptionDistance(feature=Features())
    for name, real in (("real", True), ("fake", False)):
        images = torch.stack([img for _, img in read_images(list_items(image_sets[name]), RES)])
        metric.update(images, real=real)
    ours = frechet_distance(partials["fake"][1].inception, partials["real"][1].inception)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a general 2048x2048 eigvals: one thread is far faster on a shared 2-core box
    try:
        theirs = float(metric.compute())
    finally:
        torch.set_num_threads(threads)
    assert theirs == pytest.approx(ours, rel=1e-4)


def test_folder_mode_cli_prints_one_json_line(ray_cluster, image_sets, capsys):
    code = evaluate_main(
        [
            "--real",
            image_sets["real"],
            "--fake",
            image_sets["fake"],
            "--workers",
            "2",
            "--resolution",
            str(RES),
            "--batch-size",
            "8",
            "--reference-cache",
            str(image_sets["root"] / "cache"),
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["num_real"] == result["num_fake"] == N
    assert result["fid"] > 1.0 and result["fid_rank_deficient"] is True
    assert "kid" in result
    assert result["extractor"]["sha1"] == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert result["extractor"]["resize"] == "clean"
    assert "is" in result["unavailable"] and "clip_score" in result["unavailable"]
    cached = list((image_sets["root"] / "cache").glob("*.npz"))
    assert len(cached) == 1 and f"{RES}px-n{N}" in cached[0].name
    written = cached[0].stat().st_mtime_ns
    # a second run reads the cached real statistics (the file is not rewritten) and gives the same number
    evaluate_main(
        [
            "--real",
            image_sets["real"],
            "--fake",
            image_sets["fake"],
            "--workers",
            "1",
            "--resolution",
            str(RES),
            "--reference-cache",
            str(image_sets["root"] / "cache"),
        ]
    )
    again = json.loads(capsys.readouterr().out.strip())
    assert again["reference_cache"] == result["reference_cache"]
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-6)
    assert cached[0].stat().st_mtime_ns == written
    # the cache is what is used: with the fake set's statistics put under the real set's key, the fake set
    # is compared with itself
    other = image_sets["root"] / "cache-of-fake"
    evaluate_main(
        [
            "--real",
            image_sets["fake"],
            "--fake",
            image_sets["fake"],
            "--workers",
            "0",
            "--resolution",
            str(RES),
            "--reference-cache",
            str(other),
        ]
    )
    capsys.readouterr()
    [fake_stats] = other.glob("*.npz")
    cached[0].write_bytes(fake_stats.read_bytes())
    evaluate_main(
        [
            "--real",
            image_sets["real"],
            "--fake",
            image_sets["fake"],
            "--workers",
            "0",
            "--resolution",
            str(RES),
            "--reference-cache",
            str(image_sets["root"] / "cache"),
        ]
    )
    tampered = json.loads(capsys.readouterr().out.strip())
    assert tampered["fid"] < 1e-3 * result["fid"], (tampered["fid"], result["fid"])


def _error_of(argv: list[str], capsys) -> str:
    code = evaluate_main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    return captured.err


def test_bad_inputs_fail_with_clear_errors(image_sets, tmp_path, capsys):
    real, fake = image_sets["real"], image_sets["fake"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "shard-000000.tar", "w"):
        pass
    assert "no samples with an image" in _error_of(["--real", real, "--fake", str(empty)], capsys)
    assert "does not exist" in _error_of(["--real", real, "--fake", str(tmp_path / "missing")], capsys)
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"x")
    assert "sha1" in _error_of(["--real", real, "--fake", fake, "--inception", str(bad)], capsys)
    assert "eval.inception_path" in _error_of(
        ["--real", real, "--fake", fake, "--inception", str(tmp_path / "no.pt")], capsys
    )
    assert "at least 2" in _error_of(["--real", real, "--fake", fake, "--num-samples", "1", "--workers", "0"], capsys)
    # caption shards without captions cannot drive generation
    with pytest.raises(SourceError, match="no caption"):
        list_items(fake, need_captions=True)
