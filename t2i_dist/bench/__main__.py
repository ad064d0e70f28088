"""python -m t2i_dist.bench [--quick] [--only 1,3] [--out tools/benchmarks.md]

 1 LDM training step: ours vs a minimal diffusers reference step (online encoding, precomputed latents)
 2 data pipeline: shards from an S3 server vs local disk, headroom over training, data wait
 3 scaling: samples/s with 1 vs 2 Ray Train workers
 4 memory: per-rank parameter + gradient + optimizer bytes at ZeRO 0/1/2/3 on 2 ranks (LDM, GALIP)
 5 evaluation: FID fan-out throughput with 1 vs 2 Ray workers
 6 sampling: seconds per image, GALIP (one pass) vs LDM (DDIM 50 steps with CFG)
 7 GPU projection: FLOPs per training sample and H100 img/s at 40 % MFU, per shipped config

--quick finishes in minutes with fewer rounds and smaller sets; numbers are noisier. A benchmark that fails
becomes a row saying why; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from t2i_dist.bench.report import Row, render_markdown, render_text, write_markdown

BENCHMARKS = {1: "step", 2: "pipeline", 3: "scaling", 4: "memory", 5: "evaluation", 6: "sampling", 7: "projection"}
TITLES = {
    1: "1 LDM step",
    2: "2 data pipeline",
    3: "3 scaling",
    4: "4 memory",
    5: "5 evaluation",
    6: "6 sampling",
    7: "7 GPU projection",
}


def default_out() -> Path:
    checkout = Path(__file__).resolve().parents[2]
    base = checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()
    return base / "tools" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sets: minutes, not tens")
    parser.add_argument("--only", default="", help="comma-separated benchmark numbers, e.g. 1,2")
    parser.add_argument("--config", default="ldm-tiny", help="LDM config of benchmarks 1-3")
    parser.add_argument("--out", type=Path, default=None, help=f"Markdown table (default {default_out()})")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        args.selected = sorted({int(x) for x in args.only.split(",") if x.strip()}) or sorted(BENCHMARKS)
    except ValueError:
        parser.error(f"--only takes benchmark numbers 1-7 separated by commas, got {args.only!r}")
    unknown = [n for n in args.selected if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from 1-7")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("T2I_LOG_LEVEL", "WARNING")
    import torch

    from t2i_dist.bench.context import BenchContext

    # every in-process measurement uses one thread, as a training worker does (threads_per_worker=1)
    torch.set_num_threads(1)
    started = time.time()
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="t2i-bench-")
    workdir = Path(scratch.name) if scratch is not None else args.workdir
    ctx = BenchContext(quick=args.quick, config=args.config, workdir=workdir)
    rows: list[Row] = []
    try:
        for number in args.selected:
            module = importlib.import_module(f"t2i_dist.bench.{BENCHMARKS[number]}")
            begin = time.time()
            try:
                rows += module.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                rows.append(Row(TITLES[number], "(failed)", "-", "", "error", f"{type(exc).__name__}: {exc}"))
            ctx.say(f"benchmark {number} took {time.time() - begin:.0f}s")
    finally:
        ctx.close()
        if scratch is not None:
            scratch.cleanup()
    print(render_text(rows))
    out = args.out or default_out()
    mode = "quick" if args.quick else "full"
    command = (
        "python -m t2i_dist.bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    )
    write_markdown(out, render_markdown(rows, mode, started, ctx.notes, command))
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
