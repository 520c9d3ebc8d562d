"""The report (``comparison.md``) of the language-model comparison (:mod:`apd.compare.lm`): one table
per model family, the bars of issue 14, loss recovered at matched description length, the
monosemanticity proxies, seed consistency and the SAE latents against decomposition subcomponents.
"""

import math
import statistics
from typing import Any

from apd.compare.aggregate import summarise
from apd.compare.config import CompareConfig
from apd.compare.report import ReportInputs, fmt_cell, fmt_number, is_decomposition, markdown_table
from apd.compare.report import setting as _setting
from apd.compare.runs import Comparison
from apd.compare.scoring import Trained
from apd.methods import method_class

__all__ = ["lm_report"]

_LM_TABLE = [
    ("l0", "L0 / token", 2), ("loss_recovered", "loss rec.", 3), ("loss_recovered_thresholded", "loss rec. g>τ", 3),
    ("kl", "KL", 4), ("fvu", "FVU", 3), ("fvu_mlp_out", "FVU out", 3), ("n_live", "live", 0), ("n_dead", "dead", 0),
    ("n_ultralow", "ultralow", 0), ("median_log10_density", "med. log10 dens.", 2), ("n_params", "params", None),
    ("bits_per_token", "bits / token", 1), ("seed_cos_out", "seed cos out", 3), ("seed_cos_in", "seed cos in", 3),
    ("seed_act_corr", "seed act. corr", 3), ("wall_seconds", "s", None),
]  # fmt: skip
"""the columns of each family's table (apd.compare.lm.LM_COLUMNS)"""

_LM_PROXIES = [(f"{p}_{s}", f"{label} {s}", 3) for p, label in (("top_token_frac", "top token"), ("top_bigram_frac", "top bigram"),
               ("token_entropy", "entropy")) for s in ("median", "mean")]  # fmt: skip

_LM_LEGEND = """Legend (full definitions: the docstring of `apd/compare/lm.py`). Every number is over the same N held-out tokens.
- **neurons**: the MLP's own 512 ReLU neurons as a dictionary (loss recovered 1 by construction). SAE grids: `transcoder_*`
  read the MLP input and predict its output; the others reconstruct the neurons and are spliced in through `mlp.down`.
  `spd` / `apd`: decompositions of `mlp.up` and `mlp.down` under their evaluation masks, per token.
- **L0 / token**: active units per token (SPD: subcomponents with g > τ, both matrices together).
- **loss rec.**: (L_ablated − L) / (L_ablated − L_clean), next-token loss with the reconstruction spliced in, against
  zero-ablating the MLP (Bricken et al.). **loss rec. g>τ**: SPD with binary masks. **KL**: target ‖ spliced, nats/token.
- **FVU**: of what the model reconstructs (neuron SAE: neurons; others: the MLP output); **FVU out**: of the MLP output.
- **live / dead / ultralow**: active somewhere / never / on fewer than ULTRALOW of the tokens; **med. log10 dens.**: median
  over live units of log10 of the fraction of tokens they are active on.
- **params**: SAE parameters; decompositions: components and causal-importance functions; neurons: the MLP.
- **bits / token**: L0·(log₂ K + BITS) for SAEs and neurons; the mask bits L0·log₂ C per matrix for decompositions.
- **seed cos out / in**: Hungarian-matched mean cosine of the live units' output (decoder rows; U_c) / input (encoder
  columns; V_c) directions between seeds of the same setting (rank-one factors: |cos|). **seed act. corr**: the same
  matching by the Pearson correlation of the live units' activations on the tokens (what they do, not where they point).
- **proxies** (no language-model judge; `apd.browser.extract`): over a unit's TOPK top-activating tokens, the share that are
  its most common token (**top token**) or bigram (**top bigram**); **entropy**: bits of the token it is active on (all
  active tokens). Median and mean over live units; 1 / 1 / 0 = fires on one token only.
"""


