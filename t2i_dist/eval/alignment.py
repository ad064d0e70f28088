"""Text alignment on the synthetic data set: a small CNN trained on the synthetic shards' attributes
(colour, shape, size, position in each sample's json) judges whether a generated image shows what its caption
asks for.

An attribute is judged only when the caption names its value (a caption "a red circle" says nothing about
position). Two-object samples (json `relation`) are left out of training and judging: their attributes
describe only the first object. The CNN's 128-d penultimate features also give a Frechet distance of their own
(full rank with a few hundred samples, unlike Inception's 2048-d), a cheap in-domain quality signal.

Training is deterministic (its own generator, one thread): the same shards give bit-identical weights in any
process. A classifier below MIN_ACCURACY held-out accuracy on any attribute is refused, when trained and when
loaded: its figures would be noise. One trained on first use is cached under ~/.cache/t2i_dist, keyed by the
shards' contents and the training settings (t2i_dist.eval.alignment_cache).

Train:  python -m t2i_dist.eval.alignment --shards 'data/synth-{000..007}.tar' --out alignment.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i_dist.config import S3Section
from t2i_dist.eval.sources import Item, SourceError, list_items, read_images

ATTRIBUTES = ("colour", "shape", "size", "position")
INPUT_SIZE = 32
FEATURE_DIM = 128
FORMAT_VERSION = 2  # part of the cache key: bump when the network or its training change
MIN_ACCURACY = 0.95  # held-out accuracy every attribute needs before the classifier's judgements count
MIN_HELD_OUT = 100  # fewer held-out samples cannot measure that accuracy
SUGGESTED_SAMPLES = 4096  # the default data.synthesize.num_samples: 1.00 on every attribute (1536 suffice)

log = logging.getLogger(__name__)


class UnreliableClassifierError(ValueError):
    """An alignment classifier whose held-out accuracy is too low (or measured on too few samples) to trust."""


@dataclass(frozen=True)
class TrainSettings:
    """Probe training, part of the cache key. The default: 25-30 s on one CPU thread, 1.00 on every attribute."""

    limit: int | None = 4096
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    holdout: float = 0.1


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

    @classmethod
    def empty(cls, vocab: dict[str, list[str]]) -> AlignmentNet:
        """Uninitialised weights (batch norm reset), built without drawing from torch's global generator."""
        with torch.device("meta"):
            net = cls(vocab)
        net.to_empty(device="cpu")
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        return net

    def initialise(self, generator: torch.Generator) -> AlignmentNet:
        """PyTorch's default init for conv and linear layers, drawn from `generator`."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(cast(torch.Tensor, module.bias), -bound, bound, generator=generator)  # all have one
        return self

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW at any size -> float 32x32 in [-1, 1]."""
        x = images.float() / 127.5 - 1
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features and per-attribute logits of prepared images."""
        features = self.trunk(x)
        return features, {name: head(features) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.classify(self.prepare(images))


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
    items: list[Item], resolution: int | None, s3: S3Section | None
) -> tuple[torch.Tensor, dict[str, list[str]], dict[str, torch.Tensor]]:
    usable = [it for it in items if judgeable(it)]
    if not usable:
        raise SourceError(
            "no single-object sample has colour/shape/size/position attributes in its json; the alignment "
            "classifier needs the synthetic data set's shards"
        )
    vocab = {a: sorted({cast(str, _value(it.attrs, a)) for it in usable}) for a in ATTRIBUTES}  # judgeable: all set
    images = torch.stack([img for _, img in read_images(usable, resolution, s3)])
    labels = {a: torch.tensor([vocab[a].index(cast(str, _value(it.attrs, a))) for it in usable]) for a in ATTRIBUTES}
    return images, vocab, labels


@contextmanager
def _one_thread() -> Iterator[None]:
    """A tiny CNN: one thread was faster than two on a shared 2-core machine (13 s against 212 s), and a fixed
    thread count keeps the summation order, hence the weights, the same in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(
    shards: str | list[str], settings: TrainSettings | None = None, *, s3: S3Section | None = None
) -> tuple[AlignmentNet, dict[str, Any]]:
    """Train on the shards' images and attributes; returns the net and its record (held-out accuracy per
    attribute, sample counts, settings, seconds). Every draw comes from one seeded generator."""
    settings = settings or TrainSettings()
    started = time.perf_counter()
    items = list_items(shards, settings.limit, s3=s3)
    images, vocab, labels = _labelled(items, INPUT_SIZE, s3)
    x = AlignmentNet.prepare(images)
    n = len(x)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=generator)
    n_val = max(int(n * settings.holdout), min(MIN_HELD_OUT, n // 2))
    val, train = order[:n_val], order[n_val:]
    batches = math.ceil(len(train) / settings.batch_size)
    with _one_thread():
        net = AlignmentNet.empty(vocab).initialise(generator)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
        # one-cycle: warm up, then anneal; a constant rate left colour at 0.6 on 800 samples
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=settings.lr, total_steps=max(1, settings.epochs * batches)
        )
        net.train()
        for _ in range(settings.epochs):
            shuffled = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(shuffled), settings.batch_size):
                idx = shuffled[start : start + settings.batch_size]
                _, logits = net.classify(x[idx])
                loss = cast(torch.Tensor, sum(F.cross_entropy(logits[a], labels[a][idx]) for a in ATTRIBUTES))
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
        net.eval()
        with torch.no_grad():
            _, logits = net.classify(x[val])
    accuracy = {a: float((logits[a].argmax(1) == labels[a][val]).float().mean()) for a in ATTRIBUTES} if n_val else {}
    info = {
        "format": FORMAT_VERSION,
        "holdout_accuracy": accuracy,
        "train_samples": len(train),
        "held_out": n_val,
        "judgeable": n,
        "read": len(items),
        "settings": dataclasses.asdict(settings),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return net.requires_grad_(False), info


def refusal(info: dict[str, Any]) -> str | None:
    """Why a classifier with this training record cannot be trusted, or None."""
    accuracy: dict[str, float] = info.get("holdout_accuracy") or {}
    low = {a: v for a, v in accuracy.items() if v < MIN_ACCURACY}
    held_out = info.get("held_out", 0 if not accuracy else None)
    few = held_out is not None and held_out < MIN_HELD_OUT
    if not low and not few:
        return None
    reasons = []
    if low:
        figures = ", ".join(f"{a} {v:.2f}" for a, v in low.items())
        reasons.append(f"held-out accuracy {figures} is below {MIN_ACCURACY:.2f}")
    if few:
        reasons.append(f"only {held_out} samples were held out (at least {MIN_HELD_OUT} are needed to measure it)")
    samples = info.get("train_samples", "an unknown number of")
    judged = f" of the {info['judgeable']} judgeable single-object ones" if "judgeable" in info else ""
    return (
        f"{'; '.join(reasons)}. It trained on {samples} samples{judged}: its alignment figures would be noise. "
        f"Train it on more samples (data.synthesize.num_samples >= {SUGGESTED_SAMPLES}, or --captions naming a "
        "larger synthetic set), or pass a trained classifier with --alignment-classifier / eval.alignment_classifier"
    )


def check_reliable(info: dict[str, Any], what: str) -> None:
    reason = refusal(info)
    if reason:
        raise UnreliableClassifierError(f"{what} is refused: {reason}")


def save_classifier(net: AlignmentNet, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes that train at once never share one
    torch.save({"state_dict": net.state_dict(), "vocab": net.vocab, "info": info or {}}, tmp)
    tmp.replace(path)
    return path


_unchecked_warned: set[str] = set()


def load_classifier(path: str | Path) -> AlignmentNet:
    """The saved classifier; refused when its recorded held-out accuracy is below the bar."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"alignment classifier {path!r} does not exist; train one with "
            "`python -m t2i_dist.eval.alignment --shards SHARDS --out PATH`"
        )
    blob = torch.load(file, map_location="cpu", weights_only=True)
    info = blob.get("info") or {}
    if "holdout_accuracy" in info:
        check_reliable(info, f"alignment classifier {path}")
    elif str(file) not in _unchecked_warned:
        _unchecked_warned.add(str(file))
        log.warning("alignment classifier %s records no held-out accuracy: its judgements are unchecked", path)
    net = AlignmentNet.empty(blob["vocab"])
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"alignment classifier {path} does not fit this version's network ({str(exc).splitlines()[0]}); "
            "retrain it with `python -m t2i_dist.eval.alignment`"
        ) from None
    return net.eval().requires_grad_(False)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the synthetic data set's alignment classifier")
    parser.add_argument("--shards", required=True, nargs="+", help="synthetic shards with json attributes")
    parser.add_argument("--out", required=True)
    default = TrainSettings()
    parser.add_argument("--limit", type=int, default=default.limit, help="samples read (two-object ones are skipped)")
    parser.add_argument("--epochs", type=int, default=default.epochs)
    parser.add_argument("--seed", type=int, default=default.seed)
    args = parser.parse_args(argv)
    settings = TrainSettings(limit=args.limit, epochs=args.epochs, seed=args.seed)
    net, info = train_classifier(args.shards, settings)
    reason = refusal(info)
    if reason:
        print(f"error: not saved: {reason}", file=sys.stderr)
        return 2
    save_classifier(net, args.out, {**info, "shards": args.shards})
    print(json.dumps({"out": args.out, "vocab": net.vocab, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
