"""The study's comparison, regenerated from MLflow runs.

  python -m t2i_dist.report --runs RUN_ID [RUN_ID ...] [--format html|md] [--out report/]
  python -m t2i_dist.report --runs A B --checkpoints ckptA ckptB --prompts "small blue bird" "girl with dog"

Tables: training (workers, batch, steps, epochs, time per epoch, img/s), size and speed (parameters,
generation time per image), quality (FID, KID, IS, text alignment, CLIP score, and the real images' own
scores). Figures: loss and FID curves, and one sample grid per run -- the run's latest logged grid, or, with
--checkpoints, a fresh grid of the same prompts and seeds for every run. The report is logged to MLflow as the
artifacts of a new run named "report" in the first run's experiment (unless --no-log).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from t2i_dist.report.render import (
    Figure,
    Report,
    curve_figure,
    enlarge,
    quality_table,
    size_speed_table,
    training_table,
    write_html,
    write_markdown,
)
from t2i_dist.report.runs import RunSummary, load_run

STUDY_PROMPTS = [
    "a village in the mountains in spring",
    "red and yellow flowers",
    "a large number of cows in the field",
    "girl with dog",
    "only one horse in the forest",
    "small blue bird",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m t2i_dist.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", nargs="+", required=True, help="MLflow run ids to compare")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else ./mlruns")
    p.add_argument("--out", default="report", help="output directory")
    p.add_argument("--format", choices=["html", "md"], default="html")
    p.add_argument("--title", default="Text-to-image study: comparison")
    p.add_argument("--dataset-size", type=int, help="training samples per epoch (default: from the run's config)")
    p.add_argument("--checkpoints", nargs="+", help="one checkpoint per run (same order): fresh sample grids")
    p.add_argument(
        "--fresh-grids",
        action="store_true",
        help="fresh grids from each run's final checkpoint (its t2i_dist.checkpoint tag)",
    )
    p.add_argument("--prompts", nargs="+", default=STUDY_PROMPTS, help="prompts of the fresh grids")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt in the fresh grids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return p


def fresh_grid(checkpoint: str, prompts: list[str], per_prompt: int, device: str) -> tuple[bytes, float]:
    """(PNG grid: a row per seed, a column per prompt; seconds per image)."""
    from t2i_dist.engine.inference import load_plugin
    from t2i_dist.images import png_bytes_of_grid, prompt_seeds

    plugin = load_plugin(checkpoint, device)
    flat, seeds = prompt_seeds(prompts, per_prompt)
    start = time.perf_counter()
    images = plugin.sample(flat, seeds)
    seconds = (time.perf_counter() - start) / len(flat)
    return png_bytes_of_grid(images, len(prompts)), seconds


def grid_figures(
    runs: list[RunSummary], args: argparse.Namespace, checkpoints: list[str] | None
) -> tuple[list[Figure], dict[str, float]]:
    figures, generation = [], {}
    if checkpoints:
        caption = "columns: " + " | ".join(args.prompts) + f"; rows: seeds 0..{args.seeds - 1}"
        for run, checkpoint in zip(runs, checkpoints, strict=True):
            png, seconds = fresh_grid(checkpoint, args.prompts, args.seeds, args.device)
            generation[run.run_id] = seconds
            figures.append(
                Figure(f"Samples: {run.name} ({run.family})", f"samples_{run.run_id[:8]}.png", enlarge(png), caption)
            )
        return figures, generation
    for run in runs:
        if run.grid_png is None:
            continue
        prompts = run.sample_prompts
        caption = f"step {run.grid_step}" + ("; columns: " + " | ".join(prompts) if prompts else "")
        figures.append(
            Figure(
                f"Samples: {run.name} ({run.family})", f"samples_{run.run_id[:8]}.png", enlarge(run.grid_png), caption
            )
        )
    return figures, generation


def checkpoints_of(runs: list[RunSummary], args: argparse.Namespace) -> list[str] | None:
    if args.checkpoints:
        return args.checkpoints
    if not args.fresh_grids:
        return None
    missing = [r.name for r in runs if not r.checkpoint]
    if missing:
        raise ValueError(f"runs {', '.join(missing)} have no t2i_dist.checkpoint tag; pass --checkpoints")
    return [r.checkpoint for r in runs]  # type: ignore[misc]


def build_report(runs: list[RunSummary], args: argparse.Namespace) -> Report:
    grids, generation = grid_figures(runs, args, checkpoints_of(runs, args))
    report = Report(
        args.title,
        [
            training_table(runs, args.dataset_size),
            size_speed_table(runs, generation),
            quality_table(runs),
        ],
    )
    curves = [
        curve_figure(runs, "loss", "Training loss", "curve_loss.png"),
        curve_figure(runs, "eval/fid", "FID during training", "curve_fid.png"),
        curve_figure(runs, "eval/alignment", "Text alignment during training", "curve_alignment.png"),
    ]
    report.figures = grids + [c for c in curves if c is not None]
    return report


def log_report(client, runs: list[RunSummary], out_dir: Path) -> str:
    experiment_id = client.get_run(runs[0].run_id).info.experiment_id
    run = client.create_run(
        experiment_id, run_name="report", tags={"t2i_dist.report_of": ",".join(r.run_id for r in runs)}
    )
    client.log_artifacts(run.info.run_id, str(out_dir), "report")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoints and len(args.checkpoints) != len(args.runs):
        print(
            f"error: --checkpoints needs one checkpoint per run ({len(args.runs)}), got {len(args.checkpoints)}",
            file=sys.stderr,
        )
        return 2
    from t2i_dist.tracking import client_for, resolve_tracking_uri

    client = client_for(resolve_tracking_uri(args.tracking_uri))
    try:
        runs = [load_run(client, run_id) for run_id in args.runs]
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for unknown runs / servers
        print(f"error: cannot read the runs from MLflow ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    try:
        report = build_report(runs, args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    path = write_html(report, out_dir) if args.format == "html" else write_markdown(report, out_dir)
    if args.format == "html":  # the HTML is self-contained; the PNGs are kept beside it for reuse
        for figure in report.figures:
            (out_dir / figure.filename).write_bytes(figure.png)
    print(f"[t2i_dist] report written to {path}")
    if not args.no_log:
        run_id = log_report(client, runs, out_dir)
        print(f"[t2i_dist] report logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
