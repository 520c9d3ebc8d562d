"""APD against the SAE baselines on a toy: `python -m experiments.compare [experiment=compare_tms_5_2]`.

Trains APD (the settings of the decompose preset named by ``apd_experiment``; or scores the finished
run dirs listed in ``apd.runs``) and every SAE grid of the preset over its seeds on the same shipped
target, scores all of them on one evaluation batch (the comparison registered for the target's kind,
``apd.compare.comparison_for``: ``apd.compare.tms`` for TMS, ``apd.compare.resid`` for the 1-layer
residual MLP, ``apd.compare.lm`` for the language model) and writes into the run dir:
``comparison.csv`` (one row per model), ``comparison.md`` (mean ± std over seeds, with a legend),
one ``<name>.csv`` per further table of the comparison (the language model's seed consistency and
SAE-component matches) and ``figures/``. APD runs land in ``apd/`` (a finished one
is reloaded when the run dir is reused), SAEs in ``saes/``.
"""

import csv
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from apd.compare import COLUMNS, Comparison, Trained, best_settings, comparison_for, summarise
from apd.config import ConfigError
from apd.experiment import DecomposeRun
from experiments import compare_schema, schema
from experiments.compare_figures import save_figures

log = logging.getLogger(__name__)


def apd_template(app: compare_schema.CompareApp) -> DecomposeRun:
    """The APD run of the decompose preset ``app.apd_experiment`` (composed by Hydra, so the
    comparison follows the preset as it changes), before the grid's C / topk / steps / seed."""
    return _preset(app, app.apd_experiment, app.apd_overrides)


def spd_template(app: compare_schema.CompareApp) -> DecomposeRun | None:
    """The SPD run of the decompose preset ``app.spd_experiment`` (None without one), before the seed."""
    return _preset(app, app.spd_experiment, app.spd_overrides) if app.spd_experiment else None


def _preset(app: compare_schema.CompareApp, experiment: str, overrides: list[str]) -> DecomposeRun:
    cfg = hydra.compose(config_name="decompose", overrides=[f"experiment={experiment}", *overrides])
    preset: schema.DecomposeApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return DecomposeRun(target=preset.target, method=preset.method, seed=0, batch_size=preset.batch_size,
                        threads=app.threads, n_eval=preset.n_eval, device=preset.device)  # fmt: skip


def compare_app(cfg: DictConfig, out: Path) -> Comparison:
    app: compare_schema.CompareApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    torch.set_num_threads(app.threads)
    t0 = time.perf_counter()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    apd_run, spd_run = apd_template(app), spd_template(app)
    if spd_run is not None and spd_run.target.to_dict() != apd_run.target.to_dict():
        raise ConfigError(f"spd_experiment={app.spd_experiment} decomposes {spd_run.target.name}, apd_experiment="
                          f"{app.apd_experiment} {apd_run.target.name}: compare on one target")  # fmt: skip
    target_comparison = comparison_for(apd_run.target.kind)
    comparison = target_comparison.run(app, apd_run, out, log.info, spd_run=spd_run)
    write_csv(comparison.rows, out / "comparison.csv", target_comparison.columns)
    for name, table in comparison.tables.items():
        if table:
            write_csv(table, out / f"{name}.csv", list(table[0]))
    figures = save_figures(comparison, app, out / "figures") if app.figures else []
    wall = time.perf_counter() - t0
    (out / "comparison.md").write_text(markdown(app, apd_run, comparison, wall, [p.relative_to(out) for p in figures]))
    if comparison.kind == "lm" and app.browser:
        from experiments import browse

        index = browse.build(out, log=log.info)
        log.info(f"feature browser: {index}")
    return comparison


def write_csv(rows: list[dict[str, Any]], path: Path, first: list[str] = COLUMNS) -> None:
    """One row per model, the ``first`` columns first; NaN (not applicable) is written as an empty cell."""
    columns = first + [c for c in rows[0] if c not in first] if rows else first
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, "") for c in columns})


