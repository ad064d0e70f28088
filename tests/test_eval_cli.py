"""The evaluate command without Ray: protocols, argument errors, and one run over S3 shards (a real moto
server) with every optional metric configured: IS from a classifier head, CLIP score, KID, an S3 cache."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_dist.config import ClipConfig
from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.evaluate import load_protocol, main, shipped_protocols
from t2i_dist.models.clip.encoders import load_clip


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


def _independent_metrics(real_dir, fake_dir, head_path, clip_path, splits: int) -> dict[str, float]:
    """FID, KID and IS computed here from the same images' Inception features, by other formulas than the
    package's: FID through the small Gram matrices (exact for fewer images than feature dimensions), KID as
    the unbiased MMD over all samples, IS from softmax logits split by index, CLIP score through
    open_clip's forward."""
    import numpy as np

    from t2i_dist.eval.inception import ExtractorSpec, InceptionExtractor
    from t2i_dist.eval.sources import list_items, read_images

    extractor = InceptionExtractor(ExtractorSpec(head_path=str(head_path)))

    def features(directory) -> np.ndarray:
        images = [img for _, img in read_images(list_items(str(directory)), 32)]
        return extractor.features(images).astype(np.float64)

    real, fake = features(real_dir), features(fake_dir)
    xr, xf = real - real.mean(0), fake - fake.mean(0)
    nr, nf = len(real), len(fake)
    # eigenvalues of C_r C_f equal those of (X_f X_r^T X_r X_f^T) / ((nr-1)(nf-1)), an nf x nf matrix
    small = xf @ xr.T @ xr @ xf.T / ((nr - 1) * (nf - 1))
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(small).real, 0, None)).sum()
    fid = (
        ((real.mean(0) - fake.mean(0)) ** 2).sum()
        + (xr**2).sum() / (nr - 1)
        + (xf**2).sum() / (nf - 1)
        - 2 * trace_sqrt
    )
    d = real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(fake, fake), k(real, real), k(fake, real)
    kid = (kxx.sum() - np.trace(kxx)) / (nf * (nf - 1)) + (kyy.sum() - np.trace(kyy)) / (nr * (nr - 1)) - 2 * kxy.mean()
    head = torch.load(head_path)["fc.weight"].double().numpy()
    logits = fake @ head.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(0)
        scores.append(np.exp((part * (np.log(part) - np.log(marginal))).sum(1).mean()))
    # CLIP score through open_clip's own forward (it normalises both embeddings itself)
    model = load_clip(ClipConfig(pretrained=str(clip_path)))
    items = list_items(str(fake_dir), need_captions=True)
    pixels = torch.stack([img for _, img in read_images(items, 32)]).float() / 255
    pre = model.visual.preprocess_cfg
    pixels = torch.nn.functional.interpolate(
        pixels,
        size=(pre["size"],) * 2 if isinstance(pre["size"], int) else tuple(pre["size"]),
        mode="bicubic",
        antialias=True,
    ).clamp(0, 1)
    pixels = (pixels - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    import open_clip

    with torch.no_grad():
        image_emb, text_emb, _ = model(pixels, open_clip.get_tokenizer("t2i-tiny-clip")([i.caption for i in items]))
    clip_score = float((100 * (image_emb * text_emb).sum(-1).clamp(min=0)).mean())
    return {"fid": float(fid), "kid": float(kid), "is": float(np.mean(scores)), "clip_score": clip_score}


def test_s3_shards_with_every_metric(s3_env, tmp_path, capsys):
    write_synthetic_shards(tmp_path / "real", 20, 10, 32, seed=0)
    write_synthetic_shards(tmp_path / "fake", 20, 20, 32, seed=3)
    real = s3_env.upload_dir(tmp_path / "real", "eval-data", "real")
    fake = s3_env.upload_dir(tmp_path / "fake", "eval-data", "fake")
    head = tmp_path / "inception-full.pth"
    torch.save({"fc.weight": torch.randn(1008, 2048) * 0.02}, head)
    clip = tmp_path / "tiny-clip.pt"
    torch.save(load_clip(ClipConfig()).state_dict(), clip)
    argv = [
        "--real",
        real,
        "--fake",
        fake,
        "--workers",
        "0",
        "--batch-size",
        "10",
        "--inception-head",
        str(head),
        "--clip-model",
        "t2i-tiny-clip",
        "--clip-weights",
        str(clip),
        "--reference-cache",
        "s3://eval-data/refs",
        "--protocol",
        "synthetic-tiny",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_real"] == result["num_fake"] == 20
    assert result["protocol"] == "synthetic-tiny" and result["resolution"] == 32
    # 20 images in the protocol's 10 splits: 2 per split, so IS is not 1 by construction
    expected = _independent_metrics(tmp_path / "real", tmp_path / "fake", head, clip, splits=10)
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    # KID is a small difference of O(1) kernel means: float32 feature noise of ~1e-8 there is ~1e-6 of KID; a
    # wrong estimator (biased, subsets mis-drawn) moves it by percents
    assert result["kid"] == pytest.approx(expected["kid"], rel=1e-4)
    assert result["is"] == pytest.approx(expected["is"], rel=1e-6)
    assert result["is"] > 1.0001  # distinct predictions within a split
    assert result["clip_score"] == pytest.approx(expected["clip_score"], rel=1e-4, abs=1e-4)
    assert set(result["unavailable"]) == {"alignment"}  # no classifier given in folder mode
    assert result["reference_cache"].startswith("s3://eval-data/refs/")
    listed = s3_env.client().list_objects_v2(Bucket="eval-data", Prefix="refs/")["Contents"]
    assert [o["Key"] for o in listed] == [result["reference_cache"].removeprefix("s3://eval-data/")]


def test_alignment_is_printed_beside_the_real_images(monkeypatch, capsys):
    import t2i_dist.evaluate as evaluate_module

    result = {
        "fid": 41.23,
        "alignment": 0.1,
        "alignment/colour": 0.42,
        "alignment/shape": 0.3,
        "alignment_fid": 3.5,
        "real": {"alignment": 0.97, "alignment/colour": 1.0, "alignment/shape": 0.99},
        "num_fake": 256,
        "num_real": 256,
    }
    monkeypatch.setattr(evaluate_module, "evaluate", lambda args: result)
    assert main(["--real", "a", "--fake", "b"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == result  # stdout stays one JSON line
    assert err.strip() == (
        "fid 41.23 · alignment_fid 3.5 · alignment colour 0.42 (real 1.00) · shape 0.30 (real 0.99) · "
        "all four 0.10 (real 0.97) · 256 generated, 256 real images"
    )


def test_training_says_its_evaluation_in_the_same_line():
    from t2i_dist.eval.summary import result_of_logged, summary_line

    logged = {
        "eval/fid": 41.23,
        "eval/alignment_fid": 3.5,
        "eval/alignment/colour": 0.42,
        "eval/alignment/shape": 0.3,
        "eval/alignment": 0.1,
        "eval/real/alignment/colour": 1.0,
        "eval/real/alignment/shape": 0.99,
        "eval/real/alignment": 0.97,
        "eval/num_samples": 256.0,
        "loss": 0.3,
    }
    assert summary_line(result_of_logged(logged)) == (
        "fid 41.23 · alignment_fid 3.5 · alignment colour 0.42 (real 1.00) · shape 0.30 (real 0.99) · "
        "all four 0.10 (real 0.97) · 256 generated, 256 real images"
    )
