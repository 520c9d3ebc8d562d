"""The benchmarks/README.md table from one pytest-benchmark run.

    OMP_NUM_THREADS=1 python -m pytest benchmarks --benchmark-json=bench.json
    python -m benchmarks.table bench.json          # prints the Markdown tables and ratios
    python -m benchmarks.table bench.json --before old.json   # two versions' runs side by side

Every ratio divides two numbers from the same json, i.e. measured side by side in one run.
"""

import argparse
import json
from pathlib import Path
from typing import Any

RATIOS = [
    ("gradient attributions, per-output loop / batched (residual MLP 1-layer, full rank, B=256)",
     "test_gradient_attribution_loop", "test_gradient_attribution_batched"),
    ("gradient attributions, reference code's loop / batched",
     "test_gradient_attribution_reference", "test_gradient_attribution_batched"),
    ("gradient attributions, 'hidden' mode / 'per_sample' mode (auto's choice here)",
     "test_gradient_attribution_mode[hidden]", "test_gradient_attribution_mode[per_sample]"),
    ("APD step, residual MLP 1-layer: full rank / rank 1",
     "test_step[resid_mlp_1_full_rank]", "test_step[resid_mlp_1_rank_1]"),
    ("APD step, baseline / toolkit: residual MLP 1-layer full rank",
     "test_step_baseline[resid_mlp_1_full_rank]", "test_step[resid_mlp_1_full_rank]"),
    ("APD step, baseline / toolkit: residual MLP 1-layer rank 1",
     "test_step_baseline[resid_mlp_1_rank_1]", "test_step[resid_mlp_1_rank_1]"),
    ("APD step, baseline / toolkit: TMS 40-10",
     "test_step_baseline[tms_40_10]", "test_step[tms_40_10]"),
    ("APD step, TMS 40-10: eager / compile=True (after compilation)",
     "test_step[tms_40_10]", "test_step_compiled"),
    ("baseline step, residual MLP full rank / toolkit step, residual MLP rank 1 (the preset)",
     "test_step_baseline[resid_mlp_1_full_rank]", "test_step[resid_mlp_1_rank_1]"),
    ("SPD step, straightforward (masked weights materialised) / toolkit: TMS 40-10, C 200, batch 512",
     "test_spd_step_baseline[tms_40_10]", "test_spd_step[tms_40_10]"),
    ("SPD step, straightforward / toolkit: residual MLP 1-layer, C 100, batch 1024",
     "test_spd_step_baseline[resid_mlp_1]", "test_spd_step[resid_mlp_1]"),
    ("SPD step, straightforward / toolkit: residual MLP 3-layer, C 200, batch 1024",
     "test_spd_step_baseline[resid_mlp_3]", "test_spd_step[resid_mlp_3]"),
    ("SPD step, separate hard sigmoids and 3-pass masks / fused: spd_lm_1l's method, 16 windows",
     "test_spd_step_separate_squash[lm_1l]", "test_spd_step_fused_squash[lm_1l]"),
    ("SPD step, separate hard sigmoids and 3-pass masks / fused: residual MLP 3-layer",
     "test_spd_step_separate_squash[resid_mlp_3]", "test_spd_step_fused_squash[resid_mlp_3]"),
    ("SPD step, residual MLP 3-layer: C 200 for every matrix / 40 for each W_out (C_per_module)",
     "test_spd_step[resid_mlp_3]", "test_spd_step_w_out_C40"),
    ("importance minimality fwd + bwd, 2 × [2048, 512]: pow / x at p 1",
     "test_importance_minimality_power[pow]", "test_importance_minimality_power[toolkit]"),
    ("SPD step, inner activations recomputed / reused: residual MLP 1-layer",
     "test_spd_step_recomputed_inner[resid_mlp_1]", "test_spd_step[resid_mlp_1]"),
    ("SPD step, inner activations recomputed / reused: residual MLP 3-layer",
     "test_spd_step_recomputed_inner[resid_mlp_3]", "test_spd_step[resid_mlp_3]"),
    ("SPD step, eager / compile_ci=True (after compilation): residual MLP 1-layer",
     "test_spd_step[resid_mlp_1]", "test_spd_step_compiled_ci[resid_mlp_1]"),
    ("SPD step, eager / compile_ci=True (after compilation): residual MLP 3-layer",
     "test_spd_step[resid_mlp_3]", "test_spd_step_compiled_ci[resid_mlp_3]"),
]  # fmt: skip
PER_SEED = [("TMS 5-2, one seed at a time (decompose)", "test_seeds_one_at_a_time"),
            ("TMS 5-2, 1 seed through decompose_seeds", "test_seeds_at_once[1]"),
            ("TMS 5-2, 12 seeds at once (decompose_seeds)", "test_seeds_at_once[12]")]  # fmt: skip


