"""Whether a CLIP tells an attribute apart, zero-shot, on the synthetic shapes: for each image, does the CLIP rank
its own caption above copies with the attribute's other values ("a red circle" against "a red square", "a red
triangle")? On real images it says whether the CLIP can tell the attribute at all; on a generator's images, beside
the alignment probe's figure, how much of a CLIP objective the generator meets with cues the probe does not see.

Command line (real images, or a checkpoint's for the same captions): python -m t2i_dist.zero_shot --help
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from t2i_dist.data.synthetic import COLOURS, SHAPES

VOCABULARIES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES}
Encoder = Callable[..., torch.Tensor]
ENCODE_BATCH = 64  # images per encode_image call: bounded memory for a large CLIP


def alternatives(caption: str, vocabulary: tuple[str, ...]) -> tuple[list[str], int] | None:
    """The caption with each of the vocabulary's words in place of the one it names, and which is its own;
    None when it names none or several (two-object captions: the swap would be ambiguous)."""
    words = caption.split()
    named = [i for i, word in enumerate(words) if word in vocabulary]
    if len(named) != 1:
        return None
    at = named[0]
    return [" ".join([*words[:at], value, *words[at + 1 :]]) for value in vocabulary], vocabulary.index(words[at])


@torch.no_grad()
def zero_shot_accuracy(
    encode_image: Encoder, encode_text: Encoder, images: torch.Tensor, captions: list[str]
) -> dict[str, dict[str, float]]:
    """Per attribute: the fraction of judgeable images whose own caption scores highest, and how many were
    judged. `images` are what `encode_image` takes; both encoders return one embedding per row."""
    swaps = {a: [alternatives(c, vocabulary) for c in captions] for a, vocabulary in VOCABULARIES.items()}
    if not any(swap for per_caption in swaps.values() for swap in per_caption):
        raise ValueError(
            "no caption names exactly one of the synthetic shapes' colours or shapes "
            f"({', '.join(w for v in VOCABULARIES.values() for w in v)}): give the synthetic data set's captions"
        )
    chunks = [encode_image(chunk).float() for chunk in images.split(ENCODE_BATCH)]
    image_features = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
    result = {}
    for attribute, per_caption in swaps.items():
        hits = []
        for features, swap in zip(image_features, per_caption, strict=True):
            if swap is None:
                continue
            texts, own = swap
            text_features = torch.nn.functional.normalize(encode_text(texts).float(), dim=-1)
            hits.append(int((text_features @ features).argmax()) == own)
        result[attribute] = {"accuracy": sum(hits) / len(hits) if hits else float("nan"), "judged": len(hits)}
    return result
