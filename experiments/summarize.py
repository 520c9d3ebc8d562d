"""Summarise a sweep: `python -m experiments.summarize <multirun dir> [--success-key K --threshold T]`.

Collects every run dir below the given folder (finished: metrics.json; failed: failure.json;
otherwise running, with its last logged step) with the overrides Hydra recorded for it, and writes
into that folder: summary.csv (one row per run), summary.md (success rate and metric mean ± std
per setting) and plots of success rate against each swept value, metric distributions per setting,
and a heatmap of the success rate when two values other than the seed are swept. Works on a sweep
that is still running.
"""

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402  (PyYAML comes with hydra-core)

REPORTED = ["all_recovered", "mmcs", "ml2r", "n_recovered_matched_0.99", "n_features_with_dedicated_component",
            "topk_recon_mse", "faithfulness_loss", "l0", "wall_seconds"]  # fmt: skip


_SEED_DIR = re.compile(r"seed_\d+")


def _overrides(run: Path) -> dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else []
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per run dir (a folder with a .hydra/ or config.yaml) below ``sweep_dir``."""
    runs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")} |
                  {p.parent for p in sweep_dir.rglob("config.yaml") if p.parent.name != ".hydra"})  # fmt: skip
    # a multi-seed job (n_seeds > 1) is one record per seed_<s>/ dir, with the job's overrides and seed=s
    parents = {run.parent for run in runs if _SEED_DIR.fullmatch(run.name)}
    records = []
    for run in runs:
        if run in parents:
            continue
        overrides = _overrides(run)
        if _SEED_DIR.fullmatch(run.name) and run.parent in parents:
            overrides = {**_overrides(run.parent), "seed": run.name.split("_", 1)[1]}
            overrides.pop("n_seeds", None)
        rec: dict[str, Any] = {"run": str(run.relative_to(sweep_dir)), **overrides}
        if (run / "metrics.json").is_file():
            rec["status"] = "finished"  # numbers only (metrics.json also lists mechanisms and warnings)
            rec |= {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if isinstance(v, (int, float))}
        elif (run / "failure.json").is_file():
            failure = json.loads((run / "failure.json").read_text())
            rec |= {"status": "failed", "error": f"{failure['error']}: {failure['message']}"[:300]}
        else:
            rec["status"] = "running"
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
            rec["last_step"] = json.loads(lines[-1])["step"] if lines else 0
        records.append(rec)
    return records


def swept_keys(records: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between runs."""
    keys: dict[str, set] = defaultdict(set)
    for rec in records:
        for k, v in _overrides_of(rec).items():
            keys[k].add(v)
    return sorted(k for k, vals in keys.items() if len(vals) > 1)


def _overrides_of(rec: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in rec.items() if "=" not in k and k not in _RESERVED and isinstance(v, str)}


_RESERVED = {"run", "status", "error"}


def _success(rec: dict[str, Any], key: str, threshold: float) -> float | None:
    if rec["status"] != "finished" or key not in rec:
        return None
    return float(float(rec[key]) >= threshold)


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {sd:.2g}"


