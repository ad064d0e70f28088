"""Rows of the benchmark table, their text and Markdown rendering."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    bench: str  # "1 LDM step", ...
    metric: str
    value: str
    goal: str = ""
    verdict: str = ""  # "met", "missed", "n/a", or why there is no number
    detail: str = ""


def ratio_row(
    bench: str, metric: str, ratio: float, goal: float | None, detail: str, spread: tuple[float, float] | None = None
) -> Row:
    value = f"{ratio:.2f}x"
    if spread:
        value += f" ({spread[0]:.2f}-{spread[1]:.2f})"
    if goal is None:
        return Row(bench, metric, value, "", "", detail)
    return Row(bench, metric, value, f">= {goal:g}x", "met" if ratio >= goal else "missed", detail)


def unavailable(bench: str, metric: str, reason: str) -> Row:
    return Row(bench, metric, "-", "", "not measured", reason)


def machine_line() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.node()} | {os.cpu_count()} logical CPUs | load average {load} | torch {torch.__version__} "
        f"| {torch.get_num_threads()} torch thread(s) in this process"
    )


def render_text(rows: list[Row]) -> str:
    headers = ("benchmark", "metric", "value", "goal", "verdict")
    table = [headers] + [(r.bench, r.metric, r.value, r.goal, r.verdict) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[Row], mode: str, started: float, notes: list[str], command: str) -> str:
    out = [
        "# Benchmarks",
        "",
        f"Written by `{command}` ({mode} mode) on {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"in {time.time() - started:.0f} s.",
        "",
        f"Machine: {machine_line()}.",
        "",
        "Every ratio compares runs made side by side in this invocation, alternating round by round; the value is "
        "the median over rounds of the per-round ratio, with the lowest and highest round in brackets. Absolute "
        "rates are given only to explain a ratio: on a shared machine they move with everyone else's load.",
        "",
        "| benchmark | metric | value | goal | verdict | how |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {_cell(r.bench)} | {_cell(r.metric)} | {_cell(r.value)} | {_cell(r.goal)} | {_cell(r.verdict)} | "
        f"{_cell(r.detail)} |"
        for r in rows
    ]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
