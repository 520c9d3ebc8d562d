"""Decompositions (APD; any method) against sparse-autoencoder baselines on targets with known ground truth.

The library side of ``python -m experiments.compare``; no Hydra, no plotting. One concept per module:

- :mod:`apd.compare.config`: what is compared (:class:`SAEGrid`, :class:`APDGrid`, :class:`CompareConfig`).
- :mod:`apd.compare.runs`: training or reloading the decompositions and SAEs of the grids, the
  loops over them, and the :class:`Comparison` that holds every scored model.
- :mod:`apd.compare.scoring`: the target-independent columns of a row (:data:`COLUMNS`): SAEs at an
  :class:`SAESite`, decompositions from their components and their method's evaluation masks.
- :mod:`apd.compare.aggregate`: means and stds over seeds, each method's best setting.
- :mod:`apd.compare.registry`: the comparison of each target kind (:func:`comparison_for`).
- :mod:`apd.compare.tms` and :mod:`apd.compare.resid`: the targets' own activations, ground truth
  and scoring (TMS with its +ID identity; the 1-layer residual MLP), each registered by its kind.
- :mod:`apd.compare.lm`: the language model (no ground truth): finding and training its runs;
  :mod:`apd.compare.lm_scoring` computes loss recovered, KL, densities, description length,
  monosemanticity proxies, seed consistency and SAE-component relations.
- :mod:`apd.compare.report`: what every report (``comparison.md``) shares (:class:`ReportInputs`);
  each registered comparison owns its report (:mod:`apd.compare.toy_report` for TMS and the residual
  MLP, :mod:`apd.compare.lm_report` for the language model).

Generic modules never name a target's layers (the TMS module reads them off the model's attributes,
the residual-MLP module from ``ResidMLP.mlp_pairs()``) nor a method: a row's ``method`` is data, and
per-method behaviour comes from the method's class (:func:`apd.methods.method_class`).
"""

from apd.compare.aggregate import best_settings, summarise
from apd.compare.config import SPARSITY_KNOBS, APDGrid, CompareConfig, SAEGrid
from apd.compare.lm import (
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
    lm_best_key,
    lm_training_data,
    logit_scores,
    matched_correlation,
    matched_cosine,
    proxy_columns,
    rank_one_directions,
    relation_summary,
    run_lm_comparison,
    sae_component_relations,
    seed_consistency,
    splice_scores,
    top_positions,
    unit_proxies,
)
from apd.compare.registry import COMPARISONS, TargetComparison, check_target_kind, comparison_for, register_comparison
from apd.compare.report import ReportInputs
from apd.compare.resid import (
    RESID_COLUMNS,
    ResidActivations,
    component_outputs,
    evaluate_decomposition_resid,
    evaluate_sae_resid,
    latent_contributions,
    read_cosines,
    resid_activations,
    resid_best_key,
    resid_hidden,
    resid_site,
    resid_training_data,
    run_resid_comparison,
    serving_columns,
    unit_shrinkage,
)
from apd.compare.runs import (
    Comparison,
    decomposition_fields,
    decomposition_results,
    evaluation_target,
    load_decomposition_run,
    row_logger,
    run_decomposition,
    sae_results,
    train_sae_cell,
)
from apd.compare.scoring import (
    COLUMNS,
    SAESite,
    Trained,
    column_cosines,
    component_bits,
    component_feature_splitting,
    decomposition_n_params,
    decomposition_recovery_row,
    feature_splitting,
    live_components,
    mask_bits,
    n_dead_components,
    nan_identity,
    output_loss_recovered,
    sae_eval_mode,
    score_sae,
)
from apd.compare.tms import (
    TMSActivations,
    evaluate_decomposition,
    evaluate_sae_row,
    identity_parts,
    run_comparison,
    tms_activations,
    tms_best_key,
    tms_downstream,
    tms_hidden,
    tms_training_data,
    train_evaluate_sae,
)

__all__ = [
    # config
    "SPARSITY_KNOBS", "SAEGrid", "APDGrid", "CompareConfig",
    # runs
    "Comparison", "evaluation_target", "decomposition_fields", "run_decomposition", "load_decomposition_run",
    "decomposition_results", "train_sae_cell", "sae_results", "row_logger",
    # scoring
    "COLUMNS", "nan_identity", "Trained", "SAESite", "sae_eval_mode", "score_sae", "feature_splitting", "component_feature_splitting",
    "column_cosines", "decomposition_recovery_row", "output_loss_recovered", "decomposition_n_params", "component_bits",
    "live_components", "n_dead_components", "mask_bits",
    # aggregate
    "summarise", "best_settings",
    # registry and reports
    "ReportInputs", "TargetComparison", "COMPARISONS", "register_comparison", "comparison_for", "check_target_kind",
    # TMS
    "TMSActivations", "tms_hidden", "tms_activations", "tms_downstream", "tms_training_data", "train_evaluate_sae",
    "evaluate_sae_row", "evaluate_decomposition", "identity_parts", "tms_best_key", "run_comparison",
    # residual MLP
    "RESID_COLUMNS", "ResidActivations", "resid_hidden", "resid_activations", "resid_site", "resid_training_data",
    "serving_columns", "latent_contributions", "unit_shrinkage", "evaluate_sae_resid", "component_outputs",
    "read_cosines", "evaluate_decomposition_resid", "run_resid_comparison", "resid_best_key",
    # language model
    "LM_COLUMNS", "PROXIES", "LMActivations", "UnitSet", "LMTrained", "lm_activations", "lm_training_data", "logit_scores",
    "splice_scores", "density_columns", "unit_proxies", "proxy_columns", "top_positions", "evaluate_neurons",
    "evaluate_sae_lm", "rank_one_directions", "evaluate_decomposition_lm", "matched_cosine", "matched_correlation",
    "seed_consistency",
    "sae_component_relations", "relation_summary", "lm_best_key", "run_lm_comparison",
]  # fmt: skip