# ---------------------------------------------------------------------------------------------
# comparison.md
# ---------------------------------------------------------------------------------------------

# (column, header, decimals); decimals None = integer, no std
_TABLE = [
    ("l0", "L0", 3), ("mmcs", "MMCS", 3), ("mmcs_learned", "MMCS learned", 3),
    ("matched_mean_cos", "1-1 cos", 3), ("n_recovered_0.9", "R.9", 1), ("n_recovered_0.99", "R.99", 1),
    ("n_recovered_matched_0.99", "1-1 R.99", 1), ("all_recovered", "all 1-1", 1), ("shrinkage", "shrinkage", 3),
    ("fvu", "FVU", 3), ("loss_recovered", "loss rec.", 3), ("n_dead", "dead", 1),
    ("latents_per_feature", "per feature", 2), ("n_duplicate_pairs", "dup. pairs", 1),
    ("n_params", "params", None), ("bits_per_datapoint", "bits", 2), ("wall_seconds", "s", None),
]  # fmt: skip

_BEST = ("l0", "matched_mean_cos", "n_recovered_matched_0.99", "all_recovered", "shrinkage", "fvu", "loss_recovered",
         "bits_per_datapoint")  # fmt: skip
"""the columns of the best-setting table"""

_LEGEND = """\
Legend (APD's definition where it differs from the SAEs'):
- **method**: `apd`, or the SAE grid's label (`architecture` in the CSV: standard = ReLU + L1 with unit-norm decoder,
  topk = TopK + AuxK, batchtopk = BatchTopK with its inference threshold, jumprelu = JumpReLU + L0 penalty);
  `transcoder_*` read the hidden layer's input and reconstruct its output.
- **width**: dictionary size d_sae; APD: number of components C. **knob=value**: the sparsity setting
  (`l1_coeff`, `k`, `l0_coeff`; APD: batch top-k `topk`).
- **L0**: mean non-zero latents per sample. APD: mean active components per sample under its batch top-k.
- **MMCS**: mean over features j of the best cosine with the feature's hidden direction W[:, j]: SAE decoder rows;
  APD: component columns P_c[:, j] (SPEC §3.1). A latent or component may serve several features.
- **MMCS learned**: mean over live latents of their best cosine with any feature. APD: mean over live components of
  the best Frobenius cosine of P_c with a ground-truth mechanism W e_j e_jᵀ (a component holding two features < 1).
- **1-1 cos**: mean cosine of the one-to-one (Hungarian) matching of features to distinct latents / components;
  **R.9, R.99**: features whose best cosine is ≥ 0.9 / 0.99; **1-1 R.99**: features matched one-to-one with
  cosine ≥ 0.99; **all 1-1**: fraction of seeds where every feature is (the paper's success criterion).
- **shrinkage**: SAE: the matched latent's activation on the one-feature input x = e_j times its decoder norm, over
  ‖W[:, j]‖. APD: ML2R, ‖P_{c*(j)}[:, j]‖ / ‖W[:, j]‖. Below 1 = shrunk.
- **FVU**: fraction of variance of the hidden activations h (after the identity for +ID) left unexplained by the
  reconstruction. APD: ĥ is the hidden layer of the top-k forward pass (Σ_c s_c P_c^enc x, then the masked identity).
- **loss rec.**: 1 − MSE(output, target output) / MSE(output with h zero-ablated, target output). SAE: its
  reconstruction spliced in for h. APD: the output of the top-k model (every decomposed matrix masked).
- **dead**: latents / components never active on the evaluation batch. **per feature**: live latents (components)
  with cosine ≥ tau to a feature, averaged over features (1 = one copy each, > 1 = split or duplicated; APD also needs
  the column to hold ≥ `negligible` of ‖W[:, j]‖); **dup. pairs**: pairs of live latents (APD: whole components,
  Frobenius) with cosine > tau.
- **params**: trainable SAE parameters; APD: Σ_l C·m·(d_in + d_out), a tied matrix once.
- **bits**: description length per datapoint. SAE: L0·(log₂ K + b) with b = BITS bits per active value; APD:
  L0·log₂ C (binary masks, no values). **s**: wall seconds per model (training + evaluation).
"""


