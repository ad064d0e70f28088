"""Text alignment on the synthetic data set: a small CNN trained on the synthetic shards' attributes
(colour, shape, size, position in each sample's json) judges whether a generated image shows what its caption
asks for.

An attribute is judged only when the caption names its value (a caption "a red circle" says nothing about
position). Two-object samples (json `relation`) are left out of training and judging: their attributes
describe only the first object. The CNN's 128-d penultimate features also give a Frechet distance of their own
(full rank with a few hundred samples, unlike Inception's 2048-d), a cheap in-domain quality signal.

Train:  python -m t2i_dist.eval.alignment --shards 'data/synth-{000..007}.tar' --out alignment.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i_dist.eval.sources import Item, SourceError, list_items, read_images

ATTRIBUTES = ("colour", "shape", "size", "position")
INPUT_SIZE = 32
FEATURE_DIM = 128


class AlignmentNet(nn.Module):
    """32x32 RGB -> 128-d features -> one softmax head per attribute. The flattened 4x4 map (no global
    pooling) keeps where things are, which position needs; batch norm lets a few hundred steps suffice."""

    def __init__(self, vocab: dict[str, list[str]]):
        super().__init__()
        self.vocab = vocab
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(values)) for name, values in vocab.items()})

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW at any size -> float 32x32 in [-1, 1]."""
        x = images.float() / 127.5 - 1
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.trunk(self.prepare(images))
        return features, {name: head(features) for name, head in self.heads.items()}


def _value(attrs: dict[str, Any], name: str) -> str | None:
    value = attrs.get(name)
    if value is None and name == "colour":
        value = attrs.get("color")
    return None if value is None else str(value)


def mentioned(caption: str | None, value: str) -> bool:
    if not caption:
        return False
    return re.search(rf"\b{re.escape(value.lower())}\b", caption.lower()) is not None


# ---------------------------------------------------------------------------------------------- training


def judgeable(item: Item) -> bool:
    return "relation" not in item.attrs and all(_value(item.attrs, a) is not None for a in ATTRIBUTES)


def _labelled(
    items: list[Item], resolution: int | None
) -> tuple[torch.Tensor, dict[str, list[str]], dict[str, torch.Tensor]]:
    usable = [it for it in items if judgeable(it)]
    if not usable:
        raise SourceError(
            "no single-object sample has colour/shape/size/position attributes in its json; the alignment "
            "classifier needs the synthetic data set's shards"
        )
    vocab = {a: sorted({cast(str, _value(it.attrs, a)) for it in usable}) for a in ATTRIBUTES}  # judgeable: all set
    images = torch.stack([img for _, img in read_images(usable, resolution)])
    labels = {a: torch.tensor([vocab[a].index(cast(str, _value(it.attrs, a))) for it in usable]) for a in ATTRIBUTES}
    return images, vocab, labels


def train_classifier(
    shards: str | list[str],
    *,
    limit: int | None = 2048,
    epochs: int = 12,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: float = 0.1,
) -> tuple[AlignmentNet, dict[str, float]]:
    """Train on the shards' images and attributes; returns the net and its held-out accuracies."""
    torch.manual_seed(seed)
    images, vocab, labels = _labelled(list_items(shards, limit), INPUT_SIZE)
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * holdout)) if n > 10 else 0
    val, train = order[:n_val], order[n_val:]
    net = AlignmentNet(vocab)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        net.train()
        for start in range(0, len(train), batch_size):
            idx = train[start : start + batch_size]
            _, logits = net(images[idx])
            loss = cast(torch.Tensor, sum(F.cross_entropy(logits[a], labels[a][idx]) for a in ATTRIBUTES))
            opt.zero_grad()
            loss.backward()
            opt.step()
        train = train[torch.randperm(len(train))]
    net.eval()
    accuracy: dict[str, float] = {}
    if n_val:
        with torch.no_grad():
            _, logits = net(images[val])
        accuracy = {a: float((logits[a].argmax(1) == labels[a][val]).float().mean()) for a in ATTRIBUTES}
    return net, accuracy


