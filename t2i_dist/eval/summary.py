"""One line a person reads for an evaluation: each generated figure beside the real images' own, whether it
came from `t2i_dist.evaluate` (a result dict) or from training's in-loop evaluation (logged eval/* metrics)."""

from __future__ import annotations

from typing import Any


def summary_line(result: dict[str, Any]) -> str:
    """`fid 41.2 · alignment colour 0.42 (real 1.00) · ...`: each generated figure beside the real images'."""
    real = result.get("real") or {}

    def figure(label: str, key: str, fmt: str) -> str:
        return f"{label} {result[key]:{fmt}}" + (f" (real {real[key]:{fmt}})" if key in real else "")

    parts = [figure(k, k, ".4g") for k in ("fid", "kid", "alignment_fid", "is", "clip_score") if k in result]
    aligned = sorted(k for k in result if k.startswith("alignment/")) + (["alignment"] if "alignment" in result else [])
    for i, key in enumerate(aligned):
        name = key.removeprefix("alignment/") if key != "alignment" else "all four"
        parts.append(figure(("alignment " if i == 0 else "") + name, key, ".2f"))
    if "num_fake" in result:
        parts.append(f"{result['num_fake']} generated, {result.get('num_real')} real images")
    return " · ".join(parts)


def result_of_logged(metrics: dict[str, float]) -> dict[str, Any]:
    """In-training eval/* metrics (eval/fid, eval/real/alignment/colour, eval/num_samples) in the shape of an
    evaluate result: real figures under "real", counts as num_fake / num_real (equal in training)."""
    result: dict[str, Any] = {}
    real: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("eval/"):
            continue
        name = key.removeprefix("eval/")
        if name.startswith("real/"):
            real[name.removeprefix("real/")] = value
        else:
            result[name] = value
    if "num_samples" in result:
        result["num_fake"] = result["num_real"] = int(result.pop("num_samples"))
    result["real"] = real
    return result
