"""Target-independent scoring: the columns of a comparison row and the functions that fill them.

An SAE is scored at an :class:`SAESite` (what it reads and reconstructs, its ground truth, how its
reconstruction reaches the output) by :func:`score_sae`. A decomposition (any method: APD, SPD) is
scored from its components' versions of the features' ground-truth columns
(:func:`decomposition_recovery_row`) and its method's evaluation masks (:func:`live_components`,
:func:`n_dead_components`, :func:`mask_bits`, with L0 from ``Method.mask_l0``). Masks are
one tensor shared by every decomposed module (APD) or a mapping from module to its own mask (SPD's
per-module causal importances); every function here takes either. The target modules
(:mod:`apd.compare.tms`, :mod:`apd.compare.resid`) say what the ground truth and the hidden layer are.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apd.baselines import SAE
from apd.component_model import Masks
from apd.decomposition import Decomposition
from apd.metrics.recovery import all_recovered, cosine_matrix
from apd.metrics.sae import LossRecovered, duplicate_latents, evaluate_sae
from apd.metrics.tms import tms_recovery

__all__ = [
    "COLUMNS",
    "nan_identity",
    "Trained",
    "SAESite",
    "sae_eval_mode",
    "score_sae",
    "feature_splitting",
    "component_feature_splitting",
    "column_cosines",
    "decomposition_recovery_row",
    "output_loss_recovered",
    "decomposition_n_params",
    "component_bits",
    "live_components",
    "n_dead_components",
    "mask_bits",
]

COLUMNS = [
    "method", "architecture", "seed", "width", "sparsity_knob", "sparsity",
    "l0", "mmcs", "mmcs_learned", "matched_mean_cos", "n_recovered_0.9", "n_recovered_0.99",
    "n_recovered_matched_0.99", "all_recovered", "shrinkage", "fvu", "loss_recovered", "n_dead",
    "latents_per_feature", "n_split_features", "n_duplicate_pairs",
    "n_params", "bits_per_datapoint", "wall_seconds",
    "id_n_components", "id_max_share", "id_best_cos_identity", "id_projector_cos",
]  # fmt: skip
"""Columns of a comparison row, in CSV order (``id_*`` only for a decomposition of a target with a
hidden identity (TMS +ID), NaN otherwise). ``all_recovered`` is 1 when every represented feature is
matched one-to-one with cosine ≥ 0.99 (SPEC §3.1, :func:`apd.metrics.recovery.all_recovered`)."""


def nan_identity() -> dict[str, float]:
    """The ``id_*`` columns, not applicable (NaN): every row of a target without a hidden identity."""
    return {k: float("nan") for k in COLUMNS if k.startswith("id_")}


@dataclass
class Trained:
    """A scored model: its CSV row and what the figures draw."""

    row: dict[str, Any]
    arrows: Float[Tensor, "k n_hidden"]
    """what each latent writes for a feature: its decoder row times its largest activation on a
    one-feature input (unit length if it never fires on one); a decomposition: every column P_c[:, j]
    holding at least ``negligible`` of ‖W[:, j]‖"""
    arrows_live: Bool[Tensor, " k"]
    """active on the evaluation batch"""
    arrow_labels: list[str] = field(default_factory=list)
    """a decomposition: the component each arrow belongs to (one component may draw several)"""
    details: list[dict[str, float]] = field(default_factory=list)
    """a decomposition: per component its main feature column (``enc_feature``, ``enc_cos``,
    ``enc_share``) and, on +ID, its part of the identity (see :func:`apd.compare.tms.identity_parts`)"""
    parts: dict[str, Tensor] = field(default_factory=dict)
    """the learned weights: a decomposition's component weights per matrix ([C, d_out, d_in]), an SAE's W_dec"""
    curve: dict[str, list[float]] = field(default_factory=dict)
    """an SAE trained with ``eval_every``: its held-out training curve ("step" and each metric)"""


# ---------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------


@dataclass
class SAESite:
    """Where an SAE grid sits in the target, on the evaluation batch: what it reads, what it
    reconstructs, its ground truth and how its reconstruction reaches the model's output."""

    inputs: Float[Tensor, "N d_in"]
    targets: Float[Tensor, "N d_out"] | None
    """what a transcoder predicts; None = ``inputs`` (an autoencoder)"""
    truth: Float[Tensor, "n_features d_out"]
    """per feature, what a latent should write (its decoder row's ground truth)"""
    onehot_in: Float[Tensor, "n_features d_in"]
    """per feature, the SAE's input on the one-feature input x = e_j"""
    downstream: Callable[[Tensor], Tensor]
    """reconstruction of this batch ↦ the model's output with it spliced in"""


@contextmanager
def sae_eval_mode(sae: SAE) -> Iterator[SAE]:
    """``sae`` in eval mode inside the block (a BatchTopK SAE then uses its inference threshold),
    its previous mode restored after."""
    was_training = sae.training
    sae.eval()
    try:
        yield sae
    finally:
        sae.train(was_training)


