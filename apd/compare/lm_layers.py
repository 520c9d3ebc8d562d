"""Per-layer MLP replacements of a multi-layer language model, side by side: one transcoder per
layer's MLP (:func:`apd.baselines.train_layer_transcoders`) against an SPD decomposition's
subcomponents of that MLP's matrices, on the same held-out windows (#29's fair baseline on the
4-layer LM; ``python -m experiments.layer_transcoders RUN_DIR``).

Per layer i and MLP module M (``layers.{i}.mlp``), every other module running as the target's:

- ``loss_recovered``: (L_ablated − L) / (L_ablated − L_clean), L the next-token cross-entropy with
  M's output replaced, L_ablated with M's output zero (for a bias-free MLP the same as its matrices
  zero), L_clean the target's. Transcoder: its prediction spliced in for M's output. SPD: M's
  matrices under the causal-importance masks g (``masked``) or the binary masks g > τ
  (``thresholded``), every other decomposed matrix the target's weight.
- ``l0``: active units per token (transcoder latents ≠ 0; SPD subcomponents with g > τ, summed over
  M's matrices).
- ``bits_per_token``: description length as the one-layer comparison counts it
  (``apd.compare.lm``): L0·(log₂ K + b) for a transcoder of K latents, Σ_m L0_m·log₂ C_m for SPD.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from apd.baselines.layers import recovered_fraction
from apd.component_model import ComponentModel
from apd.metrics.sae import description_length_bits
from apd.toy_models.lm import lm_loss

__all__ = ["mlp_modules", "decomposition_layer_scores", "transcoder_layer_row"]


def mlp_modules(matrix_names: Sequence[str]) -> dict[str, list[str]]:
    """The MLP modules of the decomposed matrices, in order: each matrix's parent module whose last
    name part is ``mlp`` (``layers.2.mlp.up`` → ``layers.2.mlp``), with its decomposed matrices."""
    out: dict[str, list[str]] = {}
    for name in matrix_names:
        parent = name.rsplit(".", 1)[0]
        if parent.rsplit(".", 1)[-1] == "mlp":
            out.setdefault(parent, []).append(name)
    if not out:
        raise ValueError(f"no decomposed matrix lies in a module named 'mlp' (the matrices: {list(matrix_names)[:8]}...); "
                         "this comparison replaces each layer's MLP")  # fmt: skip
    return out


@torch.no_grad()
def decomposition_layer_scores(
    model: nn.Module, cm: ComponentModel, ci: dict[str, Tensor], x: Tensor, y: Tensor, matrices: Sequence[str], tau: float
) -> dict[str, float]:
    """One module's scores under SPD's masks (module docstring): ``loss_clean``, ``loss_ablated``
    (``matrices`` zero), ``loss`` and ``loss_recovered`` (``matrices`` under g),
    ``loss_recovered_thresholded`` (under g > τ), ``l0`` and ``bits_per_token``."""
    C = cm.C_per_module()
    clean = float(lm_loss(model(x), y))

    def loss(mask: dict[str, Tensor]) -> float:
        return float(lm_loss(cm(x, masks=mask), y))

    ablated = loss({n: torch.zeros_like(ci[n]) for n in matrices})
    masked = loss({n: ci[n] for n in matrices})
    thresholded = loss({n: (ci[n] > tau).to(ci[n].dtype) for n in matrices})
    l0 = {n: float((ci[n] > tau).sum(-1).float().mean()) for n in matrices}
    return {
        "loss_clean": clean, "loss_ablated": ablated, "loss": masked,
        "loss_recovered": recovered_fraction(clean, ablated, masked),
        "loss_recovered_thresholded": recovered_fraction(clean, ablated, thresholded),
        "l0": sum(l0.values()),
        "bits_per_token": sum(v * math.log2(C[n]) for n, v in l0.items()),
    }  # fmt: skip


def transcoder_layer_row(scores: dict[str, float], bits_per_value: float, record: dict[str, Any], n_latents: int, k: int) -> dict[str, Any]:
    """A transcoder's row: its training record (``TrainResult.curve_record()``: steps, converged, the
    curve; or an earlier row of the same transcoder, whose scores these replace), its scores
    (``apd.baselines.transcoder_scores``), its size and its description length."""
    return {**record, **scores, "n_latents": n_latents, "k": k,
            "bits_per_token": description_length_bits(scores["l0"], n_latents, bits_per_value)}  # fmt: skip
