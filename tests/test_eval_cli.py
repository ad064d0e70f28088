"""The evaluate command without Ray: protocols, argument errors, and one run over S3 shards (a real moto
server) with every optional metric configured: IS from a classifier head, CLIP score, KID, an S3 cache."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.evaluate import load_protocol, main, shipped_protocols
from t2i_dist.models.clip import load_clip
from t2i_dist.models.component_config import ClipConfig


def test_shipped_protocols_load():
    assert {"coco5k-128", "coco30k-256", "synthetic-tiny"} <= set(shipped_protocols())
    study = load_protocol("coco5k-128")
    assert (study.num_samples, study.resolution, study.require_full_rank) == (5000, 128, True)
    common = load_protocol("coco30k-256")
    assert (common.num_samples, common.resolution) == (30000, 256)
    with pytest.raises(SystemExit, match="unknown protocol 'coco1k'.*coco5k-128"):
        load_protocol("coco1k")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--real", "a"], "either --fake"),
        (["--fake", "b"], "--fake needs --real"),
        (["--checkpoint", "c"], "needs --captions"),
        (["--real", "a", "--fake", "b", "--checkpoint", "c"], "either --fake"),
    ],
)
def test_argument_errors_name_the_fix(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_missing_checkpoint_is_explained(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--captions", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_sample_counts_are_checked_before_any_image_is_processed(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "set", 6, 6, 32, seed=0)
    source = str(tmp_path / "set")
    assert main(["--real", source, "--fake", source, "--num-samples", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    # the study protocol asks for a full-rank covariance: 6 images cannot give one
    assert main(["--real", source, "--fake", source, "--protocol", "coco5k-128"]) == 2
    assert "more than 2048 images" in capsys.readouterr().err


def test_s3_shards_with_every_metric(s3_env, tmp_path, capsys):
    write_synthetic_shards(tmp_path / "real", 10, 5, 32, seed=0)
    write_synthetic_shards(tmp_path / "fake", 10, 10, 32, seed=3)
    real = s3_env.upload_dir(tmp_path / "real", "eval-data", "real")
    fake = s3_env.upload_dir(tmp_path / "fake", "eval-data", "fake")
    head = tmp_path / "inception-full.pth"
    torch.save({"fc.weight": torch.randn(1008, 2048) * 0.02}, head)
    clip = tmp_path / "tiny-clip.pt"
    torch.save(load_clip(ClipConfig()).state_dict(), clip)
    argv = ["--real", real, "--fake", fake, "--workers", "0", "--batch-size", "10",
            "--inception-head", str(head), "--clip-model", "t2i-tiny-clip", "--clip-weights", str(clip),
            "--reference-cache", "s3://eval-data/refs", "--protocol", "synthetic-tiny"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_real"] == result["num_fake"] == 10
    assert result["protocol"] == "synthetic-tiny" and result["resolution"] == 32
    assert result["is"] >= 1.0 and result["real"]["is"] >= 1.0  # exp(KL) is at least 1
    assert 0 <= result["clip_score"] <= 100
    assert "kid" in result
    assert set(result["unavailable"]) == {"alignment"}  # no classifier given in folder mode
    assert result["reference_cache"].startswith("s3://eval-data/refs/")
    listed = s3_env.client().list_objects_v2(Bucket="eval-data", Prefix="refs/")["Contents"]
    assert [o["Key"] for o in listed] == [result["reference_cache"].removeprefix("s3://eval-data/")]