@torch.no_grad()
def _sae_arrows(sae: SAE, onehot_in: Float[Tensor, "n_features d_in"]) -> Float[Tensor, "d_sae d_out"]:
    acts = sae.encode(onehot_in.to(sae.W_enc))  # (n, d_sae)
    scale = acts.max(dim=0).values
    W_dec = sae.W_dec.detach()
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where((scale > 0)[:, None], W_dec * scale[:, None], unit).cpu()


@torch.no_grad()
def score_sae(sae: SAE, site: SAESite, *, bits_per_value: float = 8.0, tau: float = 0.9) -> Trained:
    """The target-independent columns of an SAE's row (:func:`apd.metrics.sae.evaluate_sae` on the
    site); the caller adds the method fields, wall time and its target's own columns."""
    ev = evaluate_sae(sae, site.inputs, site.targets, truth=site.truth, onehot_inputs=site.onehot_in,
                      downstream=site.downstream, bits_per_value=bits_per_value)  # fmt: skip
    assert ev.recovery is not None and ev.loss_recovered is not None and ev.mean_shrinkage is not None
    live = (ev.frequency > 0).cpu()
    rec = ev.recovery
    truth = site.truth.detach().float()
    recovered = all_recovered(cosine_matrix(truth, sae.W_dec.detach().float()), truth.norm(dim=1))
    row = {
        "l0": ev.l0, "mmcs": rec.mmcs, "mmcs_learned": rec.mmcs_learned, "matched_mean_cos": rec.matched_mean_cos,
        "n_recovered_0.9": float(rec.n_recovered[0.9]), "n_recovered_0.99": float(rec.n_recovered[0.99]),
        "n_recovered_matched_0.99": float(rec.n_recovered_matched[0.99]), "all_recovered": float(recovered),
        "shrinkage": ev.mean_shrinkage, "fvu": ev.fvu, "loss_recovered": ev.loss_recovered.score,
        "n_dead": float(ev.n_dead),
        **feature_splitting(sae.W_dec.detach().cpu(), site.truth.cpu(), live, tau),
        "n_params": float(ev.n_params), "bits_per_datapoint": ev.description_length_bits,
    }  # fmt: skip
    return Trained(row=row, arrows=_sae_arrows(sae, site.onehot_in), arrows_live=live, parts={"W_dec": sae.W_dec.detach().cpu()})