_RESID_TABLE = [
    ("n_features_dedicated", "dedicated", 1), ("n_mono", "mono", 1), ("n_duo", "duo", 1), ("n_poly", "poly", 1),
    ("mmcs_enc", "MMCS enc", 3), ("matched_mean_cos_enc", "1-1 cos enc", 3),
    ("mse_vs_target", "MSE vs target", ".2e"), ("mse_vs_labels", "MSE vs labels", ".2e"), ("fvu_read", "FVU W_U", 3),
]  # fmt: skip
"""the residual-MLP columns (apd.compare.resid)"""

_RESID_BEST = ("l0", "matched_mean_cos", "n_features_dedicated", "shrinkage", "fvu", "fvu_read", "loss_recovered",
               "mse_vs_target", "bits_per_datapoint")  # fmt: skip

_RESID_LEGEND = """Legend (full definitions: the docstring of `apd/compare/resid.py`). Ground truth per feature i, on x = e_i: its MLP
input W_E[:, i], its MLP output t_i = W_out ReLU(W_in W_E[:, i]), its neurons a_i = ReLU(W_in W_E[:, i]) and its neuron
contributions NC(i) = (W_U[i] W_out) ⊙ (W_in W_E[:, i]) (SPEC §3.2).
- **method**: `apd`, or the SAE grid's label; `transcoder_*` read the MLP's input r = W_E x and predict its output,
  `sae_*` (neuron SAEs) reconstruct the neurons a = ReLU(W_in r). **width**: d_sae; APD: C. **knob=value**: sparsity.
- **L0**: mean non-zero latents (APD: active components under its batch top-k) per sample.
- **MMCS**, **1-1 cos** (Hungarian), **R.9 / R.99**, **1-1 R.99**, **all 1-1**: per feature the best cosine with its
  ground truth: transcoder decoder rows vs t_i; neuron-SAE decoder rows vs a_i; APD NC_c(i) vs NC(i).
  **MMCS learned**: per live latent its best cosine with any t_i (a_i); APD: per live component the Frobenius cosine of
  its whole NC_c with a one-feature mechanism NC(i) e_iᵀ.
- **shrinkage**: what the feature's unit alone adds to output i on x = e_i over what the MLP adds (W_U[i] · t_i ≈ 1);
  SAEs: the Hungarian-matched latent; APD: the component of best NC cosine, W_U[i] · P_c^out ReLU(P_c^in W_E[:, i]).
- **FVU**: of the MLP output in R^d_embed (transcoder, trained on exactly this; APD: the MLP output of its top-k forward
  pass, trained only through the outputs and the neurons) or of the neurons (neuron SAE).
- **loss rec.**: 1 − MSE(output, target output) / MSE(output with the MLP zero-ablated, target output), with the
  reconstruction spliced in (APD: the top-k model).
- **dead**: never active on the evaluation batch. **per feature**, **dup. pairs**: as for TMS on the vectors of MMCS.
- **params**: trainable SAE parameters; APD Σ_l C·m·(d_in + d_out). **bits**: SAE L0·(log₂ K + BITS); APD L0·log₂ C.
- **dedicated / mono / duo / poly** (SPEC §3.2): a unit serves feature i when its contribution to output i on x = e_i
  exceeds SERVE (APD: max over neurons of |NC_c(i)|, as the decompose run reports; SAEs: latent activation × its write
  read off at output i); mono / duo / poly serve 1 / 2 / ≥ 3 features; a feature is dedicated when a mono unit serves it.
- **MMCS enc**, **1-1 cos enc**: the read side: encoder columns vs the feature's input (transcoder W_E[:, i], neuron SAE
  a_i); APD ‖P_c^in ŵ_i‖ / ‖P_c^in‖_F (|cos(A_c, W_E[:, i])| for rank 1).
- **MSE vs target / labels**: output MSE of the spliced (APD: top-k) model against the target's output / the labels.
- **FVU W_U**: FVU of the MLP output as the unembedding reads it, W_U · (MLP output), reconstruction spliced in: the
  same for every model. **FVU** also counts the d_embed − n directions W_U ignores, where a decomposition trained on
  the outputs may be wrong at no cost.
"""


