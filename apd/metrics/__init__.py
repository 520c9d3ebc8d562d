"""Evaluation metrics: ground-truth recovery (generic, TMS), residual-MLP and SAE metrics.

``apd.metrics.resid_mlp`` (SPEC §3.2) and ``apd.metrics.sae`` (SPEC §4) are imported as modules.
"""

from apd.metrics import resid_mlp, sae
from apd.metrics.recovery import (
    RecoveryScores,
    all_recovered,
    cosine_matrix,
    hungarian_match,
    recovery_scores,
    represented_features,
)
from apd.metrics.tms import tms_recovery

__all__ = ["RecoveryScores", "all_recovered", "cosine_matrix", "hungarian_match", "recovery_scores", "represented_features",
           "tms_recovery", "resid_mlp", "sae"]  # fmt: skip
