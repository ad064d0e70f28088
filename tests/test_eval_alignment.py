"""The synthetic-domain classifier: trained on real synthetic shards, it must recognise what captions ask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.eval.alignment import (
    AlignmentCounts,
    AlignmentScorer,
    judgeable,
    load_classifier,
    mentioned,
    save_classifier,
    train_classifier,
)
from t2i_dist.eval.sources import SourceError, list_items, read_images


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    write_synthetic_shards(root / "train", 512, 256, 32, seed=0)
    write_synthetic_shards(root / "heldout", 48, 48, 32, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: one thread avoids contention on a shared 2-core machine
    try:
        net, accuracy = train_classifier(str(root / "train"), limit=512, epochs=10)
    finally:
        torch.set_num_threads(threads)
    path = save_classifier(net, root / "alignment.pt", {"holdout_accuracy": accuracy})
    return {"path": path, "accuracy": accuracy, "heldout": str(root / "heldout"), "root": root}


def _score(path, items):
    scorer = AlignmentScorer(path)
    images = torch.stack([img for _, img in read_images(items, 32)])
    return scorer.score(images, items)


def test_real_images_show_what_their_captions_ask_for(classifier):
    items = list_items(classifier["heldout"])
    features, counts = _score(classifier["path"], items)
    rates = counts.rates()
    assert features.shape == (48, 128)
    assert counts.judged["all"] == sum(judgeable(it) for it in items)
    assert rates["colour"] >= 0.8 and rates["size"] >= 0.8 and rates["position"] >= 0.8
    assert rates["all"] >= 0.4


def test_images_for_other_captions_score_lower(classifier):
    items = list_items(classifier["heldout"])
    # each image paired with the next sample's caption and attributes: alignment must drop
    shifted = [
        dataclasses.replace(
            items[i], caption=items[(i + 1) % len(items)].caption, attrs=items[(i + 1) % len(items)].attrs
        )
        for i in range(len(items))
    ]
    _, right = _score(classifier["path"], items)
    _, wrong = _score(classifier["path"], shifted)
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


def test_saved_classifier_round_trips_and_bad_files_are_explained(classifier, tmp_path):
    net = load_classifier(classifier["path"])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    np.testing.assert_array_equal(
        net(x)[0].detach().numpy(), load_classifier(classifier["path"])(x)[0].detach().numpy()
    )
    with pytest.raises(FileNotFoundError, match="python -m t2i_dist.eval.alignment"):
        load_classifier(tmp_path / "missing.pt")
    blob = torch.load(classifier["path"], weights_only=True)
    blob["state_dict"]["trunk.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="retrain"):
        load_classifier(tmp_path / "other.pt")


def test_training_needs_attribute_json(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(SourceError, match="synthetic"):
        train_classifier(str(tmp_path), epochs=1)
