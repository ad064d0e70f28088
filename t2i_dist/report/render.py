"""The study's comparison as tables, curves and sample grids, written as Markdown + PNGs or one
self-contained HTML file (images inlined as base64)."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from t2i_dist.report.runs import RunSummary

MISSING = "–"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    title: str
    filename: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_millions(n: float | None) -> str:
    return MISSING if n is None else f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------------------------------------- tables


def training_table(runs: list[RunSummary], dataset_size: int | None) -> Table:
    rows = []
    for r in runs:
        size = r.dataset_size(dataset_size)
        rows.append(
            [
                r.name,
                r.family,
                fmt(r.param_int("cluster.num_workers")),
                fmt(r.global_batch),
                fmt(r.steps),
                fmt(r.epochs(size)),
                fmt_seconds(r.seconds_per_epoch(size)),
                fmt(r.img_per_s, 1),
                fmt_seconds(r.wall_seconds),
            ]
        )
    note = "epoch = data set size / global batch; time per epoch = data set size / median img/s"
    return Table(
        "Training",
        ["run", "model", "workers", "batch size", "steps", "epochs", "time per epoch", "img/s", "wall time"],
        rows,
        note,
    )


def size_speed_table(runs: list[RunSummary], generation: dict[str, float]) -> Table:
    rows = []
    for r in runs:
        seconds = generation.get(
            r.run_id, r.metrics.get("sample/seconds_per_image", r.metrics.get("eval/seconds_per_image"))
        )
        rows.append(
            [
                r.name,
                r.family,
                fmt_millions(r.metrics.get("params/total")),
                fmt_millions(r.metrics.get("params/trainable")),
                fmt(seconds, 3),
            ]
        )
    return Table(
        "Size and speed", ["run", "model", "total parameters", "trainable parameters", "generation s/image"], rows
    )


QUALITY_COLUMNS = [
    ("FID", "eval/fid", 2),
    ("KID", "eval/kid", 4),
    ("IS", "eval/is", 2),
    ("text alignment", "eval/alignment", 3),
    ("alignment FID", "eval/alignment_fid", 2),
    ("CLIP score", "eval/clip_score", 2),
]


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def quality_table(runs: list[RunSummary]) -> Table:
    rows = [
        [
            r.name,
            r.family,
            *[fmt(r.metrics.get(key), d) for _, key, d in QUALITY_COLUMNS],
            fmt(_int(r.metrics.get("eval/num_samples", r.metrics.get("eval/num_fake")))),
        ]
        for r in runs
    ]
    # the real images' own scores: the ceiling for IS, alignment and CLIP score (FID/KID of real vs real = 0)
    real: dict[str, float] = {}
    for r in runs:
        for _, key, _ in QUALITY_COLUMNS:
            value = r.metrics.get(key.replace("eval/", "eval/real/"))
            if value is not None:
                real.setdefault(key, value)
    if real:
        rows.append(
            [
                "real images",
                "–",
                *[fmt(real.get(key), d) if key in real else MISSING for _, key, d in QUALITY_COLUMNS],
                MISSING,
            ]
        )
    return Table(
        "Quality",
        ["run", "model", *[name for name, _, _ in QUALITY_COLUMNS], "samples"],
        rows,
        "last logged evaluation of each run; a FID from fewer samples than 2,048 is biased upward",
    )


# ---------------------------------------------------------------------------------------------- figures


def enlarge(png: bytes, min_width: int = 512) -> bytes:
    """Nearest-neighbour upscaling of small grids (32 px samples would be stamps in a page)."""
    from PIL import Image

    image: Image.Image = Image.open(io.BytesIO(png))
    factor = -(-min_width // image.width)
    if factor <= 1:
        return png
    image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def curve_figure(runs: list[RunSummary], key: str, title: str, filename: str) -> Figure | None:
    series = [(r.name, r.history.get(key, [])) for r in runs if r.history.get(key)]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in series:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Figure(title, filename, buffer.getvalue())


# ---------------------------------------------------------------------------------------------- output


def _markdown_table(table: Table) -> str:
    lines = [
        f"## {table.title}",
        "",
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join("---" for _ in table.header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines)


def write_markdown(report: Report, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {report.title}", ""]
    parts += [_markdown_table(t) + "\n" for t in report.tables]
    parts += ["## Samples and curves", ""]
    for figure in report.figures:
        (out_dir / figure.filename).write_bytes(figure.png)
        parts += [f"### {figure.title}", "", f"![{figure.title}]({figure.filename})", ""]
        if figure.caption:
            parts += [figure.caption, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def write_html(report: Report, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(report.title)}</title><style>body{{font-family:sans-serif;margin:2em;max-width:70em}}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".note{color:#555;font-size:.9em}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    for t in report.tables:
        parts.append(f"<h2>{e(t.title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
        parts.append("</table>" + (f"<p class='note'>{e(t.note)}</p>" if t.note else ""))
    parts.append("<h2>Samples and curves</h2>")
    for figure in report.figures:
        data = base64.b64encode(figure.png).decode()
        parts.append(f"<h3>{e(figure.title)}</h3><img alt='{e(figure.title)}' src='data:image/png;base64,{data}'>")
        if figure.caption:
            parts.append(f"<p class='note'>{e(figure.caption)}</p>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path