def feature_splitting(
    directions: Float[Tensor, "k d"], truth: Float[Tensor, "n d"], live: Bool[Tensor, " k"], tau: float = 0.9
) -> dict[str, float]:
    """How the learned directions cover the features: mean live directions per feature with cosine
    ≥ tau (1 = one copy each; > 1 = split or duplicated), features with ≥ 2 such directions, and
    pairs of live directions with cosine > tau."""
    hits = (cosine_matrix(truth.float(), directions.float()) >= tau) & live[None, :]  # (n, k)
    per_feature = hits.sum(1)
    return {
        "latents_per_feature": per_feature.float().mean().item(),
        "n_split_features": float((per_feature >= 2).sum()),
        "n_duplicate_pairs": float(duplicate_latents(directions, tau, live=live).shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# Decompositions: ground-truth recovery
# ---------------------------------------------------------------------------------------------


def column_cosines(W: Float[Tensor, "m n"], P: Float[Tensor, "C m n"]) -> Float[Tensor, "C n"]:
    """cos(P_c[:, j], W[:, j]) for every component c and feature j (0 for a zero column)."""
    W, P = W.detach().float().cpu(), P.detach().float().cpu()
    return torch.einsum("mj,cmj->cj", W, P) / (W.norm(dim=0)[None] * P.norm(dim=1)).clamp_min(1e-12)


def _mechanism_cosines(W: Float[Tensor, "m n"], P: Float[Tensor, "C m n"]) -> Float[Tensor, "C n"]:
    """Frobenius cosine of each component with each ground-truth mechanism Z_j = W e_j e_jᵀ."""
    W, P = W.detach().float().cpu(), P.detach().float().cpu()
    inner = torch.einsum("mj,cmj->cj", W, P)  # ⟨P_c, Z_j⟩ = P_c[:, j] · W[:, j]
    return inner / (P.flatten(1).norm(dim=1)[:, None] * W.norm(dim=0)[None]).clamp_min(1e-12)


def component_feature_splitting(
    W: Float[Tensor, "d n_features"],
    P: Float[Tensor, "C d n_features"],
    live: Bool[Tensor, " C"],
    tau: float = 0.9,
    negligible: float = 0.1,
) -> dict[str, float]:
    """:func:`feature_splitting` for parameter components: component c carries feature j when its
    column P_c[:, j] has cosine ≥ tau with W[:, j] and at least ``negligible`` of its norm; duplicates
    are live components whose whole matrices have Frobenius cosine > tau."""
    W, P = W.detach().float().cpu(), P.detach().float().cpu()
    w_norm = W.norm(dim=0)  # (n,)
    cols = P.norm(dim=1)  # (C, n)
    cos = column_cosines(W, P)
    carries = (cos >= tau) & (cols >= negligible * w_norm[None]) & live[:, None]  # (C, n)
    per_feature = carries.sum(0)
    flat = P.flatten(1)
    return {
        "latents_per_feature": per_feature.float().mean().item(),
        "n_split_features": float((per_feature >= 2).sum()),
        "n_duplicate_pairs": float(duplicate_latents(flat, tau, live=live & (flat.norm(dim=1) > 0)).shape[0]),
    }


def decomposition_recovery_row(
    W: Float[Tensor, "d n_features"],
    P: Float[Tensor, "C d n_features"],
    live: Bool[Tensor, " C"],
    *,
    tau: float = 0.9,
    negligible: float = 0.1,
) -> dict[str, float]:
    """The recovery columns of a decomposition's row from per-feature ground-truth columns W[:, j]
    and each component's version of them P_c[:, j] (TMS: W and the components of W; residual MLP:
    the neuron contributions NC(j) and NC_c(j)): MMCS, R_τ, the one-to-one matching, ``all_recovered``
    and ML2R as ``shrinkage`` (:func:`apd.metrics.tms.tms_recovery`), MMCS learned (per live
    component, the best Frobenius cosine with a mechanism W e_j e_jᵀ) and feature splitting
    (:func:`component_feature_splitting`)."""
    rec = tms_recovery(W, P, taus=(0.9, 0.99))
    mech = _mechanism_cosines(W, P)
    return {
        "mmcs": rec["mmcs"], "mmcs_learned": mech.max(dim=1).values[live].mean().item() if live.any() else 0.0,
        "matched_mean_cos": rec["matched_mean_cos"], "n_recovered_0.9": rec["n_recovered_0.9"],
        "n_recovered_0.99": rec["n_recovered_0.99"], "n_recovered_matched_0.99": rec["n_recovered_matched_0.99"],
        "all_recovered": rec["all_recovered"], "shrinkage": rec["ml2r"],
        **component_feature_splitting(W, P, live, tau, negligible),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decompositions: outputs, masks and description length
# ---------------------------------------------------------------------------------------------


def output_loss_recovered(
    out_masked: Float[Tensor, "N *out"], out_clean: Float[Tensor, "N *out"], out_ablated: Float[Tensor, "N *out"]
) -> LossRecovered:
    """1 − MSE(masked output, target output) / MSE(ablated output, target output): the decomposed
    model under its evaluation masks against the target with the hidden layer zero-ablated."""
    mse = lambda o: float((o.double() - out_clean.double()).pow(2).mean())  # noqa: E731
    spliced, ablated = mse(out_masked), mse(out_ablated)
    if ablated == 0:
        raise ValueError("the ablated and clean outputs are equal; loss recovered is undefined")
    return LossRecovered(score=1.0 - spliced / ablated, mse_clean=0.0, mse_spliced=spliced, mse_ablated=ablated)


def decomposition_n_params(dec: Decomposition) -> int:
    """Σ_l C·m·(d_in + d_out) over the decomposed matrices (a tied matrix counted once)."""
    return sum(dec.A[n].numel() + dec.B[n].numel() for n in dec.A)


def component_bits(l0: float, C: int) -> float:
    """L0·log₂ C: each active component costs its index; the masks are binary, so no value."""
    return l0 * math.log2(C) if C > 1 else 0.0


def _per_module(masks: Masks) -> dict[str | None, Float[Tensor, "B C"]]:
    """``{None: mask}`` for one shared mask, else the per-module masks; rows flattened to [N, C]."""
    items = {None: masks} if isinstance(masks, Tensor) else dict(masks)
    return {n: m.reshape(-1, m.shape[-1]) for n, m in items.items()}


def live_components(masks: Masks, module: str | None = None, threshold: float = 0.0) -> Bool[Tensor, " C"]:
    """Components active (mask > ``threshold``: the method's ``active_threshold()``, SPD's τ) on at
    least one row of the batch: of the shared mask (APD; then ``module`` is not needed), or of
    ``module``'s mask when the masks are per module (SPD)."""
    if isinstance(masks, Tensor):
        return (masks.reshape(-1, masks.shape[-1]) > threshold).any(0).cpu()
    if module is None or module not in masks:
        raise ValueError(f"the masks are per module ({sorted(masks)}): name the module whose live components to take "
                         f"(got {module!r})")  # fmt: skip
    return live_components(masks[module], threshold=threshold)


def n_dead_components(masks: Masks, threshold: float = 0.0) -> float:
    """Components never active (mask > ``threshold``) on the batch: of the shared mask, or summed
    over the modules' masks."""
    return float(sum((~(m > threshold).reshape(-1, m.shape[-1]).any(0)).sum().item() for m in _per_module(masks).values()))


def mask_bits(masks: Masks, threshold: float = 0.0) -> float:
    """Description length per row of the masks, :func:`component_bits` of the shared mask's L0 and
    C, or summed over the modules' masks (each module's L0 and its number of components); a component
    is active where its mask exceeds ``threshold``."""
    return sum(component_bits((m > threshold).float().sum(-1).mean().item(), m.shape[-1]) for m in _per_module(masks).values())