def _lm_family_tables(groups: list[dict[str, Any]], cfg: CompareConfig) -> list[str]:
    lines = []
    for method in dict.fromkeys(a["method"] for a in groups):
        members = [a for a in groups if a["method"] == method]
        grid = cfg.saes.get(method)
        kind = f"{grid.architecture}{', transcoder' if grid.transcoder else ''}" if grid else members[0].get("architecture", "")
        cols = [c for c in _LM_TABLE if any(not math.isnan(a[c[0]]) for a in members)]
        lines += [f"### {method} ({kind})", "", *markdown_table(members, cols), ""]
    return lines


def _lm_budget_table(groups: list[dict[str, Any]]) -> list[str]:
    """Per method, the most loss recovered by a setting whose mean description length fits each budget:
    the decompositions' and the neurons' bits per token."""
    budgets = sorted({round(a["bits_per_token"], 1) for a in groups if a["method"] == "neurons" or is_decomposition(a["method"])})
    if not budgets:
        return []
    lines = ["| method | " + " | ".join(f"≤ {b:g} bits" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for method in dict.fromkeys(a["method"] for a in groups):
        cells = []
        for b in budgets:
            fits = [a for a in groups if a["method"] == method and a["bits_per_token"] <= b + 0.05]
            best = max(fits, key=lambda a: a["loss_recovered"], default=None)
            cells.append("–" if best is None else f"{best['loss_recovered']:.3f} ({_setting(best)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _lm_proxy_table(groups: list[dict[str, Any]], results: list[Trained]) -> list[str]:
    lines = ["| units | n | live | " + " | ".join(h for _, h, _ in _LM_PROXIES) + " |", "|---|---|---|" + "---|" * len(_LM_PROXIES)]
    for a in groups:
        cells = [fmt_cell(a[c], a.get(f"{c}_std", 0.0), d) for c, _, d in _LM_PROXIES]
        lines.append(f"| {a['method']} w{a['width']} {_setting(a)} | {a['n']} | {a['n_live']:.0f} | " + " | ".join(cells) + " |")
    per_family: dict[tuple, list[dict[str, float]]] = {}
    for t in results:
        for d in t.details:
            if "family" in d:
                r = t.row
                per_family.setdefault((r["method"], r["width"], _setting(r), d["family"]), []).append(d)
    for (method, width, setting, family), ds in per_family.items():
        mean = {c: statistics.fmean(d[c] for d in ds) for c, _, _ in _LM_PROXIES + [("n_live", "", 0)]}
        cells = [fmt_number(mean[c], d) for c, _, d in _LM_PROXIES]
        lines.append(f"| {method} w{width} {setting}: {family} | {len(ds)} | {mean['n_live']:.0f} | " + " | ".join(cells) + " |")
    return lines


def _lm_seed_table(table: list[dict[str, Any]], tau: float) -> list[str]:
    if not table:
        return ["(no setting was trained with more than one seed)"]
    lines = [f"| method | width | setting | seeds | cos out | frac out ≥ {tau:g} | pairs out | cos in | frac in ≥ {tau:g} | "
             f"act. corr | frac corr ≥ {tau:g} | pairs corr | act. corr, both ≥ 1% | pairs ≥ 1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in table:
        lines.append(f"| {r['method']} | {r['width']} | {_setting(r)} | {r['seed_a']}, {r['seed_b']} | {r['cos_out']:.3f} | "
                     f"{r['frac_out_above']:.3f} | {r['n_out']:.0f} | {r['cos_in']:.3f} | {r['frac_in_above']:.3f} | "
                     f"{fmt_number(r['act_corr'], 3)} | {fmt_number(r['frac_act_above'], 3)} | {r['n_act']:.0f} | "
                     f"{fmt_number(r['act_corr_frequent'], 3)} | {r['n_act_frequent']:.0f} |")  # fmt: skip
    return lines


def _lm_relation_table(summary: list[dict[str, Any]], tau: float) -> list[str]:
    if not summary:
        return ["(no SAE and no decomposition with rank-one subcomponents of both matrices to relate)"]
    lines = [f"| SAE | seed | decomposition | live latents | median out cos | frac out ≥ {tau:g} | mlp.down matched | "
             "median neuron cos | median in cos | top-token Jaccard median / mean |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['sae_method']} w{s['sae_width']} {s['sae_sparsity']:g} | {s['sae_seed']} | {s['decomposition']} seed "
                     f"{s['decomposition_seed']} | {s['n_latents']} | {s['median_out_cos']:.3f} | {s['frac_out_above']:.3f} | "
                     f"{s['components_matched']} of {s['components_live']} | {fmt_number(s['median_neuron_cos'], 3)} | "
                     f"{fmt_number(s['median_in_cos'], 3)} | {fmt_number(s['median_top_jaccard'], 3)} / {fmt_number(s['mean_top_jaccard'], 3)} |")  # fmt: skip
    return lines


def _lm_bars(groups: list[dict[str, Any]], cfg: CompareConfig) -> list[str]:
    """Issue 14's bars: an SAE on the neurons with loss recovered ≥ 0.79 at L0 ≤ 20 and < 10% dead;
    SPD ≥ 0.9 of the MLP's loss contribution under its causal importances."""
    lines = []
    for method, grid in cfg.saes.items():
        if grid.transcoder:
            continue
        fits = [a for a in groups if a["method"] == method and a["l0"] <= 20]
        best = max(fits, key=lambda a: a["loss_recovered"], default=None)
        if best is None:
            lines.append(f"- `{method}`: no setting reaches L0 ≤ 20.")
            continue
        dead = best["n_dead"] / best["width"]
        ok = best["loss_recovered"] >= 0.79 and dead < 0.1
        lines.append(f"- `{method}` ({_setting(best)}, L0 {best['l0']:.1f}): loss recovered {best['loss_recovered']:.3f}, dead "
                     f"{100 * dead:.1f}% → {'meets' if ok else 'misses'} the bar (≥ 0.79 at L0 ≤ 20, dead < 10%).")  # fmt: skip
    for a in groups:  # decompositions with graded masks (SPD's causal importances): also scored thresholded
        if is_decomposition(a["method"]) and not math.isnan(a["loss_recovered_thresholded"]):
            ok = a["loss_recovered"] >= 0.9
            lines.append(f"- `{a['method']}` ({_setting(a)}): loss recovered under its causal importances {a['loss_recovered']:.3f} "
                         f"(thresholded g > τ: {a['loss_recovered_thresholded']:.3f}) at L0 {a['l0']:.1f} {method_class(a['method']).unit_noun}s per "
                         f"token → {'meets' if ok else 'misses'} the bar (≥ 0.9).")  # fmt: skip
    return lines


def _lm_convergence(rows: list[dict[str, Any]], st: Any) -> list[str]:
    """One line per SAE trained with a curve: its steps, the verdict and the fitted change."""
    curved = [r for r in rows if not math.isnan(r.get("converged", math.nan))]
    if not curved:
        return []
    head = (f"SAE training curves (`sae_train.eval_every={st.eval_every}`): {st.converge_metric} on a fixed held-out batch; "
            f"converged = its fitted change over the last {st.converge_window:.0%} of training below {st.converge_tol:g}"
            + (f", training stopped there (cap {st.steps} steps)" if st.until_converged else "") + ":")  # fmt: skip
    return ["## Training to convergence", "", head, ""] + [
        f"- `{r['method']}` {r['sparsity_knob']}={r['sparsity']:g} seed {r['seed']}: {r['train_steps']:.0f} steps, "
        f"{'converged' if r['converged'] == 1.0 else 'NOT converged'} (change {r['curve_change']:+.4f})" for r in curved] + [""]  # fmt: skip


def lm_report(inputs: ReportInputs, comparison: Comparison) -> str:
    """comparison.md of the language-model comparison (:mod:`apd.compare.lm`)."""
    cfg, apd_run, wall, figures = inputs.cfg, inputs.apd_run, inputs.wall, inputs.figures
    rows, results = comparison.rows, comparison.results
    groups = summarise(rows)
    st = cfg.sae_train
    resampling = (f", dead latents resampled before steps {st.resample_steps} (silent for {st.resample_window} tokens; Bricken "
                  "et al.'s procedure)" if st.resample_steps else "")  # fmt: skip
    grids = "; ".join(f"`{n}` ({g.architecture}{', transcoder' if g.transcoder else ''}): width ∈ {g.widths}, {g.knob} ∈ "
                      f"{g.sparsity_values}" + (f", {g.options}" if g.options else "") + (f", training {g.train}" if g.train else "")
                      for n, g in cfg.saes.items())  # fmt: skip
    lines = [
        f"# SAEs, transcoders and parameter decompositions of the MLP of {apd_run.target.name}",
        "",
        f"Target: the shipped `{apd_run.target.name}` (`apd/toy_models/pretrained/{apd_run.target.name}.pt`). Seeds: {cfg.seeds}. "
        f"Wall time of this invocation: {wall / 60:.1f} min; the models' own training + evaluation times sum to "
        f"{sum(r['wall_seconds'] for r in rows if not math.isnan(r['wall_seconds'])) / 60:.1f} min.",
        "",
        f"SAEs: {st.steps} steps of {st.batch_size} tokens from training windows, Adam lr {st.lr:g}"
        + (f", {st.warmup_steps} warm-up steps" if st.warmup_steps else "") + f"{resampling}. Grids (`training`: the grid's "
        f"own training settings, e.g. resampling): {grids}.",
        "",
        *[f"- {note}" for note in comparison.notes],
        "",
        *_lm_convergence(rows, st),
        "## Results per model family (mean ± std over seeds)",
        "",
        *_lm_family_tables(groups, cfg),
        "## Bars",
        "",
        *_lm_bars(groups, cfg),
        "",
        "## Loss recovered at matched description length",
        "",
        "Per method, the most loss recovered by a setting whose mean bits per token fit the budget (the decompositions' and the "
        "neurons' own description lengths); figure `loss_vs_bits.png` shows every setting.",
        "",
        *_lm_budget_table(groups),
        "",
        f"## Monosemanticity proxies (over each unit's {cfg.proxy_top_k} top-activating tokens; mean ± std over seeds)",
        "",
        "Decompositions pooled over their matrices, then per matrix (first lines per family: the pooled row of the model).",
        "",
        *_lm_proxy_table(groups, results),
        "",
        "## Seed consistency",
        "",
        "Two seeds of one setting: live units matched one-to-one (Hungarian) by cosine of their output (decoder rows; SPD's "
        "U_c per matrix, pooled) and input (encoder columns; V_c) directions, and by the Pearson correlation of their "
        "activations on the held-out tokens (**act. corr**, per family of units, pooled; **both ≥ 1%**: over the matched pairs "
        "whose two units are active on at least 1% of the tokens). VPD reports 0.48–0.51 between two seeds.",
        "",
        *_lm_seed_table(comparison.tables.get("seed_consistency", []), cfg.tau),
        "",
        "## SAE latents against decomposition subcomponents",
        "",
        "Each SAE of the first seed against the first seed of each decomposition with rank-one subcomponents: per live latent its "
        "best |cos| with a live `mlp.down` U_c in the MLP output space (**out**; neuron SAEs mapped through `mlp.down.weight`), "
        "with a live `mlp.up` U_c in neuron space (**neuron**; neuron SAEs), and of its input direction with `mlp.down`'s V_c "
        "(neuron SAEs) or `mlp.up`'s V_c (transcoders) (**in**); **mlp.down matched**: distinct live subcomponents that are "
        f"some latent's out match with cos ≥ {cfg.tau:g}; **top-token Jaccard**: overlap of the latent's and its out match's top "
        f"{cfg.proxy_top_k} token positions. Every latent: `sae_component_matches.csv`.",
        "",
        *_lm_relation_table(comparison.tables.get("sae_component_summary", []), cfg.tau),
        "",
        _LM_LEGEND.replace("BITS", f"{cfg.bits_per_value:g}").replace("ULTRALOW", f"{cfg.ultralow_density:g}")
        .replace("TOPK", str(cfg.proxy_top_k)),
    ]  # fmt: skip
    if figures:
        lines += ["## Figures", ""] + [f"- [`{p}`]({p})" for p in figures] + [""]
    return "\n".join(lines) + "\n"
