"""The report from MLflow runs (a real mlflow server): all tables, sample grids and curves, in HTML and
Markdown, logged back to MLflow."""

from __future__ import annotations

import io
import re

import pytest
from mlflow.entities import Metric, Param
from PIL import Image

from t2i_dist.report.cli import main as report_main

pytestmark = pytest.mark.slow


def _grid_png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (68, 34), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _log_run(client, experiment_id: str, tmp_path, family: str, name: str, img_per_s: float, fid: list[float]) -> str:
    """A run shaped like what t2i_dist.train logs: flattened config params, metrics, sample grids."""
    run = client.create_run(experiment_id, run_name=name, tags={"t2i_dist.family": family})
    rid = run.info.run_id
    params = {
        "model.family": family,
        "cluster.num_workers": "2",
        "deepspeed.micro_batch_size": "16",
        "deepspeed.grad_accum_steps": "1",
        "global_batch_size": "32",
        "run.max_steps": "40",
        "data.synthesize.enabled": "True",
        "data.synthesize.num_samples": "640",
        "tracking.sample_prompts": "['a red circle', 'a small blue square on the left']",
    }
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    metrics = [
        Metric("params/total", 4.2e6 if family == "ldm" else 2.1e6, 0, 0),
        Metric("params/trainable", 1.5e6, 0, 0),
    ]
    for step in (10, 20, 30, 40):
        metrics += [Metric("loss", 1.0 / step, 0, step), Metric("img_per_s", img_per_s + step / 10, 0, step)]
    for step, value in zip((20, 40), fid, strict=True):
        metrics += [
            Metric("eval/fid", value, 0, step),
            Metric("eval/alignment", 0.1 * step / 20, 0, step),
            Metric("eval/real/alignment", 0.97, 0, step),
            Metric("eval/num_samples", 64, 0, step),
        ]
    metrics.append(Metric("sample/seconds_per_image", 0.25, 0, 40))
    client.log_batch(rid, metrics=metrics)
    for step, colour in ((20, "gray"), (40, "red" if family == "ldm" else "blue")):
        path = tmp_path / f"step_{step:06d}.png"
        path.write_bytes(_grid_png(colour))
        client.log_artifact(rid, str(path), "samples")
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def two_runs(mlflow_server, tmp_path_factory):
    client = mlflow_server.client()
    experiment_id = client.create_experiment("report-test")
    tmp = tmp_path_factory.mktemp("grids")
    ldm = _log_run(client, experiment_id, tmp, "ldm", "ldm-tiny", 50.0, [300.0, 250.0])
    galip = _log_run(client, experiment_id, tmp, "galip", "galip-tiny", 80.0, [280.0, 260.0])
    return client, ldm, galip


