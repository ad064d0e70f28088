"""The synthetic-domain classifier: trained on real synthetic shards, it must recognise what captions ask, train
to the same weights in any process, be cached by content, and be refused when it cannot be trusted."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.eval.alignment import (
    ATTRIBUTES,
    MIN_ACCURACY,
    MIN_HELD_OUT,
    AlignmentCounts,
    AlignmentScorer,
    TrainSettings,
    UnreliableClassifierError,
    judgeable,
    load_classifier,
    mentioned,
    save_classifier,
    train_classifier,
)
from t2i_dist.eval.alignment_cache import default_classifier_path, ensure_classifier
from t2i_dist.eval.sources import SourceError, list_items, read_images

TINY = TrainSettings(epochs=2)  # a quick run: these tests need its weights and its record, not its accuracy


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("alignment-heldout")
    write_synthetic_shards(root, 48, 48, 32, seed=7)  # another seed than the probe's training set
    return str(root)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("alignment-tiny")
    write_synthetic_shards(root, 64, 32, 32, seed=0)
    return str(root)


def _score(path, items):
    scorer = AlignmentScorer(path)
    images = torch.stack([img for _, img in read_images(items, 32)])
    return scorer.score(images, items)


def test_probe_reaches_the_bar_on_a_big_enough_set(alignment_probe):
    info = torch.load(alignment_probe, weights_only=True)["info"]
    assert set(info["holdout_accuracy"]) == set(ATTRIBUTES)
    assert min(info["holdout_accuracy"].values()) >= MIN_ACCURACY, info
    assert info["held_out"] >= MIN_HELD_OUT
    assert info["seconds"] < 120  # measured ~15 s on a shared 2-core machine


def test_real_images_show_what_their_captions_ask_for(alignment_probe, heldout):
    items = list_items(heldout)
    features, counts = _score(alignment_probe, items)
    rates = counts.rates()
    assert features.shape == (48, 128)
    assert counts.judged["all"] == sum(judgeable(it) for it in items)
    assert min(rates[a] for a in ATTRIBUTES) >= 0.9, rates
    assert rates["all"] >= 0.8


def test_images_for_other_captions_score_lower(alignment_probe, heldout):
    items = list_items(heldout)
    # each image paired with the next sample's caption and attributes: alignment must drop
    shifted = [
        dataclasses.replace(
            items[i], caption=items[(i + 1) % len(items)].caption, attrs=items[(i + 1) % len(items)].attrs
        )
        for i in range(len(items))
    ]
    _, right = _score(alignment_probe, items)
    _, wrong = _score(alignment_probe, shifted)
    assert wrong.rates()["colour"] < right.rates()["colour"] - 0.3


def test_only_named_attributes_are_judged():
    assert mentioned("a small red circle at the top left", "top left")
    assert not mentioned("a small red circle", "top left")
    assert not mentioned("a reddish circle", "red")


def test_counts_merge_and_round_trip():
    a = AlignmentCounts(
        {"colour": 2, "shape": 1, "size": 0, "position": 1, "all": 2},
        {"colour": 1, "shape": 1, "size": 0, "position": 0, "all": 0},
    )
    b = AlignmentCounts.from_array(a.to_array())
    assert b == a
    assert (a + b).rates()["colour"] == pytest.approx(0.5)
    assert "size" not in a.rates()


def test_saved_classifier_round_trips_and_bad_files_are_explained(alignment_probe, tmp_path):
    net = load_classifier(alignment_probe)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    np.testing.assert_array_equal(net(x)[0].detach().numpy(), load_classifier(alignment_probe)(x)[0].detach().numpy())
    with pytest.raises(FileNotFoundError, match="python -m t2i_dist.eval.alignment"):
        load_classifier(tmp_path / "missing.pt")
    blob = torch.load(alignment_probe, weights_only=True)
    blob["state_dict"]["trunk.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="retrain"):
        load_classifier(tmp_path / "other.pt")


def test_training_needs_attribute_json(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(SourceError, match="synthetic"):
        train_classifier(str(tmp_path), TINY)


DETERMINISM_SCRIPT = """
import sys, torch
from t2i_dist.eval.alignment import TrainSettings, train_classifier
torch.set_num_threads(2)
torch.manual_seed(1234)
net, _ = train_classifier(sys.argv[1], TrainSettings(epochs=2))
torch.save(net.state_dict(), sys.argv[2])
"""


def test_training_gives_the_same_weights_in_any_process(tiny_set, tmp_path):
    before = torch.get_rng_state()
    first, _ = train_classifier(tiny_set, TINY)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is neither used nor reseeded
    torch.manual_seed(99)
    second, _ = train_classifier(tiny_set, TINY)
    out = tmp_path / "weights.pt"
    subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, tiny_set, str(out)], check=True, timeout=300)
    other = torch.load(out, weights_only=True)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
        assert torch.equal(value, other[name]), name


def test_a_classifier_trained_on_a_tiny_set_is_refused(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UnreliableClassifierError) as refused:
        ensure_classifier(None, tiny_set)
    message = str(refused.value)
    # names the attribute(s), their accuracy, the samples it trained on and the fix
    assert re.search(r"held-out accuracy (colour|shape|size|position) 0\.\d\d.* is below 0\.95", message), message
    assert re.search(r"trained on \d+ samples of the \d+ judgeable", message), message
    assert "held out (at least 100" in message
    assert "data.synthesize.num_samples >= 4096" in message and "--alignment-classifier" in message
    assert not default_classifier_path(tiny_set).exists()  # a refused classifier is never cached


def test_loading_refuses_a_low_recorded_accuracy_and_warns_without_one(tiny_set, tmp_path, caplog):
    net, info = train_classifier(tiny_set, TINY)
    low = {**info, "holdout_accuracy": {**info["holdout_accuracy"], "colour": 0.24}}
    save_classifier(net, tmp_path / "low.pt", low)
    with pytest.raises(UnreliableClassifierError, match=r"low\.pt is refused: .*colour 0\.24.*--alignment-classifier"):
        load_classifier(tmp_path / "low.pt")
    with pytest.raises(UnreliableClassifierError, match="colour 0.24"):
        ensure_classifier(str(tmp_path / "low.pt"), tiny_set)
    save_classifier(net, tmp_path / "user.pt")  # a classifier of the user's, without a training record
    with caplog.at_level(logging.WARNING, logger="t2i_dist.eval.alignment"):
        load_classifier(tmp_path / "user.pt")
    assert "records no held-out accuracy" in caplog.text


def test_cache_key_follows_content_not_spelling(alignment_probe, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    files = write_synthetic_shards(tmp_path / "data" / "synthetic", 16, 8, 32, seed=0)
    spellings = [
        "data/synthetic",
        "./data/synthetic",
        str(tmp_path / "data" / "synthetic"),
        "data/synthetic/*.tar",
        [str(tmp_path / "data" / "synthetic" / f.rsplit("/", 1)[-1]) for f in files],
    ]
    key = default_classifier_path("data/synthetic")
    assert all(default_classifier_path(s) == key for s in spellings)
    shutil.copytree(tmp_path / "data" / "synthetic", tmp_path / "copy")
    assert default_classifier_path("copy") == key  # the same bytes elsewhere
    assert default_classifier_path("data/synthetic", TrainSettings(epochs=11)) != key
    # a relative and an absolute spelling share one cached file: the second finds the first's
    key.parent.mkdir(parents=True)
    shutil.copy(alignment_probe, key)
    assert ensure_classifier(None, str(tmp_path / "data" / "synthetic")) == key
    assert ensure_classifier(None, "data/synthetic") == key
    write_synthetic_shards(tmp_path / "other", 16, 8, 32, seed=1)
    shutil.rmtree(tmp_path / "data" / "synthetic")
    shutil.copytree(tmp_path / "other", tmp_path / "data" / "synthetic")
    assert default_classifier_path("data/synthetic") != key  # rewritten shards: another classifier


def test_cache_key_of_s3_shards_follows_their_objects(s3_env, tmp_path):
    write_synthetic_shards(tmp_path / "a", 16, 8, 32, seed=0)
    write_synthetic_shards(tmp_path / "b", 16, 8, 32, seed=1)
    first = s3_env.upload_dir(tmp_path / "a", "alignment-keys", "first")
    again = s3_env.upload_dir(tmp_path / "a", "alignment-keys", "again")
    other = s3_env.upload_dir(tmp_path / "b", "alignment-keys", "other")
    assert default_classifier_path(first) == default_classifier_path(again)
    assert default_classifier_path(other) != default_classifier_path(first)