def summarize(sweep_dir: Path, success_key: str = "all_recovered", threshold: float = 1.0) -> dict[str, Any]:
    records = collect(sweep_dir)
    if not records:
        raise SystemExit(f"no runs found below {sweep_dir}: pass a Hydra multirun folder")
    swept = swept_keys(records)
    settings = [k for k in swept if k != "seed"]
    metric_keys = [k for k in REPORTED if any(k in r for r in records)]

    columns = ["run", "status", *swept, *metric_keys, "last_step", "error"]
    columns += sorted({k for r in records for k in r} - set(columns))
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for rec in records:
            w.writerow({k: rec.get(k, "") for k in columns})

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[tuple(rec.get(k, "") for k in settings)].append(rec)
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(records)} runs: {sum(r['status'] == 'finished' for r in records)} finished, "
        f"{sum(r['status'] == 'failed' for r in records)} failed, {sum(r['status'] == 'running' for r in records)} running. "
        f"Success = `{success_key} >= {threshold}` among finished runs. Swept: {', '.join(swept) or 'nothing'}.",
        "",
        "| " + " | ".join([*settings, "runs", "finished", "failed", "success rate", *metric_keys]) + " |",
        "|" + "---|" * (len(settings) + 4 + len(metric_keys)),
    ]
    table = []
    for key, recs in sorted(groups.items()):
        ok = [s for r in recs if (s := _success(r, success_key, threshold)) is not None]
        rate = statistics.fmean(ok) if ok else math.nan
        table.append((key, rate))
        stats = [_fmt([float(r[m]) for r in recs if r["status"] == "finished" and m in r]) for m in metric_keys]
        n_fin = sum(r["status"] == "finished" for r in recs)
        n_fail = sum(r["status"] == "failed" for r in recs)
        lines.append("| " + " | ".join([*key, str(len(recs)), str(n_fin), str(n_fail),
                                         f"{rate:.0%}" if ok else "–", *stats]) + " |")  # fmt: skip
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['run']}`: {r['error']}" for r in failed]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plots = _plots(sweep_dir, records, settings, table, success_key, threshold, metric_keys)
    return {"records": records, "swept": swept, "plots": plots}


def _num(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def _plots(sweep_dir: Path, records: list[dict[str, Any]], settings: list[str], table: list[tuple[tuple, float]],
           success_key: str, threshold: float, metric_keys: list[str]) -> list[Path]:  # fmt: skip
    paths = []
    for i, key in enumerate(settings):  # success rate against each swept value (pooled over the rest)
        pooled: dict[str, list[float]] = defaultdict(list)
        for rec in records:
            if (s := _success(rec, success_key, threshold)) is not None:
                pooled[rec.get(key, "")].append(s)
        xs = sorted(pooled, key=_num)  # type: ignore[arg-type]
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(range(len(xs)), [statistics.fmean(pooled[x]) for x in xs], "o-")
        ax.set(xticks=range(len(xs)), xticklabels=xs, ylim=(-0.05, 1.05), xlabel=key,
               ylabel=f"P({success_key} ≥ {threshold})", title=f"success rate vs {key}")  # fmt: skip
        fig.tight_layout()
        paths.append(sweep_dir / f"success_vs_{key.replace('/', '_')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for metric in [m for m in ("mmcs", "ml2r", "n_features_with_dedicated_component") if m in metric_keys]:
        groups: dict[str, list[float]] = defaultdict(list)
        for rec in records:
            if rec["status"] == "finished" and metric in rec:
                groups[", ".join(f"{k}={rec.get(k, '')}" for k in settings) or "all"].append(float(rec[metric]))
        labels = sorted(groups)
        fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(labels)), 3.5))
        ax.boxplot([groups[lab] for lab in labels])
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel=metric, title=f"{metric} per setting (all seeds)")
        fig.tight_layout()
        paths.append(sweep_dir / f"distribution_{metric}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if len(settings) == 2:
        a_vals = sorted({k[0] for k, _ in table}, key=_num)  # type: ignore[arg-type]
        b_vals = sorted({k[1] for k, _ in table}, key=_num)  # type: ignore[arg-type]
        grid = [[math.nan] * len(b_vals) for _ in a_vals]
        for (a, b), rate in table:
            grid[a_vals.index(a)][b_vals.index(b)] = rate
        fig, ax = plt.subplots(figsize=(1.2 * len(b_vals) + 2, 1.0 * len(a_vals) + 1.5))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(a_vals)):
            for j in range(len(b_vals)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", color="w" if grid[i][j] < 0.6 else "k")
        ax.set(xticks=range(len(b_vals)), xticklabels=b_vals, yticks=range(len(a_vals)), yticklabels=a_vals,
               xlabel=settings[1], ylabel=settings[0], title="success rate")  # fmt: skip
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(sweep_dir / "success_heatmap.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--success-key", default="all_recovered", help="metric that decides success (default all_recovered)")
    parser.add_argument("--threshold", type=float, default=1.0, help="success when the metric is >= this (default 1)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder; pass the multirun dir (e.g. multirun/decompose/<time>)")
    out = summarize(args.sweep_dir, args.success_key, args.threshold)
    print(f"{len(out['records'])} runs; wrote summary.csv, summary.md and {len(out['plots'])} plots to {args.sweep_dir}")


if __name__ == "__main__":
    main()