def test_html_report_has_every_table_grid_and_curve(two_runs, mlflow_server, tmp_path, capsys):
    client, ldm, galip = two_runs
    out = tmp_path / "report"
    assert report_main(["--runs", ldm, galip, "--tracking-uri", mlflow_server.uri, "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    for title in (
        "Training",
        "Size and speed",
        "Quality",
        "Samples: ldm-tiny (ldm)",
        "Samples: galip-tiny (galip)",
        "Training loss",
        "FID during training",
    ):
        assert title in html
    # training table: 40 steps x 32 images / 640 samples = 2 epochs; median img/s of windows 2..4 = 53.0
    assert re.search(r"<td>ldm-tiny</td><td>ldm</td><td>2</td><td>32</td><td>40</td><td>2.00</td>", html)
    assert "<td>53.0</td>" in html and "<td>4.20M</td>" in html and "<td>2.10M</td>" in html
    assert "<td>250.00</td>" in html and "<td>260.00</td>" in html  # last FID of each run
    assert "<td>real images</td>" in html and "<td>0.970</td>" in html
    assert html.count("data:image/png;base64,") == 5  # two grids, loss, FID and alignment curves
    assert "step 40" in html and "a small blue square on the left" in html
    grid = Image.open(out / f"samples_{ldm[:8]}.png")
    assert grid.getpixel((1, 1)) == (255, 0, 0)  # the latest grid (step 40), not the earlier one
    # logged back to MLflow as a new run's artifacts
    logged = re.search(r"logged to MLflow run (\w+)", capsys.readouterr().out).group(1)
    names = {f.path for f in client.list_artifacts(logged, "report")}
    assert "report/report.html" in names and "report/curve_fid.png" in names


def test_markdown_report_and_bad_runs(two_runs, mlflow_server, tmp_path, capsys):
    _, ldm, galip = two_runs
    out = tmp_path / "md"
    assert (
        report_main(
            [
                "--runs",
                ldm,
                galip,
                "--tracking-uri",
                mlflow_server.uri,
                "--out",
                str(out),
                "--format",
                "md",
                "--no-log",
                "--dataset-size",
                "320",
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    assert "| ldm-tiny | ldm | 2 | 32 | 40 | 4.00 |" in md  # epochs with the overridden data set size
    assert "![Training loss](curve_loss.png)" in md and (out / "curve_loss.png").is_file()
    assert report_main(["--runs", "0" * 32, "--tracking-uri", mlflow_server.uri, "--out", str(out)]) == 2
    assert "cannot read the runs" in capsys.readouterr().err
    assert report_main(["--runs", ldm, galip, "--checkpoints", "one", "--tracking-uri", mlflow_server.uri]) == 2


def _table_rows(html: str, title: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the table under an <h2> title."""
    section = html.split(f"<h2>{title}</h2>", 1)[1].split("</table>", 1)[0]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)]
    return {cells[0]: cells[1:] for cells in rows if cells}


TINY = [
    "run.max_steps=4",
    "run.log_every=2",
    "run.sample_every=4",
    "run.checkpoint_every=4",
    "data.synthesize.num_samples=128",
    "data.synthesize.samples_per_shard=64",
    "deepspeed.micro_batch_size=4",
]


def test_report_from_two_tiny_real_runs(ray_cluster, mlflow_server, tmp_path, monkeypatch, capsys, alignment_probe):
    """Train a tiny LDM and a tiny GALIP, evaluate both checkpoints into their runs, then report."""
    from t2i_dist.evaluate import main as evaluate_main
    from t2i_dist.train import main as train_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the alignment classifier's per-user cache
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = mlflow_server.client()
    run_ids = []
    # random frozen parts: no stage-0 training in this test
    ldm_extra = ["model.vae.train_config=null", "model.text.train_config=null", "model.sampling.steps=2"]
    for config, extra in (("ldm-tiny", ldm_extra), ("galip-tiny", ["model.clip.train_config=null"])):
        assert train_main(["--config", config, *TINY, *extra, "tracking.experiment=report-real"]) == 0
        (run,) = client.search_runs(
            [client.get_experiment_by_name("report-real").experiment_id], f"tags.mlflow.runName = '{config}'"
        )
        checkpoint = run.data.tags["t2i_dist.checkpoint"]
        steps = ["--steps", "2"] if config == "ldm-tiny" else []
        assert (
            evaluate_main(
                [
                    "--checkpoint",
                    checkpoint,
                    "--captions",
                    "data/synthetic",
                    "--num-samples",
                    "6",
                    "--workers",
                    "2",
                    *steps,
                    "--alignment-classifier",  # 128 samples are too few to train a trustworthy one
                    str(alignment_probe),
                    "--log-run",
                    run.info.run_id,
                    "--step",
                    "4",
                ]
            )
            == 0
        )
        run_ids.append(run.info.run_id)
    capsys.readouterr()
    out = tmp_path / "report"
    assert (
        report_main(
            [
                "--runs",
                *run_ids,
                "--out",
                str(out),
                "--fresh-grids",
                "--prompts",
                "a red circle",
                "small blue bird",
                "--seeds",
                "1",
            ]
        )
        == 0
    )
    html = (out / "report.html").read_text()
    training, size, quality = (_table_rows(html, t) for t in ("Training", "Size and speed", "Quality"))
    for name, family in (("ldm-tiny", "ldm"), ("galip-tiny", "galip")):
        assert f"Samples: {name} ({family})" in html
        # every cell filled for real runs; 4 steps x 8 images / 128 samples = 0.25 epochs
        assert "–" not in training[name] and training[name][4] == "0.25"
        assert "–" not in size[name]
        fid, alignment, samples = quality[name][1], quality[name][4], quality[name][7]
        assert float(fid.replace(",", "")) > 0 and 0 <= float(alignment) <= 1 and samples == "6"
    assert quality["real images"][4] == "1.000" or float(quality["real images"][4]) > 0.5
    assert html.count("data:image/png;base64,") >= 4  # two fresh grids, loss curve, FID curve
