"""The report (``comparison.md``) of the toy comparisons with ground truth: TMS (:mod:`apd.compare.tms`,
with the +ID identity section) and the 1-layer residual MLP (:mod:`apd.compare.resid`, with its own
quantities and legend): :func:`tms_report` and :func:`resid_report`, one body.
"""

import math
from typing import Any

from apd.compare.aggregate import best_settings, summarise
from apd.compare.config import CompareConfig
from apd.compare.registry import comparison_for
from apd.compare.report import ReportInputs, has_shared_components, markdown_table
from apd.compare.report import setting as _setting
from apd.compare.runs import Comparison
from apd.compare.scoring import Trained
from apd.methods import method_for

__all__ = ["tms_report", "resid_report"]

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


def _spd_line(inputs: ReportInputs) -> str:
    """The report's line on the SPD rows: finished runs, or the preset they were trained with."""
    cfg = inputs.cfg
    if cfg.spd.runs:
        return f"SPD: {len(cfg.spd.runs)} finished run(s), scored as they are (not retrained)."
    run = inputs.spd_run
    assert run is not None
    return (f"SPD: decompose preset `experiment={inputs.spd_preset}`" + (f" with {inputs.spd_overrides}" if inputs.spd_overrides else "")
            + " — " + method_for(run.method).preset_note(cfg.spd.steps or run.method.steps, run.batch_size) + ".")


def tms_report(inputs: ReportInputs, comparison: Comparison) -> str:
    """comparison.md of the TMS comparison (with the identity section on +ID or with transcoders)."""
    return _toy_report(inputs, comparison, resid=False)


def resid_report(inputs: ReportInputs, comparison: Comparison) -> str:
    """comparison.md of the 1-layer residual-MLP comparison (with its own quantities and legend)."""
    return _toy_report(inputs, comparison, resid=True)


