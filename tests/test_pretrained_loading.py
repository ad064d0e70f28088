"""The real loading paths for pretrained weights, exercised on tiny random models saved to disk."""

from __future__ import annotations

import torch

from t2i_dist.config import ClipConfig
from t2i_dist.models.clip.encoders import FrozenClipText, load_clip
from t2i_dist.models.vae.autoencoder import load_vae
from t2i_dist.models.vae.config import VAEConfig


def test_vae_loads_from_a_local_directory(tmp_path):
    torch.manual_seed(1)
    original = load_vae(VAEConfig())
    original.save_pretrained(tmp_path / "vae")
    loaded = load_vae(VAEConfig(pretrained=str(tmp_path / "vae")))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(original.encode(x).latent_dist.mean, loaded.encode(x).latent_dist.mean)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_vae_subfolder_layout(tmp_path):
    torch.manual_seed(2)
    original = load_vae(VAEConfig())
    original.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = load_vae(VAEConfig(pretrained=str(tmp_path / "pipeline"), subfolder="vae"))
    w0 = next(original.parameters())
    assert torch.equal(w0, next(loaded.parameters()))


def test_clip_loads_from_a_checkpoint_file(tmp_path):
    torch.manual_seed(3)
    original = load_clip(ClipConfig())
    path = tmp_path / "tiny_clip.pt"
    torch.save(original.state_dict(), path)
    torch.manual_seed(4)  # a different random init, so equality proves the file was loaded
    loaded = load_clip(ClipConfig(pretrained=str(path)))
    text = FrozenClipText(ClipConfig(), loaded)(["a red circle"])
    expected = FrozenClipText(ClipConfig(), original)(["a red circle"])
    assert torch.allclose(text["hidden"], expected["hidden"], atol=1e-6)
    assert torch.allclose(text["pooled"], expected["pooled"], atol=1e-6)


def test_text_states_depend_on_the_caption():
    enc = FrozenClipText(ClipConfig(layer="penultimate"))
    out = enc(["a red circle", "a blue square"])
    assert out["hidden"].shape == (2, 32, 64)
    assert not torch.allclose(out["hidden"][0], out["hidden"][1])
