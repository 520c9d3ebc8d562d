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

Generic modules never name a target's layers: the TMS module reads them off the model's attributes,
the residual-MLP module from ``ResidMLP.mlp_pairs()``.
"""

from apd.compare.aggregate import best_settings, summarise
from apd.compare.config import DECOMPOSITION_KNOBS, SPARSITY_KNOBS, APDGrid, CompareConfig, SAEGrid
from apd.compare.registry import COMPARISONS, TargetComparison, check_target_kind, comparison_for, register_comparison
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
    "SPARSITY_KNOBS", "DECOMPOSITION_KNOBS", "SAEGrid", "APDGrid", "CompareConfig",
    # runs
    "Comparison", "evaluation_target", "decomposition_fields", "run_decomposition", "load_decomposition_run",
    "decomposition_results", "train_sae_cell", "sae_results", "row_logger",
    # scoring
    "COLUMNS", "nan_identity", "Trained", "SAESite", "score_sae", "feature_splitting", "component_feature_splitting",
    "column_cosines", "decomposition_recovery_row", "output_loss_recovered", "decomposition_n_params", "component_bits",
    "live_components", "n_dead_components", "mask_bits",
    # aggregate
    "summarise", "best_settings",
    # registry
    "TargetComparison", "COMPARISONS", "register_comparison", "comparison_for", "check_target_kind",
    # TMS
    "TMSActivations", "tms_hidden", "tms_activations", "tms_downstream", "tms_training_data", "train_evaluate_sae",
    "evaluate_sae_row", "evaluate_decomposition", "identity_parts", "tms_best_key", "run_comparison",
    # residual MLP
    "RESID_COLUMNS", "ResidActivations", "resid_hidden", "resid_activations", "resid_site", "resid_training_data",
    "serving_columns", "latent_contributions", "unit_shrinkage", "evaluate_sae_resid", "component_outputs",
    "read_cosines", "evaluate_decomposition_resid", "run_resid_comparison", "resid_best_key",
]  # fmt: skip