def _toy_report(inputs: ReportInputs, comparison: Comparison, resid: bool) -> str:
    cfg, apd_run, wall, figures = inputs.cfg, inputs.apd_run, inputs.wall, inputs.figures
    results, rows = comparison.results, comparison.rows
    groups = summarise(rows)
    best_key = comparison_for(comparison.kind).best_key
    target = apd_run.target
    m = apd_run.method
    side = comparison.side_methods
    main = [a for a in groups if a["method"] not in side]
    st = cfg.sae_train
    n_features = comparison.data.truth.shape[0]
    if cfg.apd.runs:
        apd_line = (f"APD: {len(cfg.apd.runs)} finished run(s) of `python -m experiments.decompose experiment={inputs.apd_preset} "
                    "seed=S`, scored as they are (not retrained; their settings below).")  # fmt: skip
    else:
        apd_line = (
            f"APD: decompose preset `experiment={inputs.apd_preset}`"
            + (f" with {inputs.apd_overrides}" if inputs.apd_overrides else "")
            + " — " + method_for(m).preset_note(cfg.apd.steps or m.steps, apd_run.batch_size)
            + ". Grid: C ∈ " + str(cfg.apd.widths or [m.C]) + ", topk ∈ " + str(cfg.apd.topks or [m.topk]) + "."  # type: ignore[attr-defined]
        )  # fmt: skip
    if resid:
        data_line = ("trained on fresh samples: transcoders read the MLP's input r = W_E x and predict its output "
                     "W_out ReLU(W_in r); SAEs reconstruct the MLP's neurons ReLU(W_in r)")  # fmt: skip
    else:
        data_line = "trained on fresh samples of the hidden activations h" + (
            " (after the identity)" if getattr(target, "identity", False) else " = W x")
    grids = "; ".join(f"`{n}` ({g.architecture}{', transcoder' if g.transcoder else ''}): width ∈ {g.widths}, "
                      f"{g.knob} ∈ {g.sparsity_values}" + (f", {g.options}" if g.options else "") for n, g in cfg.saes.items())  # fmt: skip
    lines = [
        f"# APD vs SAE baselines on {target.name}",
        "",
        f"Target: the shipped `{target.name}` (`apd/toy_models/pretrained/{target.name}.pt`); every model is scored on the "
        f"same {cfg.n_eval} fresh samples (seed {cfg.eval_seed}). Seeds: {cfg.seeds}. Wall time of this invocation: "
        f"{wall / 60:.1f} min; the models' own training + evaluation times sum to "
        f"{sum(r['wall_seconds'] for r in rows if not math.isnan(r['wall_seconds'])) / 60:.1f} "
        "min (an APD run already finished is reloaded, with its original time).",
        "",
        apd_line,
        "",
        *([_spd_line(inputs), ""] if cfg.spd.enabled else []),
        f"SAEs: {st.steps} steps, batch {st.batch_size}, Adam lr {st.lr:g}, "
        + (f"gradient norm clipped to {st.grad_clip_norm:g}" if st.grad_clip_norm is not None else "no gradient clipping")
        + f", b_dec from the geometric median; {data_line}. "
        f"Grids: {grids}.",
        "",
        *([f"- {note}" for note in comparison.notes] + [""] if comparison.notes else []),
        f"## Results (mean ± std over seeds; {n_features} features)",
        "",
        *markdown_table(main, _TABLE),
        "",
    ]  # fmt: skip
    if resid:
        lines += [
            f"### Residual-MLP quantities (serve threshold {cfg.serve_threshold:g})",
            "",
            *markdown_table(main, _RESID_TABLE),
            "",
            "### Best setting per method",
            "",
            "(most features with a dedicated latent / component; ties: higher 1-1 cos, higher loss recovered, smaller width)",
            "",
            *markdown_table(best_settings([r for r in rows if r["method"] not in side], best_key),
                    [c for c in _TABLE + _RESID_TABLE if c[0] in _RESID_BEST]),
            "",
            _RESID_LEGEND.replace("BITS", f"{cfg.bits_per_value:g}").replace("SERVE", f"{cfg.serve_threshold:g}"),
        ]  # fmt: skip
    else:
        lines += [
            "### Best setting per method",
            "",
            "(most seeds with every feature recovered one-to-one; ties: higher 1-1 cos, fewer duplicates, smaller width)",
            "",
            *markdown_table(best_settings([r for r in rows if r["method"] not in side], best_key), [c for c in _TABLE if c[0] in _BEST]),
            "",
            _LEGEND.replace("BITS", f"{cfg.bits_per_value:g}"),
        ]  # fmt: skip
        if side or any(not math.isnan(r["id_n_components"]) for r in rows if has_shared_components(r["method"])):
            lines += _identity_section(groups, results, side, n_features, cfg)
    if figures:
        lines += ["## Figures", ""] + [f"- [`{p}`]({p})" for p in figures] + [""]
    return "\n".join(lines) + "\n"


def _identity_section(groups: list[dict[str, Any]], results: list[Trained], transcoders: set[str], n_features: int,
                      cfg: CompareConfig) -> list[str]:  # fmt: skip
    cols = [("l0", "L0", 3), ("mmcs", "MMCS", 3), ("matched_mean_cos", "1-1 cos", 3),
            ("latents_per_feature", "per feature", 2), ("n_split_features", "split features", 1),
            ("n_duplicate_pairs", "dup. pairs", 1), ("n_dead", "dead", 1), ("fvu", "FVU", 3),
            ("loss_recovered", "loss rec.", 3)]  # fmt: skip
    lines = ["## The identity matrix: transcoder width sweep vs APD's components", ""]
    if transcoders:
        lines += [
            f"Transcoders map the identity's input W x to its output I W x. A feature *splits* when more than one live "
            f"latent has cosine ≥ {cfg.tau} with it (**per feature** > 1, **split features** = how many such features); "
            f"**dup. pairs** counts live latent pairs with cosine > {cfg.tau}.",
            "",
            *markdown_table([a for a in groups if a["method"] in transcoders], cols),
            "",
        ]
    apd = [r for r in results if has_shared_components(r.row["method"]) and not math.isnan(r.row["id_n_components"])]
    if apd:
        lines += [
            f"APD decomposes the identity together with W: each component c has a part P_c^hidden of I. **share** = "
            f"‖P_c^hidden‖_F / ‖I‖_F; a component *carries* the identity when its share ≥ {cfg.negligible}. "
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
