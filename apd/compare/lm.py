"""The language-model comparison (SPEC §6; Bricken et al. 2023): SAEs, transcoders and decompositions
of the MLP of the one-layer transformer, every one scored on the same held-out tokens.

What ``python -m experiments.compare experiment=compare_lm_1l`` runs; the grid spec, the loops and
the method fields are :mod:`apd.compare.config`'s and :mod:`apd.compare.runs`'. The target is
``apd.toy_models.lm.TransformerLM`` (``LMTargetConfig``): its MLP ``mlp.down ∘ ReLU ∘ mlp.up`` reads
``mlp_in`` (d_model = 128, after ``ln2``), has 512 neurons and writes ``mlp_out`` (128). The models:

- ``neurons``: the MLP's own neurons, a baseline dictionary of 512 units (one row, no training).
- neuron SAEs (``transcoder: false``): trained on the neuron activations (d_in = 512) of training
  windows; spliced in as ``mlp.down(SAE(acts))``.
- transcoders (``transcoder: true``): read ``mlp_in`` and predict ``mlp_out``; spliced in as
  ``transcoder(mlp_in)``.
- decompositions of ``mlp.up`` and ``mlp.down`` (SPD; APD rank 1 with per-position top-k): the
  model run with every decomposed matrix under the method's evaluation masks, per token (SPD: the
  causal importances g; also thresholded, g > τ).

The evaluation set is ``n_eval`` held-out windows of ``seq_len`` tokens (next-token targets from
one token further), drawn from ``eval_seed``; all numbers below are over its N = n_eval · seq_len
tokens. Every row has :data:`LM_COLUMNS`:

- ``l0``: mean active units per token (SAE latents ≠ 0; neurons > 0; SPD: subcomponents with
  g > τ, summed over both matrices; APD: components selected by its top-k).
- ``loss_recovered``: (L_ablated − L) / (L_ablated − L_clean) with L the next-token cross-entropy
  with the model's reconstruction of the MLP output spliced in, L_clean the target's and L_ablated
  the MLP's output zero-ablated (Bricken et al.'s measure). ``loss_recovered_thresholded``: SPD
  with binary masks g > τ (NaN for the others). ``kl``: KL(target ‖ spliced) of the next-token
  distributions, nats per token. ``lm_loss``: L.
- ``fvu``: fraction of variance unexplained of what the model reconstructs (neuron SAE: the
  neurons; transcoder and decompositions: the MLP output); ``fvu_mlp_out``: of the MLP output for
  every model (the neuron SAE's through ``mlp.down``), the one comparable across all.
- ``n_dead``: units never active on the N tokens; ``n_ultralow``: live units active on a fraction
  below ``ultralow_density`` of them (Bricken et al.'s 1e-6 needs far more tokens: the resolution is
  1/N); ``median_log10_density``: over live units; ``n_live``. Decompositions: summed over the
  matrices' subcomponents (SPD) or over the shared components (APD).
- ``n_params``: SAE parameters; decompositions every trained tensor (components and SPD's
  causal-importance functions, needed to compute its masks); neurons: the MLP's weights and biases.
- ``bits_per_token``: description length, L0·(log₂ K + b) for SAEs and neurons (an index and a
  value of b bits per active unit); decompositions the method's mask bits, L0·log₂ C per matrix
  (binary masks: an index each).
- ``top_token_frac``, ``top_bigram_frac``, ``token_entropy`` (``_median`` and ``_mean`` over live
  units; decompositions pooled over their matrices): monosemanticity proxies that need no language
  model judge (``apd.browser.extract``): of a unit's ``proxy_top_k`` top-activating tokens, the
  share that are its most common token (bigram); the entropy in bits of the token it is active on.
  A unit's activation: SAE latent f_j; neuron its ReLU; a decomposition's unit the norm of what it
  writes under its mask, m_c · ‖P_c a‖ (SPD: zero where g ≤ τ).
- ``seed_cos_out``, ``seed_cos_in``: seed consistency, filled where a setting has several seeds
  (:func:`seed_consistency`): the Hungarian-matched mean cosine of the live units' output
  (decoder rows; SPD / APD: the rank-one U_c) and input (encoder columns; V_c) directions with
  those of each other seed, averaged over the other seeds (rank-one factors: |cos|, their sign is
  arbitrary). ``seed_act_corr``: the same for what the units *do*: the Hungarian-matched Pearson
  correlation, over the N tokens, of the live units' activations (as for the proxies) with those of
  the other seed, per family of units (SAE latents; SPD each matrix; APD its components), pooled
  (:func:`matched_correlation`; Bricken et al. compare features across runs by activation
  correlation). Two units that read and write different directions but fire on the same tokens
  match here, not in the cosines.

How SAE latents relate to components (:func:`sae_component_relations`): for every live latent, the
best-matching rank-one subcomponent by |cos| of output directions in the MLP output space
(neuron-SAE decoder rows mapped through ``mlp.down.weight``; transcoder decoder rows as they are)
against ``mlp.down``'s U_c; of neuron-space writes against ``mlp.up``'s U_c (neuron SAEs); of input
directions (neuron SAE encoder columns against ``mlp.down``'s V_c; transcoder encoder columns
against ``mlp.up``'s V_c); and the Jaccard overlap of the latent's and its best ``mlp.down``
subcomponent's top-activating token positions.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apd.baselines import SAE, SAEEvaluate
from apd.compare.config import CompareConfig, SAEGrid
from apd.compare.lm_scoring import (
    LM_COLUMNS,
    PROXIES,
    LMActivations,
    LMTrained,
    UnitSet,
    density_columns,
    evaluate_decomposition_lm,
    evaluate_neurons,
    evaluate_sae_lm,
    lm_activations,
    lm_training_data,
    logit_scores,
    matched_correlation,
    matched_cosine,
    proxy_columns,
    rank_one_directions,
    relation_summary,
    sae_component_relations,
    seed_consistency,
    splice_scores,
    top_positions,
    unit_proxies,
)
from apd.compare.lm_scoring import __all__ as _scoring_names
from apd.compare.lm_report import lm_report
from apd.compare.registry import TargetComparison, check_target_kind, register_comparison
from apd.compare.runs import Comparison, decomposition_results, row_logger, sae_results, train_sae_cell
from apd.compare.scoring import Trained
from apd.experiment import DecomposeRun
from apd.methods import method_for
from apd.metrics.sae import fraction_variance_unexplained
from apd.targets import LMTargetConfig, get_target
from apd.toy_models.lm import TransformerLM

__all__ = [*_scoring_names, "lm_best_key", "lm_curve_evaluate", "run_lm_comparison"]  # the computing part re-exported (old imports keep working)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def lm_best_key(a: dict[str, Any]) -> tuple:
    """The most loss recovered (to 3 decimals), then the fewer bits per token."""
    return (round(a["loss_recovered"], 3), -a["bits_per_token"])


def lm_curve_evaluate(model: TransformerLM, data: LMActivations, transcoder: bool) -> SAEEvaluate:
    """The held-out evaluation of an SAE's training curve on ``data`` (a small batch of its own):
    ``loss_recovered`` (the reconstruction spliced in, against zero-ablating the MLP), ``fvu`` of what
    the SAE reconstructs (neurons, or the MLP output for a transcoder) and ``l0``."""
    inputs = (data.mlp_in if transcoder else data.acts).reshape(-1, (data.mlp_in if transcoder else data.acts).shape[-1])
    target = data.mlp_out.reshape(-1, data.mlp_out.shape[-1]) if transcoder else inputs
    lead = data.mlp_out.shape[:-1]

    @torch.no_grad()
    def evaluate(sae: SAE) -> dict[str, float]:
        f = sae.encode(inputs.to(sae.W_enc))
        recon = sae.decode(f)
        mlp_out = recon if transcoder else model.mlp.down(recon)
        return {"loss_recovered": splice_scores(model, data, mlp_out.reshape(*lead, -1))["loss_recovered"],
                "fvu": fraction_variance_unexplained(target, recon), "l0": float((f != 0).sum(-1).float().mean())}  # fmt: skip

    return evaluate


def _relations(results: list[Trained], W_down: Tensor, tau: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every SAE of the first seed against the first seed of every decomposition with rank-one units
    of both matrices: the per-latent table and its summary (one line per pair)."""
    lm = [t for t in results if isinstance(t, LMTrained)]
    decs: dict[str, LMTrained] = {}
    for t in lm:
        if {"mlp.up", "mlp.down"} <= set(t.units) and t.row["method"] not in decs:
            decs[t.row["method"]] = t
    saes = [t for t in lm if "latents" in t.units]
    first_seed = min((t.row["seed"] for t in saes), default=0)
    full, summary = [], []
    for sae in (t for t in saes if t.row["seed"] == first_seed):
        for dec in decs.values():
            rows = sae_component_relations(sae, dec, W_down)
            full += rows
            summary.append(relation_summary(rows, int(dec.units["mlp.down"].live.sum()), tau))
    return full, summary


