"""CLIP zero-shot attribute accuracy: the caption-swap logic, scored by encoders whose answers are known."""

from __future__ import annotations

import pytest
import torch

from t2i_dist.data.synthetic import COLOURS, SHAPES
from t2i_dist.eval.clip_zero_shot import alternatives, zero_shot_accuracy

WORDS = [*COLOURS, *SHAPES]


def encode_text(captions: list[str]) -> torch.Tensor:
    """One-hot of every colour and shape word a caption names."""
    return torch.tensor([[float(word in caption.split()) for word in WORDS] for caption in captions])


def encode_image(images: torch.Tensor) -> torch.Tensor:
    """Each 'image' is (colour index, shape index): the embedding of the caption naming just those."""
    colours, shapes = list(COLOURS), list(SHAPES)
    return encode_text([f"a {colours[int(c)]} {shapes[int(s)]}" for c, s in images])


def test_alternatives_swap_the_one_named_value_and_skip_ambiguous_captions():
    texts, own = alternatives("a small red square at the top", SHAPES)  # type: ignore[misc]
    assert texts == [
        "a small red circle at the top",
        "a small red square at the top",
        "a small red triangle at the top",
    ]
    assert own == 1
    assert alternatives("a red circle above a blue square", SHAPES) is None  # two shapes: which to swap?
    assert alternatives("a large circle", tuple(COLOURS)) is None  # names no colour


def test_accuracy_counts_the_images_that_show_their_captions_attribute():
    captions = ["a red circle", "a small blue square at the top", "a red circle above a blue square"]
    # the second image shows a triangle where its caption asks for a square; the third is not judged
    images = torch.tensor([[0, 0], [2, 2], [0, 0]])
    result = zero_shot_accuracy(encode_image, encode_text, images, captions)
    assert result["colour"] == {"accuracy": 1.0, "judged": 2}
    assert result["shape"] == {"accuracy": pytest.approx(0.5), "judged": 2}


def test_captions_outside_the_synthetic_vocabulary_are_refused():
    with pytest.raises(ValueError, match="synthetic data set's captions"):
        zero_shot_accuracy(encode_image, encode_text, torch.tensor([[0, 0]]), ["a photo of a dog"])