VARIANT_SIDES = {"routed": "layer_routing=uniform_k_subset", "bf16": "precision=bf16",
                 "routed_bf16": "both", "compiled": "compile_ci=on"}  # fmt: skip
"""the toolkit's options that benchmarks/test_spd_reference.py times beside each preset"""
REFERENCE_PRESETS = ["tms_5_2", "tms_5_2_id", "tms_40_10", "tms_40_10_id", "resid_mlp_1", "resid_mlp_2", "resid_mlp_3", "lm_1l",
                     "lm_4l"]  # fmt: skip


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.2f} G" if flops >= 1e8 else f"{flops / 1e6:.1f} M"


def reference_table(benches: dict[str, Any]) -> list[str]:
    """Per preset: the toolkit's SPD step against goodfire-ai/spd's rebuilt one (``spd_vs_reference``,
    medians), each step's matmul FLOPs and the GFLOP/s it achieves against the measured sgemm peak
    (the fastest ``matmul_throughput`` case), and two ceilings on the ratio for the same objective and
    arithmetic: the reference's step over the toolkit's matmul FLOPs at that peak (nothing else costing
    time), and over the CI functions' own forward and backward (``ci_only``: everything else free)."""
    peaks = [b["extra_info"].get("gflops_per_s") for n, b in benches.items() if n.startswith("test_matmul_throughput")]
    peak = max((p for p in peaks if p), default=None)
    rows, variant_rows, token_rows = [], [], []
    for p in REFERENCE_PRESETS:
        ours, theirs = benches.get(f"test_spd_vs_reference[{p}-toolkit]"), benches.get(f"test_spd_vs_reference[{p}-reference]")
        if ours is None or theirs is None:
            continue
        t, r = ours["stats"]["median"], theirs["stats"]["median"]
        f, fr = ours["extra_info"]["flops"], theirs["extra_info"]["flops"]
        achieved = f / t / 1e9
        pct = f"{100 * achieved / peak:.1f}%" if peak else "-"
        comp = ours["extra_info"].get("compile_seconds")
        ci = benches.get(f"test_spd_vs_reference[{p}-ci_only]")
        ci_cols = f"{_fmt(ci['stats']['median'])} ({100 * ci['stats']['median'] / t:.0f}%) | {r / ci['stats']['median']:.2f}×" if ci else "- | -"
        at_peak = f"{r / (f / (peak * 1e9)):.1f}×" if peak else "-"  # the toolkit's matmuls alone, at the sgemm peak
        rows.append(f"| {p} | {_fmt(t)} | {_fmt(r)} | **{r / t:.2f}×** | {_gflops(f)} | {_gflops(fr)} | {achieved:.2f} | {pct} | "
                    f"{'eager' if comp is None else f'compiled in {comp:.1f} s'} | {at_peak} | {ci_cols} |")  # fmt: skip
        opts = [(v, benches.get(f"test_spd_vs_reference[{p}-{v}]")) for v in VARIANT_SIDES]
        if ours["extra_info"].get("tokens"):
            token_rows.append(f"| {p} | " + " | ".join(f"{b['extra_info']['tokens'] / b['stats']['median']:,.0f}" if b else "-"
                                                     for b in [theirs, ours, *(b for _, b in opts)]) + " |")  # fmt: skip
        if any(b for _, b in opts):
            variant_rows.append(f"| {p} | {_fmt(r)} | {_fmt(t)} (**{r / t:.2f}×**) | " + " | ".join(
                f"{_fmt(b['stats']['median'])} (**{r / b['stats']['median']:.2f}×**)" if b else "-" for _, b in opts) + " |")  # fmt: skip
    if not rows:
        return []
    out = ["", "| preset | toolkit step (median) | reference step (median) | reference / toolkit | toolkit FLOPs | reference FLOPs "
           "| toolkit GFLOP/s | % of sgemm peak | CI functions (compile_ci) | reference / (toolkit FLOPs at the sgemm peak) "
           "| CI functions alone, fwd + bwd (% of the toolkit step) | reference / CI functions alone |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]  # fmt: skip
    if variant_rows:
        out += ["", "Options timed in the same rounds (median step; in brackets reference / it): "
                + ", ".join(f"`{v}` = {VARIANT_SIDES[v]}" for v in VARIANT_SIDES) + ".", "",
                "| preset | reference | toolkit (preset) | " + " | ".join(VARIANT_SIDES) + " |",
                "|---|---|---|" + "---|" * len(VARIANT_SIDES), *variant_rows]  # fmt: skip
    if token_rows:
        out += ["", "Tokens per second of the token presets (the same medians):", "",
                "| preset | reference | toolkit (all layers) | " + " | ".join(VARIANT_SIDES) + " |",
                "|---|---|---|" + "---|" * len(VARIANT_SIDES), *token_rows]  # fmt: skip
    mm = [(n.split("[")[1].rstrip("]"), b["extra_info"].get("gflops_per_s")) for n, b in sorted(benches.items())
          if n.startswith("test_matmul_throughput")]  # fmt: skip
    if mm:
        out.append("")
        out.append("sgemm, one thread: " + ", ".join(f"{s} {g:.1f} GFLOP/s" for s, g in mm if g) + ".")
    return out


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def tables(data: dict[str, Any]) -> str:
    benches = {b["name"]: b for b in data["benchmarks"]}
    lines = ["| group | case | mean | min | rounds | peak alloc (MiB) |", "|---|---|---|---|---|---|"]
    for b in sorted(data["benchmarks"], key=lambda b: (b["group"] or "", b["name"])):
        rss = b.get("extra_info", {}).get("peak_mib")
        lines.append(f"| {b['group']} | `{b['name']}` | {_fmt(b['stats']['mean'])} | {_fmt(b['stats']['min'])} | "
                     f"{b['stats']['rounds']} | {'' if rss is None else f'{rss:.0f}'} |")  # fmt: skip
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    for label, num, den in RATIOS:
        if num in benches and den in benches:
            lines.append(f"| {label} | **{benches[num]['stats']['mean'] / benches[den]['stats']['mean']:.1f}×** |")
    lines += ["", "| multi-seed throughput (100 steps, batch 2048) | ms per seed-step |", "|---|---|"]
    for label, name in PER_SEED:
        if name in benches:
            n = 12 if name.endswith("[12]") else 1
            lines.append(f"| {label} | {benches[name]['stats']['mean'] / (100 * n) * 1e3:.2f} |")
    lines += reference_table(benches)
    dp = benches.get("test_data_parallel_throughput", {}).get("extra_info")
    if dp:
        lines += ["", "| data-parallel SPD step, language model (global batch 32 × 128 tokens, gloo, 1 thread per process) | value |",
                  "|---|---|",
                  f"| tokens/s per process, 1 process | {dp['tokens_per_s_per_process_1']:.0f} |",
                  f"| tokens/s per process, 2 processes | {dp['tokens_per_s_per_process_2']:.0f} |",
                  f"| per-process ratio, 2 / 1 | **{dp['per_process_ratio_2_over_1']:.2f}×** |",
                  f"| total throughput ratio, 2 / 1 | **{dp['total_ratio_2_over_1']:.2f}×** |"]  # fmt: skip
    info = data.get("machine_info", {})
    lines += ["", f"Machine: {info.get('cpu', {}).get('brand_raw', '?')}, {info.get('cpu', {}).get('count', '?')} CPUs, "
              f"Python {info.get('python_version', '?')}; torch threads: 1; {data.get('datetime', '')}."]  # fmt: skip
    return "\n".join(lines)


def before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The cases and ratios both runs measured, side by side: a code change's effect (run the two
    versions back to back on the same machine)."""
    b = {x["name"]: x for x in before["benchmarks"]}
    a = {x["name"]: x for x in after["benchmarks"]}
    lines = ["| case | before (mean) | after (mean) | after / before |", "|---|---|---|---|"]
    for name in sorted(set(a) & set(b)):
        mb, ma = b[name]["stats"]["mean"], a[name]["stats"]["mean"]
        lines.append(f"| `{name}` | {_fmt(mb)} | {_fmt(ma)} | {ma / mb:.2f} |")
    lines += ["", "| ratio | before | after |", "|---|---|---|"]
    for label, num, den in RATIOS:
        if num in a and den in a and num in b and den in b:
            rb = b[num]["stats"]["mean"] / b[den]["stats"]["mean"]
            ra = a[num]["stats"]["mean"] / a[den]["stats"]["mean"]
            lines.append(f"| {label} | {rb:.1f}× | {ra:.1f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="the file written by pytest --benchmark-json")
    parser.add_argument("--before", type=Path, help="a run of another version: print both side by side")
    args = parser.parse_args(argv)
    after = json.loads(args.json.read_text())
    print(tables(after) if args.before is None else before_after(json.loads(args.before.read_text()), after))


if __name__ == "__main__":
    main()
