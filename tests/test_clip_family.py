"""The `clip` family: ClipLoss gathers features across ranks; ZeRO-3 + bf16 training with the temperature clamp
through the real (Ray-free) loop; and a run on Ray + DeepSpeed + MLflow whose export latent diffusion and GALIP
load through their ordinary `pretrained` path."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

BATCH, DIM = 8, 16  # rows per rank and feature width of the loss test


def _features(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(rows, DIM, generator=g), torch.randn(rows, DIM, generator=g)
    return F.normalize(image, dim=1), F.normalize(text, dim=1)


def _loss_and_grads(plugin, image: torch.Tensor, text: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    loss = plugin.loss(image, text, scale)
    loss.backward()
    return float(loss.detach()), image.grad, text.grad, float(scale.grad)


def _plugin(overrides: list[str]):
    from t2i_dist.models.registry import build_plugin, load_config

    return build_plugin(load_config("clip-tiny", overrides), torch.device("cpu"))


def _rank_losses(rank: int, world: int) -> dict[bool, tuple[float, torch.Tensor, torch.Tensor, float]]:
    """{local_loss: this rank's (loss, image grad, text grad, scale grad)} for its rows of the global batch."""
    image, text = _features(0, BATCH * world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for local_loss in (False, True):
        plugin = _plugin([f"model.local_loss={str(local_loss).lower()}"])
        assert plugin.loss.world_size == world and plugin.loss.rank == rank  # type: ignore[attr-defined]
        out[local_loss] = _loss_and_grads(plugin, image[rows], text[rows])
    return out


def test_clip_loss_gathers_features_across_ranks():
    """Two gloo ranks of 8 rows each score against all 16: the loss of the concatenated batch in one process,
    and, once averaged over ranks as DeepSpeed does, its gradients (they flow back through the gather)."""
    single_plugin = _plugin([])  # no process group: world size 1, nothing gathered
    image, text = _features(0, 2 * BATCH)
    loss, image_grad, text_grad, scale_grad = _loss_and_grads(single_plugin, image, text)

    ranks = run_distributed(_rank_losses, world=2)
    for rank, result in enumerate(ranks):
        rank_loss, rank_image_grad, rank_text_grad, rank_scale_grad = result[False]
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        assert rank_loss == pytest.approx(loss, rel=1e-5)  # every rank computes the global batch's loss
        # each rank's rows get every rank's gradient (all_gather's backward sums them); ranks then average
        torch.testing.assert_close(rank_image_grad / 2, image_grad[rows])
        torch.testing.assert_close(rank_text_grad / 2, text_grad[rows])
        assert rank_scale_grad == pytest.approx(scale_grad, rel=1e-5)
    # local_loss: each rank scores only its own rows against all columns; their mean is the global loss
    local = [result[True][0] for result in ranks]
    assert local[0] != pytest.approx(local[1]) and sum(local) / 2 == pytest.approx(loss, rel=1e-5)


ZERO3 = [
    "cluster.num_workers=2",
    "deepspeed.zero_stage=3",
    "deepspeed.precision=bf16",
    "deepspeed.micro_batch_size=8",
    "data.loader_workers=0",
    "data.synthesize.num_samples=32",
    "data.synthesize.samples_per_shard=16",
    "data.synthesize.holdout_samples=16",
    "eval.num_samples=16",
    "run.log_every=1",
    "run.sample_every=0",
    "run.checkpoint_every=3",
    "run.max_steps=3",
    "optim.warmup_steps=0",
]


def _zero3_run(rank: int, world: int, overrides: list[str], root: str) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    cfg = load_config("clip-tiny", overrides)
    loop = TrainLoop(cfg, local_context(cfg, root))
    logged: list = []
    loop.log_metrics = lambda m, step: logged.append((step, dict(m)))
    loop.run()
    plugin = loop.plugin
    engine = plugin.engines["clip"]
    master = safe_get_full_fp32_param(plugin.model.logit_scale)  # type: ignore[attr-defined]  # collective
    with engine.gathered():
        forward_value = float(plugin.model.logit_scale.float())  # type: ignore[attr-defined]
    return {
        "partitioned": engine.partitioned,
        "dtype": str(next(engine.module.parameters()).dtype),
        "logged": logged,
        "master": float(master),
        "forward": forward_value,
        "checkpoint": str(loop.ctx.sink.checkpoints()[-1]) if rank == 0 else None,
    }


def test_zero3_bf16_trains_clamps_the_temperature_and_exports(tmp_path):
    import open_clip

    from t2i_dist.data.shards import preflight
    from t2i_dist.export import export_checkpoint
    from t2i_dist.models.clip.encoders import create_clip
    from t2i_dist.models.registry import load_config

    # fine-tuning from a file whose temperature is above open_clip's cap: the first step's forward sees it, the
    # clamp after that step brings master and forward weights to ln(100)
    start = create_clip(load_config("clip-tiny").model.clip)  # type: ignore[attr-defined]
    weights = start.state_dict()
    weights["logit_scale"] = torch.tensor(5.0)
    torch.save(weights, tmp_path / "start.pt")
    overrides = [*ZERO3, f"data.urls={tmp_path / 'shards'}", f"model.clip.pretrained={tmp_path / 'start.pt'}"]
    preflight(load_config("clip-tiny", overrides).data)
    r0, r1 = run_distributed(_zero3_run, world=2, args=(overrides, str(tmp_path / "run")))

    assert r0["partitioned"] and r0["dtype"] == "torch.bfloat16"
    steps: dict[int, dict] = {}
    for step, metrics in r0["logged"]:
        steps.setdefault(step, {}).update(metrics)
    assert all(math.isfinite(steps[s]["loss"]) for s in (1, 2, 3))
    assert steps[1]["logit_scale"] > 140  # exp(5) in bf16
    assert all(steps[s]["logit_scale"] <= 100 for s in (2, 3)), steps
    for r in (r0, r1):
        assert 4.0 < r["master"] <= math.log(100) and 4.0 < r["forward"] <= math.log(100), r
    held_out = {s: m for s, m in steps.items() if "held_out/image_to_text_top1" in m}
    assert sorted(held_out) == [0, 3]
    assert 0 < held_out[3]["held_out/chance"] < 1

    path = export_checkpoint(r0["checkpoint"], tmp_path / "export")
    assert path == tmp_path / "export" / "open_clip_model.pt"
    assert json.loads((tmp_path / "export" / "open_clip_model.json").read_text())["name"] == "t2i-tiny-clip"
    exported = torch.load(path, weights_only=True)
    assert exported["logit_scale"].shape == () and float(exported["logit_scale"]) <= math.log(100)
    # open_clip's own loader (load_checkpoint, strict) takes the file
    loaded = open_clip.create_model("t2i-tiny-clip", pretrained=str(path))
    assert all(torch.equal(v, exported[k]) for k, v in loaded.state_dict().items())


E2E = [
    "cluster.num_workers=2",
    "deepspeed.micro_batch_size=32",
    "data.loader_workers=0",
    "data.synthesize.num_samples=512",
    "data.synthesize.samples_per_shard=256",
    "data.synthesize.holdout_samples=64",
    "eval.num_samples=64",
    "optim.warmup_steps=5",
    "run.max_failures=0",
    "run.name=clip-e2e",
    "run.log_every=10",
    "run.sample_every=20",
    "run.checkpoint_every=40",
    "run.max_steps=40",
]
TOP1 = ("held_out/image_to_text_top1", "held_out/text_to_image_top1")


@pytest.mark.slow
def test_clip_tiny_trains_on_ray_and_exports_what_ldm_and_galip_load(ray_cluster, mlflow_server, workdir):
    from t2i_dist.engine.checkpoint import load_for_inference
    from t2i_dist.engine.components.held_out import held_out_batch
    from t2i_dist.export import main as export_main
    from t2i_dist.models.clip.plugin import retrieval_top1
    from t2i_dist.models.registry import build_plugin, load_config
    from t2i_dist.train import main as train_main

    experiment = f"clip-{uuid.uuid4().hex[:6]}"  # the mlflow server is shared by the whole session
    tracking = [f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment}"]
    assert train_main(["--config", "clip-tiny", *E2E, *tracking]) == 0  # synthesizes data/synthetic{,-holdout}

    _, history = mlflow_server.only_run_histories(experiment, (*TOP1, "held_out/chance", "loss", "logit_scale"))
    [chance] = {v for _, v in history["held_out/chance"]}  # one held-out batch, one chance level
    for key in TOP1:
        top1 = history[key]
        assert [s for s, _ in top1] == [0, 20, 40], top1
        # 2 workers x 32: the features of both are scored together; retrieval leaves chance well behind
        assert top1[-1][1] > max(3 * chance, top1[0][1] + 0.05), (top1, chance)
    assert [s for s, _ in history["loss"]] == [10, 20, 30, 40] and history["loss"][-1][1] < history["loss"][0][1]
    assert all(1 < v <= 100 for _, v in history["logit_scale"])

    [checkpoint] = [p for p in Path("runs/clip-e2e").glob("checkpoint_*") if p.is_dir()]  # the step-40 one
    _, state = load_for_inference(str(checkpoint))
    assert export_main(["--checkpoint", str(checkpoint), "--out", "exported/clip"]) == 0
    path = Path("exported/clip/open_clip_model.pt").resolve()
    exported = torch.load(path, weights_only=True)
    assert exported.keys() == state["clip"].keys()
    assert all(torch.equal(exported[k], v.reshape(exported[k].shape)) for k, v in state["clip"].items())

    # the LDM's text encoder and GALIP's CLIP load it as any pretrained open_clip file
    ldm = build_plugin(load_config("ldm-tiny", [f"model.text.pretrained={path}"]), torch.device("cpu"))
    text = ldm.text_encoder  # type: ignore[attr-defined]
    assert all(torch.equal(v, exported[k]) for k, v in text.state_dict().items())
    galip = build_plugin(load_config("galip-tiny", [f"model.clip.pretrained={path}"]), torch.device("cpu"))
    vision = galip.vision  # type: ignore[attr-defined]
    assert all(torch.equal(v, exported[f"visual.{k}"]) for k, v in vision.visual.state_dict().items())
    assert "clip" not in galip.inference_state()  # loaded from the file, not carried in GALIP's checkpoints

    # and they serve it as trained: GALIP's pixel mapping and the LDM's sentence vectors retrieve as measured
    held_out = held_out_batch(load_config("clip-tiny", E2E))
    with torch.no_grad():
        _, image = vision.encode(held_out.images, taps=[0], with_embedding=True)
        sentence = text(held_out.captions)["pooled"]
    again = retrieval_top1(F.normalize(image, dim=1), F.normalize(sentence, dim=1), held_out.captions)
    for key in TOP1:
        assert again[key] == pytest.approx(history[key][-1][1], abs=1.5 / len(held_out)), (key, again)


def test_weight_decay_skips_gains_biases_and_the_temperature_as_open_clip_does():
    from t2i_dist.models.base import Trainable
    from t2i_dist.models.clip.encoders import create_clip
    from t2i_dist.models.clip.plugin import open_clip_decays
    from t2i_dist.models.registry import load_config

    model = create_clip(load_config("clip-tiny").model.clip)  # type: ignore[attr-defined]
    groups = Trainable(model, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1, decays=open_clip_decays).param_groups()
    decayed, kept = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    named = dict(model.named_parameters())
    assert id(named["logit_scale"]) in kept
    assert all(id(p) in kept for n, p in named.items() if n.endswith(".bias") or ".ln_" in n or n.startswith("ln_"))
    assert id(named["visual.transformer.resblocks.0.attn.in_proj_weight"]) in decayed
    assert len(decayed) + len(kept) == len(named) and not decayed & kept
    # without a rule (the other families) every parameter decays, in one group
    assert len(Trainable(model, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1).param_groups()) == 1