def _fmt(mean: float, std: float, decimals: int | str | None) -> str:
    """``decimals``: digits after the point, a format spec (e.g. ".2e"), or None for an integer without std."""
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    if decimals is None:
        return f"{mean:.0f}"
    spec = decimals if isinstance(decimals, str) else f".{decimals}f"
    return f"{mean:{spec}} ± {std:{spec}}"


def _num(value: float, decimals: int) -> str:
    """One number without a std ("–" for NaN, not applicable)."""
    return "–" if math.isnan(value) else f"{value:.{decimals}f}"


def _setting(a: dict[str, Any]) -> str:
    """``knob=value``; "–" for a row without a sparsity setting (the language model's neurons)."""
    return "–" if a["sparsity_knob"] == "none" else f"{a['sparsity_knob']}={a['sparsity']:g}"


def _table(groups: list[dict[str, Any]], columns: list[tuple[str, str, int | str | None]]) -> list[str]:
    lines = ["| method | width | setting | n | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for a in groups:
        cells = [_fmt(a[c], a.get(f"{c}_std", 0.0), d) for c, _, d in columns]
        lines.append(f"| {a['method']} | {a['width']} | {_setting(a)} | {a['n']} | " + " | ".join(cells) + " |")
    return lines


def _spd_line(app: compare_schema.CompareApp) -> str:
    """comparison.md's line on the SPD rows: finished runs, or the preset they were trained with."""
    if app.spd.runs:
        return f"SPD: {len(app.spd.runs)} finished run(s), scored as they are (not retrained)."
    run = spd_template(app)
    assert run is not None
    m = run.method
    return (f"SPD: decompose preset `experiment={app.spd_experiment}`" + (f" with {app.spd_overrides}" if app.spd_overrides else "")
            + f" — C={m.C} per matrix, CI function {m.ci_fn.value} {m.ci_hidden}, importance minimality "  # type: ignore[attr-defined]
            f"{m.importance_minimality_coeff:g} at p={m.pnorm:g}, {app.spd.steps or m.steps} steps, batch {run.batch_size}; "  # type: ignore[attr-defined]
            "evaluated with its causal importances as masks (L0: subcomponents with g > τ per input, summed over matrices).")


def markdown(app: compare_schema.CompareApp, apd_run: DecomposeRun, comparison: Comparison, wall: float,
             figures: list[Path]) -> str:  # fmt: skip
    if comparison.kind == "lm":
        return lm_markdown(app, apd_run, comparison, wall, figures)
    results, rows = comparison.results, comparison.rows
    groups = summarise(rows)
    best_key = comparison_for(comparison.kind).best_key
    target = apd_run.target
    m = apd_run.method
    resid = comparison.kind == "resid_mlp"
    side = comparison.side_methods
    main = [a for a in groups if a["method"] not in side]
    st = app.sae_train
    n_features = comparison.data.truth.shape[0]
    if app.apd.runs:
        apd_line = (f"APD: {len(app.apd.runs)} finished run(s) of `python -m experiments.decompose experiment={app.apd_experiment} "
                    "seed=S`, scored as they are (not retrained; their settings below).")  # fmt: skip
    else:
        apd_line = (
            f"APD: decompose preset `experiment={app.apd_experiment}`"
            + (f" with {app.apd_overrides}" if app.apd_overrides else "")
            + f" — C={m.C}, rank={m.rank if m.rank is not None else 'full'}, batch top-k={m.topk}, coefficients faithfulness/minimality/"
            f"simplicity {m.faithfulness_coeff:g}/{m.minimality_coeff:g}/{m.simplicity_coeff:g}, p={m.schatten_p:g}, lr "
            f"{m.lr:g} ({m.lr_schedule.value}), {app.apd.steps or m.steps} steps, batch {apd_run.batch_size}"
            + (f", final {m.finetune_frac:g} of the steps without the simplicity term" if getattr(m, "finetune_frac", 0) else "")
            + ". Grid: C ∈ " + str(app.apd.widths or [m.C]) + ", topk ∈ " + str(app.apd.topks or [m.topk]) + "."
        )  # fmt: skip
    if resid:
        data_line = ("trained on fresh samples: transcoders read the MLP's input r = W_E x and predict its output "
                     "W_out ReLU(W_in r); SAEs reconstruct the MLP's neurons ReLU(W_in r)")  # fmt: skip
    else:
        data_line = "trained on fresh samples of the hidden activations h" + (
            " (after the identity)" if getattr(target, "identity", False) else " = W x")
    grids = "; ".join(f"`{n}` ({g.architecture}{', transcoder' if g.transcoder else ''}): width ∈ {g.widths}, "
                      f"{g.knob} ∈ {g.sparsity_values}" + (f", {g.options}" if g.options else "") for n, g in app.saes.items())  # fmt: skip
    lines = [
        f"# APD vs SAE baselines on {target.name}",
        "",
        f"Target: the shipped `{target.name}` (`apd/toy_models/pretrained/{target.name}.pt`); every model is scored on the "
        f"same {app.n_eval} fresh samples (seed {app.eval_seed}). Seeds: {app.seeds}. Wall time of this invocation: "
        f"{wall / 60:.1f} min; the models' own training + evaluation times sum to "
        f"{sum(r['wall_seconds'] for r in rows if not math.isnan(r['wall_seconds'])) / 60:.1f} "
        "min (an APD run already finished is reloaded, with its original time).",
        "",
        apd_line,
        "",
        *([_spd_line(app), ""] if app.spd.enabled else []),
        f"SAEs: {st.steps} steps, batch {st.batch_size}, Adam lr {st.lr:g}, "
        + (f"gradient norm clipped to {st.grad_clip_norm:g}" if st.grad_clip_norm is not None else "no gradient clipping")
        + f", b_dec from the geometric median; {data_line}. "
        f"Grids: {grids}.",
        "",
        *([f"- {note}" for note in comparison.notes] + [""] if comparison.notes else []),
        f"## Results (mean ± std over seeds; {n_features} features)",
        "",
        *_table(main, _TABLE),
        "",
    ]  # fmt: skip
    if resid:
        lines += [
            f"### Residual-MLP quantities (serve threshold {app.serve_threshold:g})",
            "",
            *_table(main, _RESID_TABLE),
            "",
            "### Best setting per method",
            "",
            "(most features with a dedicated latent / component; ties: higher 1-1 cos, higher loss recovered, smaller width)",
            "",
            *_table(best_settings([r for r in rows if r["method"] not in side], best_key),
                    [c for c in _TABLE + _RESID_TABLE if c[0] in _RESID_BEST]),
            "",
            _RESID_LEGEND.replace("BITS", f"{app.bits_per_value:g}").replace("SERVE", f"{app.serve_threshold:g}"),
        ]  # fmt: skip
    else:
        lines += [
            "### Best setting per method",
            "",
            "(most seeds with every feature recovered one-to-one; ties: higher 1-1 cos, fewer duplicates, smaller width)",
            "",
            *_table(best_settings([r for r in rows if r["method"] not in side], best_key), [c for c in _TABLE if c[0] in _BEST]),
            "",
            _LEGEND.replace("BITS", f"{app.bits_per_value:g}"),
        ]  # fmt: skip
        if side or any(not math.isnan(r["id_n_components"]) for r in rows if r["method"] == "apd"):
            lines += _identity_section(groups, results, side, n_features, app)
    if figures:
        lines += ["## Figures", ""] + [f"- [`{p}`]({p})" for p in figures] + [""]
    return "\n".join(lines) + "\n"


def _identity_section(groups: list[dict[str, Any]], results: list[Trained], transcoders: set[str], n_features: int,
                      app: compare_schema.CompareApp) -> list[str]:  # fmt: skip
    cols = [("l0", "L0", 3), ("mmcs", "MMCS", 3), ("matched_mean_cos", "1-1 cos", 3),
            ("latents_per_feature", "per feature", 2), ("n_split_features", "split features", 1),
            ("n_duplicate_pairs", "dup. pairs", 1), ("n_dead", "dead", 1), ("fvu", "FVU", 3),
            ("loss_recovered", "loss rec.", 3)]  # fmt: skip
    lines = ["## The identity matrix: transcoder width sweep vs APD's components", ""]
    if transcoders:
        lines += [
            f"Transcoders map the identity's input W x to its output I W x. A feature *splits* when more than one live "
            f"latent has cosine ≥ {app.tau} with it (**per feature** > 1, **split features** = how many such features); "
            f"**dup. pairs** counts live latent pairs with cosine > {app.tau}.",
            "",
            *_table([a for a in groups if a["method"] in transcoders], cols),
            "",
        ]
    apd = [r for r in results if r.row["method"] == "apd" and not math.isnan(r.row["id_n_components"])]
    if apd:
        lines += [
            f"APD decomposes the identity together with W: each component c has a part P_c^hidden of I. **share** = "
            f"‖P_c^hidden‖_F / ‖I‖_F; a component *carries* the identity when its share ≥ {app.negligible}. "
            "**cos I**: Frobenius cosine with I (1 = the component is the identity, the ground truth: one rank-m "
            "mechanism). **cos Π_j**: best Frobenius cosine with a feature projector ŵ_j ŵ_jᵀ (1 = the identity is cut "
            "into per-feature pieces, as a transcoder cuts it into per-feature latents).",
            "",
            "| C | topk | seed | 1-1 cos | all 1-1 | components carrying I | largest share | best cos I | mean cos Π_j of carriers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in apd:
            w = r.row
            lines.append(f"| {w['width']} | {w['sparsity']:g} | {w['seed']} | {w['matched_mean_cos']:.3f} | {w['all_recovered']:.0f} | "
                         f"{w['id_n_components']:.0f} | {w['id_max_share']:.3f} | {w['id_best_cos_identity']:.3f} | "
                         f"{w['id_projector_cos']:.3f} |")  # fmt: skip
        best = max(apd, key=lambda t: (t.row["all_recovered"], t.row["matched_mean_cos"]))
        b = best.row
        lines += [
            "",
            f"Components of the best APD seed (C={b['width']}, topk={b['sparsity']:g}, seed {b['seed']}): its main W column "
            "(feature, cosine, norm share) and its part of the identity.",
            "",
            "| component | live | W feature | W cos | W share | I share | cos I | best Π_j | cos Π_j |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in best.details:
            lines.append(f"| {d['component']:.0f} | {'yes' if d['live'] else 'no'} | {d['enc_feature']:.0f} | {d['enc_cos']:.3f} | "
                         f"{d['enc_share']:.3f} | {d['share']:.3f} | {d['cos_identity']:.3f} | "
                         f"{d['best_projector_feature']:.0f} | {d['projector_cos']:.3f} |")  # fmt: skip
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# comparison.md of the language model
# ---------------------------------------------------------------------------------------------

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


def _lm_family_tables(groups: list[dict[str, Any]], app: compare_schema.CompareApp) -> list[str]:
    lines = []
    for method in dict.fromkeys(a["method"] for a in groups):
        members = [a for a in groups if a["method"] == method]
        grid = app.saes.get(method)
        kind = f"{grid.architecture}{', transcoder' if grid.transcoder else ''}" if grid else members[0].get("architecture", "")
        cols = [c for c in _LM_TABLE if any(not math.isnan(a[c[0]]) for a in members)]
        lines += [f"### {method} ({kind})", "", *_table(members, cols), ""]
    return lines


def _lm_budget_table(groups: list[dict[str, Any]]) -> list[str]:
    """Per method, the most loss recovered by a setting whose mean description length fits each budget:
    the decompositions' and the neurons' bits per token."""
    budgets = sorted({round(a["bits_per_token"], 1) for a in groups if a["method"] in ("neurons", "spd", "apd")})
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
        cells = [_fmt(a[c], a.get(f"{c}_std", 0.0), d) for c, _, d in _LM_PROXIES]
        lines.append(f"| {a['method']} w{a['width']} {_setting(a)} | {a['n']} | {a['n_live']:.0f} | " + " | ".join(cells) + " |")
    per_family: dict[tuple, list[dict[str, float]]] = {}
    for t in results:
        for d in t.details:
            if "family" in d:
                r = t.row
                per_family.setdefault((r["method"], r["width"], _setting(r), d["family"]), []).append(d)
    for (method, width, setting, family), ds in per_family.items():
        mean = {c: statistics.fmean(d[c] for d in ds) for c, _, _ in _LM_PROXIES + [("n_live", "", 0)]}
        cells = [_num(mean[c], d) for c, _, d in _LM_PROXIES]
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
                     f"{_num(r['act_corr'], 3)} | {_num(r['frac_act_above'], 3)} | {r['n_act']:.0f} | "
                     f"{_num(r['act_corr_frequent'], 3)} | {r['n_act_frequent']:.0f} |")  # fmt: skip
    return lines


def _lm_relation_table(summary: list[dict[str, Any]], tau: float) -> list[str]:
    if not summary:
        return ["(no SAE and no decomposition with rank-one subcomponents of both matrices to relate)"]
    lines = [f"| SAE | seed | decomposition | live latents | median out cos | frac out ≥ {tau:g} | mlp.down matched | "
             "median neuron cos | median in cos | top-token Jaccard median / mean |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['sae_method']} w{s['sae_width']} {s['sae_sparsity']:g} | {s['sae_seed']} | {s['decomposition']} seed "
                     f"{s['decomposition_seed']} | {s['n_latents']} | {s['median_out_cos']:.3f} | {s['frac_out_above']:.3f} | "
                     f"{s['components_matched']} of {s['components_live']} | {_num(s['median_neuron_cos'], 3)} | "
                     f"{_num(s['median_in_cos'], 3)} | {_num(s['median_top_jaccard'], 3)} / {_num(s['mean_top_jaccard'], 3)} |")  # fmt: skip
    return lines


def _lm_bars(groups: list[dict[str, Any]], app: compare_schema.CompareApp) -> list[str]:
    """Issue 14's bars: an SAE on the neurons with loss recovered ≥ 0.79 at L0 ≤ 20 and < 10% dead;
    SPD ≥ 0.9 of the MLP's loss contribution under its causal importances."""
    lines = []
    for method, grid in app.saes.items():
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
    for a in groups:
        if a["method"] == "spd":
            ok = a["loss_recovered"] >= 0.9
            lines.append(f"- `spd` ({_setting(a)}): loss recovered under its causal importances {a['loss_recovered']:.3f} "
                         f"(thresholded g > τ: {a['loss_recovered_thresholded']:.3f}) at L0 {a['l0']:.1f} subcomponents per "
                         f"token → {'meets' if ok else 'misses'} the bar (≥ 0.9).")  # fmt: skip
    return lines


def lm_markdown(app: compare_schema.CompareApp, apd_run: DecomposeRun, comparison: Comparison, wall: float,
                figures: list[Path]) -> str:  # fmt: skip
    """comparison.md of the language-model comparison (``apd.compare.lm``)."""
    rows, results = comparison.rows, comparison.results
    groups = summarise(rows)
    st = app.sae_train
    resampling = (f", dead latents resampled before steps {st.resample_steps} (silent for {st.resample_window} tokens; Bricken "
                  "et al.'s procedure)" if st.resample_steps else "")  # fmt: skip
    grids = "; ".join(f"`{n}` ({g.architecture}{', transcoder' if g.transcoder else ''}): width ∈ {g.widths}, {g.knob} ∈ "
                      f"{g.sparsity_values}" + (f", {g.options}" if g.options else "") + (f", training {g.train}" if g.train else "")
                      for n, g in app.saes.items())  # fmt: skip
    lines = [
        f"# SAEs, transcoders and parameter decompositions of the MLP of {apd_run.target.name}",
        "",
        f"Target: the shipped `{apd_run.target.name}` (`apd/toy_models/pretrained/{apd_run.target.name}.pt`). Seeds: {app.seeds}. "
        f"Wall time of this invocation: {wall / 60:.1f} min; the models' own training + evaluation times sum to "
        f"{sum(r['wall_seconds'] for r in rows if not math.isnan(r['wall_seconds'])) / 60:.1f} min.",
        "",
        f"SAEs: {st.steps} steps of {st.batch_size} tokens from training windows, Adam lr {st.lr:g}"
        + (f", {st.warmup_steps} warm-up steps" if st.warmup_steps else "") + f"{resampling}. Grids (`training`: the grid's "
        f"own training settings, e.g. resampling): {grids}.",
        "",
        *[f"- {note}" for note in comparison.notes],
        "",
        "## Results per model family (mean ± std over seeds)",
        "",
        *_lm_family_tables(groups, app),
        "## Bars",
        "",
        *_lm_bars(groups, app),
        "",
        "## Loss recovered at matched description length",
        "",
        "Per method, the most loss recovered by a setting whose mean bits per token fit the budget (the decompositions' and the "
        "neurons' own description lengths); figure `loss_vs_bits.png` shows every setting.",
        "",
        *_lm_budget_table(groups),
        "",
        f"## Monosemanticity proxies (over each unit's {app.proxy_top_k} top-activating tokens; mean ± std over seeds)",
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
        *_lm_seed_table(comparison.tables.get("seed_consistency", []), app.tau),
        "",
        "## SAE latents against decomposition subcomponents",
        "",
        "Each SAE of the first seed against the first seed of each decomposition with rank-one subcomponents: per live latent its "
        "best |cos| with a live `mlp.down` U_c in the MLP output space (**out**; neuron SAEs mapped through `mlp.down.weight`), "
        "with a live `mlp.up` U_c in neuron space (**neuron**; neuron SAEs), and of its input direction with `mlp.down`'s V_c "
        "(neuron SAEs) or `mlp.up`'s V_c (transcoders) (**in**); **mlp.down matched**: distinct live subcomponents that are "
        f"some latent's out match with cos ≥ {app.tau:g}; **top-token Jaccard**: overlap of the latent's and its out match's top "
        f"{app.proxy_top_k} token positions. Every latent: `sae_component_matches.csv`.",
        "",
        *_lm_relation_table(comparison.tables.get("sae_component_summary", []), app.tau),
        "",
        _LM_LEGEND.replace("BITS", f"{app.bits_per_value:g}").replace("ULTRALOW", f"{app.ultralow_density:g}")
        .replace("TOPK", str(app.proxy_top_k)),
    ]  # fmt: skip
    if figures:
        lines += ["## Figures", ""] + [f"- [`{p}`]({p})" for p in figures] + [""]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    compare_app(cfg, out)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