def _preset_note(label: str, run: DecomposeRun, steps: int | None) -> str:
    """The comparison.md line of a decomposition trained inside the comparison: its settings."""
    m = run.method
    settings = method_for(m).key_settings_text()
    return (f"{label}: trained here with its decompose preset ({settings}), {steps if steps is not None else m.steps} steps "
            f"of {run.batch_size} windows.")  # fmt: skip


def run_lm_comparison(
    cfg: CompareConfig, apd_run: DecomposeRun, out_dir: str | Path, log: Callable[[str], None] = print,
    spd_run: DecomposeRun | None = None,
) -> Comparison:  # fmt: skip
    """The MLP's neurons, the decompositions (``cfg.apd`` × seeds on top of ``apd_run``'s method, or
    finished runs; SPD from ``spd_run`` or ``cfg.spd.runs``) and every SAE grid × ``cfg.seeds`` on
    the shipped language model, all scored on ``cfg.n_eval`` held-out windows; then seed
    consistency and the SAE-component relations (``Comparison.tables``). Layout of ``out_dir`` as
    the other comparisons' (``apd/``, ``spd/``, ``saes/``)."""
    check_target_kind(apd_run, LMTargetConfig.kind, "run_lm_comparison")
    target_cfg = apd_run.target
    assert isinstance(target_cfg, LMTargetConfig)
    out = Path(out_dir)
    t0 = time.perf_counter()
    model, _ = get_target(target_cfg)
    model.eval()
    assert isinstance(model, TransformerLM)
    data = lm_activations(model, target_cfg, cfg.n_eval, cfg.eval_seed)
    opts = {"ultralow_density": cfg.ultralow_density, "proxy_top_k": cfg.proxy_top_k}
    results: list[Trained] = []
    done = row_logger(results, log, {"l0": "l0", "lossrec": "loss_recovered", "kl": "kl", "dead": "n_dead",
                                     "bits": "bits_per_token", "top_tok": "top_token_frac_median"})  # fmt: skip
    done(evaluate_neurons(model, data, bits_per_value=cfg.bits_per_value, **opts))
    notes = [f"Evaluation: {cfg.n_eval} held-out windows × {target_cfg.seq_len} tokens = {data.n_tokens} tokens (seed "
             f"{cfg.eval_seed}); density resolution 1/{data.n_tokens} = {1 / data.n_tokens:.1e}. Next-token loss: target "
             f"{data.loss_clean:.4f}, MLP zero-ablated {data.loss_ablated:.4f} nats/token (the MLP's loss contribution "
             f"{data.loss_ablated - data.loss_clean:.4f})."]  # fmt: skip
    if cfg.apd.enabled and not cfg.apd.runs:
        notes.append(_preset_note("APD", apd_run, cfg.apd.steps))
    if cfg.spd.enabled and not cfg.spd.runs and spd_run is not None:
        notes.append(_preset_note("SPD", spd_run, cfg.spd.steps))
    decomposition_results(cfg, apd_run, out, lambda dec: evaluate_decomposition_lm(dec, model, data, **opts), done, notes, spd_run)

    curve_data = lm_activations(model, target_cfg, cfg.curve_n_eval, cfg.eval_seed + 1) if cfg.sae_train.eval_every else None

    def train(name: str, grid: SAEGrid, width: int, value: float, seed: int, save: Path | None) -> Trained:
        d_in, d_out = (target_cfg.d_model, target_cfg.d_model) if grid.transcoder else (target_cfg.d_mlp, target_cfg.d_mlp)
        return train_sae_cell(
            name, grid, width, value, seed, d_in, d_out, lm_training_data(model, target_cfg, grid.transcoder),
            lambda sae: evaluate_sae_lm(sae, model, data, transcoder=grid.transcoder, bits_per_value=cfg.bits_per_value, **opts),
            cfg.sae_train, save, None if curve_data is None else lm_curve_evaluate(model, curve_data, grid.transcoder),
        )  # fmt: skip

    sae_results(cfg, out, train, done)
    tables = {"seed_consistency": seed_consistency(results, cfg.tau)}
    tables["sae_component_matches"], tables["sae_component_summary"] = _relations(results, model.mlp.down.weight.detach(), cfg.tau)
    log(f"language-model comparison: {len(results)} models in {time.perf_counter() - t0:.0f} s")
    return Comparison(results, model, data, kind=LMTargetConfig.kind, notes=notes, tables=tables)


register_comparison(TargetComparison(kind=LMTargetConfig.kind, run=run_lm_comparison, columns=LM_COLUMNS, best_key=lm_best_key,
                                       report=lm_report))  # fmt: skip
