"""Aggregating comparison rows over seeds: per-setting means and stds, and each method's best setting."""

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["summarise", "best_settings"]


def summarise(
    rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("method", "width", "sparsity")
) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds of every numeric column, per ``keys`` group, in first-seen
    order: ``{<key>: ..., "n": seeds, "<col>": mean, "<col>_std": std}``; NaN columns stay NaN."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key)) | {"n": len(members)}
        for r0 in members[:1]:
            agg |= {c: r0[c] for c in ("architecture", "sparsity_knob") if c in r0 and c not in keys}
        for col, v0 in members[0].items():
            if col in keys or col == "seed" or not isinstance(v0, (int, float)) or isinstance(v0, bool):
                continue
            vals = [float(m[col]) for m in members]
            if any(math.isnan(v) for v in vals):
                agg[col], agg[f"{col}_std"] = float("nan"), float("nan")
                continue
            agg[col] = statistics.fmean(vals)
            agg[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def best_settings(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]) -> list[dict[str, Any]]:
    """Per method, its setting (width × sparsity, aggregated by :func:`summarise`) that maximises
    ``key`` (each target's comparison has its own: ``comparison_for(kind).best_key``)."""
    best: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for a in summarise(rows):
        k = key(a)
        if a["method"] not in best or k > best[a["method"]][0]:
            best[a["method"]] = (k, a)
    return [a for _, a in best.values()]