def save_classifier(net: AlignmentNet, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": net.state_dict(), "vocab": net.vocab, "info": info or {}}, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path) -> AlignmentNet:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"alignment classifier {path!r} does not exist; train one with "
            "`python -m t2i_dist.eval.alignment --shards SHARDS --out PATH`"
        )
    blob = torch.load(file, map_location="cpu", weights_only=True)
    net = AlignmentNet(blob["vocab"])
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"alignment classifier {path} does not fit this version's network ({str(exc).splitlines()[0]}); "
            "retrain it with `python -m t2i_dist.eval.alignment`"
        ) from None
    return net.eval().requires_grad_(False)


def default_classifier_path(shards: str | list[str]) -> Path:
    """Per-data-set cache location for a classifier trained on first use."""
    digest = hashlib.sha1(json.dumps(shards).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "t2i_dist" / f"alignment-{digest}.pt"


def ensure_classifier(path: str | None, shards: str | list[str]) -> Path:
    """The configured classifier, else the cached one for these shards, trained now if missing."""
    if path:
        return Path(path)
    target = default_classifier_path(shards)
    if not target.is_file():
        net, accuracy = train_classifier(shards)
        save_classifier(net, target, {"shards": shards, "holdout_accuracy": accuracy})
    return target


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class AlignmentCounts:
    """Judged and matched counts per attribute, plus samples where every named attribute matched."""

    judged: dict[str, int]
    matched: dict[str, int]

    @classmethod
    def empty(cls) -> AlignmentCounts:
        names = (*ATTRIBUTES, "all")
        return cls(dict.fromkeys(names, 0), dict.fromkeys(names, 0))

    def __add__(self, other: AlignmentCounts) -> AlignmentCounts:
        return AlignmentCounts(
            {k: self.judged[k] + other.judged[k] for k in self.judged},
            {k: self.matched[k] + other.matched[k] for k in self.matched},
        )

    def to_array(self) -> np.ndarray:
        """(2, 4) int64: judged and matched counts in the order of ATTRIBUTES, then 'all'."""
        names = (*ATTRIBUTES, "all")
        return np.array([[self.judged[n] for n in names], [self.matched[n] for n in names]], np.int64)

    @classmethod
    def from_array(cls, array: np.ndarray) -> AlignmentCounts:
        names = (*ATTRIBUTES, "all")
        judged, matched = np.asarray(array).tolist()
        return cls(dict(zip(names, map(int, judged), strict=True)), dict(zip(names, map(int, matched), strict=True)))

    def rates(self) -> dict[str, float]:
        return {k: self.matched[k] / self.judged[k] for k in self.judged if self.judged[k]}


class AlignmentScorer:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.net = load_classifier(path).to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, items: list[Item]) -> tuple[np.ndarray, AlignmentCounts]:
        """(128-d features, counts) for uint8 NCHW images generated for (or showing) `items`."""
        features, logits = self.net(images.to(self.device))
        predicted = {a: logits[a].argmax(1).cpu().tolist() for a in ATTRIBUTES}
        counts = AlignmentCounts.empty()
        for i, item in enumerate(items):
            if "relation" in item.attrs:
                continue
            all_ok, any_judged = True, False
            for a in ATTRIBUTES:
                asked = _value(item.attrs, a)
                if asked is None or not mentioned(item.caption, asked):
                    continue
                ok = self.net.vocab[a][predicted[a][i]] == asked
                counts.judged[a] += 1
                counts.matched[a] += int(ok)
                all_ok &= ok
                any_judged = True
            if any_judged:
                counts.judged["all"] += 1
                counts.matched["all"] += int(all_ok)
        return features.float().cpu().numpy(), counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the synthetic data set's alignment classifier")
    parser.add_argument("--shards", required=True, nargs="+", help="synthetic shards with json attributes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=2048, help="training samples")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net, accuracy = train_classifier(args.shards, limit=args.limit, epochs=args.epochs, seed=args.seed)
    save_classifier(net, args.out, {"shards": args.shards, "holdout_accuracy": accuracy})
    print(json.dumps({"out": args.out, "vocab": net.vocab, "holdout_accuracy": accuracy}))


if __name__ == "__main__":
    main()
