"""evaluate --checkpoint on a real (briefly trained) LDM checkpoint: generated images, and so FID, do not
depend on how many Ray tasks make them; --log-run writes the result to the MLflow run; a protocol that needs
a full-rank covariance refuses too few captions before any image is made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.evaluate import main as evaluate_main
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _save_stand_in_vae(root: str) -> str:
    """ldm-tiny's autoencoder with other weights, saved as a trained stage-0 VAE would be (a real
    diffusers directory): the checkpoint's frozen part is then loaded from `pretrained`."""
    import torch

    from t2i_dist.models.registry import build_plugin, load_config

    vae = build_plugin(load_config("ldm-tiny"), torch.device("cpu")).vae  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.05)
    vae.save_pretrained(f"{root}/vae")
    return f"{root}/vae"


def _train_two_steps(rank: int, world: int, shards: str, root: str) -> str:
    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    cfg = load_config(
        "ldm-tiny",
        [
            f"model.vae.pretrained={_save_stand_in_vae(root)}",
            f"data.urls={shards}",
            "data.synthesize.enabled=false",
            "cluster.num_workers=1",
            "data.loader_workers=0",
            "deepspeed.micro_batch_size=4",
            "run.max_steps=2",
            "run.checkpoint_every=2",
            "run.sample_every=0",
            "eval.every=0",
            "model.sampling.steps=2",
        ],
    )
    ctx = local_context(cfg, root)
    TrainLoop(cfg, ctx).run()
    return str(ctx.sink.checkpoints()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("eval-ckpt")
    shards = root / "shards"
    write_synthetic_shards(shards, num_samples=16, samples_per_shard=8, image_size=32, seed=0)
    [ckpt] = run_distributed(_train_two_steps, world=1, args=(str(shards), str(root / "runs")))
    return ckpt, str(shards)


def _evaluate(argv: list[str], capsys) -> dict:
    assert evaluate_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_fid_of_generated_images_is_the_same_over_one_and_two_workers(ray_cluster, checkpoint, capsys):
    ckpt, shards = checkpoint
    common = [
        "--checkpoint",
        ckpt,
        "--captions",
        shards,
        "--num-samples",
        "12",
        "--resolution",
        "32",
        "--batch-size",
        "2",  # divides each worker's 6 captions: every image is made in a batch of the same captions for K=1, 2
    ]
    one = _evaluate([*common, "--workers", "1"], capsys)
    two = _evaluate([*common, "--workers", "2"], capsys)
    assert one["num_fake"] == two["num_fake"] == 12
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["kid"] == pytest.approx(one["kid"], rel=1e-6, abs=1e-9)
    assert one["fid"] > 0


def test_log_run_writes_the_result_to_mlflow(checkpoint, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    ckpt, shards = checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval")).info.run_id
    result = _evaluate(
        [
            "--checkpoint",
            ckpt,
            "--captions",
            shards,
            "--num-samples",
            "4",
            "--resolution",
            "32",
            "--workers",
            "0",
            "--log-run",
            run_id,
            "--tracking-uri",
            uri,
            "--step",
            "2",
        ],
        capsys,
    )
    logged = client.get_run(run_id).data.metrics
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval")]
    assert artifacts == ["eval/result_step_000002.json"]
    record = json.loads(Path(client.download_artifacts(run_id, artifacts[0], str(tmp_path))).read_text())
    assert record["num_fake"] == result["num_fake"] == 4
    # every number of the result is a metric of the run, at the given step
    for key in ("fid", "kid", "num_fake", "num_real"):
        assert logged[f"eval/{key}"] == pytest.approx(record[key]), key
    assert [m.step for m in client.get_metric_history(run_id, "eval/fid")] == [2]


def test_full_rank_protocol_refuses_before_any_image_is_made(checkpoint, capsys):
    ckpt, shards = checkpoint
    assert (
        evaluate_main(["--checkpoint", ckpt, "--captions", shards, "--protocol", "coco5k-128", "--workers", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert "more than 2048 images" in err
    assert not list(Path(ckpt).parent.glob("**/*.png"))


def test_untrained_baselines_reset_the_trained_networks_and_for_the_system_the_frozen_parts_too(checkpoint):
    import torch

    from t2i_dist.engine.inference import load_plugin

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    ckpt, _ = checkpoint
    trained = load_plugin(ckpt, use_ema=False)
    untrained, again = load_plugin(ckpt, untrained="networks"), load_plugin(ckpt, untrained="networks")
    system, system_again = load_plugin(ckpt, untrained="system"), load_plugin(ckpt, untrained="system")
    unets = [p.unet.state_dict() for p in (trained, untrained, again, system, system_again)]  # type: ignore[attr-defined]
    t, u, a, s, s2 = unets
    assert not same(t, u) and not same(t, s)  # two steps of training moved the UNet; neither baseline has them
    assert same(u, a) and same(s, s2)  # each baseline is its seeded initialisation, every time
    plugins = {"t": trained, "u": untrained, "s": system, "s2": system_again}
    vae = {name: p.vae.state_dict() for name, p in plugins.items()}  # type: ignore[attr-defined]
    assert same(vae["t"], vae["u"])  # 'networks' keeps the loaded (here: stand-in trained) autoencoder
    assert not same(vae["t"], vae["s"]) and same(vae["s"], vae["s2"])  # 'system': the seeded random one
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    assert not torch.equal(trained.sample(prompts, seeds, steps=2), untrained.sample(prompts, seeds, steps=2))
    with pytest.raises(ValueError, match="untrained must be"):
        load_plugin(ckpt, untrained=True)  # type: ignore[arg-type]


def test_a_studys_evaluations_compute_the_real_images_statistics_once(checkpoint, tmp_path):
    from t2i_dist.study import Evaluation, Ledger, ReportSettings, Study, evaluate_stage

    ckpt, shards = checkpoint
    out = tmp_path / "study"
    study = Study(
        title="t",
        runs=["ldm-tiny"],
        evaluation=Evaluation(
            protocol="synthetic-tiny", captions=shards, workers=0, extra_args=["--num-samples", "8", "--no-kid"]
        ),
        report=ReportSettings(out=str(out)),
    )
    ledger, trained = Ledger(out / "study.json"), {"checkpoint": ckpt}
    networks = evaluate_stage("ldm-tiny", trained, study, ledger, untrained="networks")
    cached = Path(networks["reference_cache"])
    assert cached.parent == out / "reference" and cached.is_file()
    written = cached.stat().st_mtime_ns
    system = evaluate_stage("ldm-tiny", trained, study, ledger, untrained="system")
    assert system["reference_cache"] == networks["reference_cache"] and cached.stat().st_mtime_ns == written
    assert system["fid"] != networks["fid"]  # other images, compared with the same real statistics
