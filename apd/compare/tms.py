"""The TMS comparison (SPEC §2.1, §3.1, §4): decompositions against SAEs on the toy models of superposition.

The target is x̂ = ReLU(Wᵀ (I) W x + b): its ``enc`` layer writes the hidden activations h = W x,
the +ID variant's ``hidden`` identity maps them to I W x, and the decoder reads them. SAEs are
trained on fresh hidden activations (the decoder's input h; transcoders map the hidden layer's
input W x to h, across the identity). Every model is scored on the same evaluation batch of the same
shipped target into one row of :data:`apd.compare.COLUMNS`.

Where a decomposition's numbers are defined differently from the SAE ones (an SAE has latents, a
decomposition has parameter components, active under its method's evaluation masks: APD's top-k):

- ``mmcs``, ``matched_mean_cos``, ``n_recovered_τ``: per feature j, the best cosine of a
  component's column P_c[:, j] with W[:, j] (:func:`apd.metrics.tms.tms_recovery`); for an SAE the
  best cosine of a decoder row with the feature's hidden direction. ``all_recovered``: every
  represented feature matched one-to-one with cosine ≥ 0.99 (the same function for both).
- ``mmcs_learned``: per live component, the best Frobenius cosine of P_c with a ground-truth
  mechanism W e_j e_jᵀ (a component holding two features scores < 1); for an SAE, per live latent
  the best cosine of its decoder row with a feature direction.
- ``shrinkage``: ML2R ‖P_{c*(j)}[:, j]‖ / ‖W[:, j]‖; for an SAE the matched latent's magnitude on
  the one-feature input, times its decoder norm, over ‖W[:, j]‖.
- ``l0``: mean active components per sample under the evaluation masks (summed over modules for
  per-module masks, ``Method.mask_l0``); for an SAE mean non-zero latents.
- ``fvu``: the hidden activations of the masked forward pass (ĥ = Σ_c s_c P_c^{enc} x, after the
  masked identity for +ID) against the target's; for an SAE its reconstruction.
- ``loss_recovered``: 1 − MSE(masked output, target output) / MSE(zero-ablated hidden, target
  output); for an SAE the reconstruction is spliced into the target's hidden layer.
- ``n_dead``: components (latents) never active on the evaluation batch.
- ``n_params``: Σ_l C·m·(d_in + d_out) (a tied matrix once); for an SAE its trainable parameters.
- ``bits_per_datapoint``: L0·log₂ C (binary masks: an active component costs its index); for an SAE
  L0·(log₂ K + b), b bits for each active latent's value.
- ``id_*`` (+ID only): how the decomposition splits the identity over its components (:func:`identity_parts`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from apd.baselines import SAE, SAETrainConfig
from apd.compare.config import CompareConfig, SAEGrid
from apd.compare.registry import TargetComparison, check_target_kind, register_comparison
from apd.compare.runs import (
    Comparison,
    decomposition_results,
    evaluation_target,
    row_logger,
    sae_results,
    train_sae_cell,
)
from apd.compare.scoring import (
    COLUMNS,
    SAESite,
    Trained,
    column_cosines,
    decomposition_n_params,
    decomposition_recovery_row,
    live_components,
    mask_bits,
    n_dead_components,
    nan_identity,
    output_loss_recovered,
    score_sae,
)
from apd.compare.toy_report import tms_report
from apd.decomposition import Decomposition
from apd.experiment import DecomposeRun
from apd.methods import method_for
from apd.metrics.sae import fraction_variance_unexplained
from apd.targets import TargetConfig, TMSTargetConfig
from apd.toy_models.tms import TMS

__all__ = [
    "TMSActivations",
    "tms_hidden",
    "tms_activations",
    "tms_downstream",
    "tms_training_data",
    "train_evaluate_sae",
    "evaluate_sae_row",
    "evaluate_decomposition",
    "identity_parts",
    "tms_best_key",
    "run_comparison",
]


@dataclass
class TMSActivations:
    """One evaluation batch: inputs, hidden activations before/after the (+ID) identity, outputs."""

    x: Float[Tensor, "N n_features"]
    h_in: Float[Tensor, "N n_hidden"]
    """W x (the hidden layer's input: what a transcoder reads)"""
    h: Float[Tensor, "N n_hidden"]
    """the hidden activations the decoder reads: W x, or I W x for +ID (what an SAE reconstructs)"""
    out: Float[Tensor, "N n_features"]
    truth: Float[Tensor, "n_features n_hidden"]
    """feature j's hidden direction h(e_j) (= W[:, j] without +ID): the SAEs' ground truth"""
    onehot_in: Float[Tensor, "n_features n_hidden"]
    """h_in(e_j): the SAE / transcoder input of feature j alone"""


@torch.no_grad()
def tms_hidden(target: TMS, x: Float[Tensor, "B n_features"]) -> tuple[Tensor, Tensor]:
    """(h_in, h): ``enc``'s output W x, and the decoder's input (after ``hidden`` for +ID)."""
    h_in = target.enc(x)
    return h_in, (target.hidden(h_in) if target.hidden is not None else h_in)


def tms_downstream(target: TMS) -> Callable[[Tensor], Tensor]:
    """h ↦ ReLU(Wᵀ h + b): the rest of the target after its hidden layer."""
    return lambda h: F.relu(target.dec(h))


@torch.no_grad()
def tms_activations(target: TMS, x: Float[Tensor, "N n_features"]) -> TMSActivations:
    """The evaluation batch ``x`` through ``target``, and each feature's one-feature hidden activations."""
    h_in, h = tms_hidden(target, x)
    eye = torch.eye(target.config.n_features, device=x.device)
    onehot_in, truth = tms_hidden(target, eye)
    return TMSActivations(x=x, h_in=h_in, h=h, out=tms_downstream(target)(h), truth=truth, onehot_in=onehot_in)


def tms_training_data(target: TMS, target_cfg: TargetConfig, transcoder: bool) -> Callable[[int, torch.Generator], Any]:
    """Fresh batches of ``target_cfg`` (the target's own data) mapped to the SAE's data: h
    (autoencoder) or (h_in, h) (transcoder)."""

    def draw(batch_size: int, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        h_in, h = tms_hidden(target, target_cfg.batch(batch_size, generator))
        return (h_in, h) if transcoder else h

    return draw


def _module_name(target: TMS, module: nn.Module) -> str:
    """The name of one of ``target``'s layers: what the decomposition's matrices and
    ``ComponentModel.capture`` are keyed by."""
    return next(name for name, m in target.named_modules() if m is module)


# ---------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------


def train_evaluate_sae(
    name: str,
    grid: SAEGrid,
    width: int,
    value: float,
    seed: int,
    target: TMS,
    target_cfg: TargetConfig,
    data: TMSActivations,
    train_cfg: SAETrainConfig | None = None,
    *,
    bits_per_value: float = 8.0,
    tau: float = 0.9,
    save_dir: Path | None = None,
) -> Trained:
    """Train one SAE (one grid cell, one seed) on fresh TMS hidden activations; score it on ``data``."""
    return train_sae_cell(
        name, grid, width, value, seed, data.h_in.shape[1], data.h.shape[1],
        tms_training_data(target, target_cfg, grid.transcoder),
        lambda sae: evaluate_sae_row(sae, target, data, transcoder=grid.transcoder, bits_per_value=bits_per_value, tau=tau),
        train_cfg, save_dir,
    )  # fmt: skip


@torch.no_grad()
def evaluate_sae_row(
    sae: SAE, target: TMS, data: TMSActivations, *, transcoder: bool = False, bits_per_value: float = 8.0, tau: float = 0.9
) -> Trained:
    """Score a trained SAE (or transcoder) on ``data``; the row's method fields and wall time are
    the caller's."""
    site = SAESite(inputs=data.h_in if transcoder else data.h, targets=data.h if transcoder else None, truth=data.truth,
                   onehot_in=data.onehot_in, downstream=tms_downstream(target))  # fmt: skip
    trained = score_sae(sae, site, bits_per_value=bits_per_value, tau=tau)
    trained.row |= nan_identity()
    return trained


# ---------------------------------------------------------------------------------------------
# Decompositions
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_decomposition(
    dec: Decomposition, target: TMS, data: TMSActivations, *, tau: float = 0.9, negligible: float = 0.1
) -> Trained:
    """Score a decomposition of ``target`` (any method, under its method's evaluation masks) on
    ``data`` with the SAE columns' meanings (module docstring); the row's method fields and wall
    time are the caller's."""
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    method = method_for(dec.config)
    masks = method.eval_masks(cm, data.x)
    active = method.active_threshold()
    enc = _module_name(target, target.enc)
    read = _module_name(target, target.hidden) if target.hidden is not None else enc  # the layer the decoder reads
    with cm.capture([read]) as acts:
        out_masked = cm(data.x, masks=masks)
    h_hat = acts[read]

    W = target.W.detach()
    P = dec.component_weights()[enc].to(W)
    live = live_components(masks, enc, active)
    ablated = tms_downstream(target)(torch.zeros_like(data.h))
    row = {
        "l0": method.mask_l0(masks)["l0"], **decomposition_recovery_row(W, P, live, tau=tau, negligible=negligible),
        "fvu": fraction_variance_unexplained(data.h, h_hat),
        "loss_recovered": output_loss_recovered(out_masked, data.out, ablated).score,
        "n_dead": n_dead_components(masks, active),
        "n_params": float(decomposition_n_params(dec)), "bits_per_datapoint": mask_bits(masks, active),
    }  # fmt: skip
    Pc = P.cpu()
    cols = Pc.norm(dim=1)  # (C, n)
    best_col = cols.argmax(dim=1)  # (C,)
    w_norm = W.cpu().norm(dim=0)
    col_cos = column_cosines(W, Pc)
    details = [{"component": float(c), "live": float(live[c]), "enc_feature": float(best_col[c]),
                "enc_cos": col_cos[c, best_col[c]].item(), "enc_share": (cols[c, best_col[c]] / w_norm[best_col[c]]).item()}
               for c in range(Pc.shape[0])]  # fmt: skip
    weights = {n: w.detach().cpu() for n, w in dec.component_weights(include_tied=False).items()}
    hidden = _module_name(target, target.hidden) if target.hidden is not None else None
    if target.hidden is not None and hidden in weights:
        summary, per_component = identity_parts(weights[hidden], target.hidden.weight, W, negligible)
        row |= summary
        details = [d | e for d, e in zip(details, per_component)]
    else:
        row |= nan_identity()
    drawn = (cols >= negligible * w_norm[None]).nonzero().tolist()  # (component, feature) pairs
    return Trained(row=row, arrows=torch.stack([Pc[c, :, j] for c, j in drawn]) if drawn else Pc.new_zeros(0, Pc.shape[1]),
                   arrows_live=torch.stack([live[c] for c, _ in drawn]) if drawn else live.new_zeros(0),
                   arrow_labels=[f"c{c}" for c, _ in drawn], details=details, parts=weights)  # fmt: skip


def identity_parts(
    P_hidden: Float[Tensor, "C d d"], M: Float[Tensor, "d d"], W: Float[Tensor, "d n"], negligible: float = 0.1
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """How a decomposition splits the hidden matrix M (the +ID identity) over its components.

    share_c = ‖P_c‖_F / ‖M‖_F; a component carries M when share_c ≥ ``negligible``. Reports how
    many do, the largest share, the best Frobenius cosine of a component with M itself (1: one
    component is the identity, the ground truth), and the mean over carrying components of the best
    cosine with a feature projector Π_j = ŵ_j ŵ_jᵀ (1: the identity is cut into per-feature pieces,
    as a transcoder cuts it into per-feature latents). Also one dict per component.
    """
    P, M, W = P_hidden.detach().float().cpu(), M.detach().float().cpu(), W.detach().float().cpu()
    flat = P.flatten(1)
    share = flat.norm(dim=1) / M.norm().clamp_min(1e-12)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    cos_id = unit(flat) @ unit(M.flatten())
    w_hat = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
    projectors = torch.einsum("an,bn->nab", w_hat, w_hat).flatten(1)  # (n, d·d)
    proj_cos = unit(flat) @ unit(projectors).T  # (C, n)
    best_proj, best_j = proj_cos.max(dim=1)
    carrying = share >= negligible
    summary = {
        "id_n_components": float(carrying.sum()),
        "id_max_share": share.max().item(),
        "id_best_cos_identity": cos_id.max().item(),
        "id_projector_cos": best_proj[carrying].mean().item() if carrying.any() else float("nan"),
    }
    per_component = [
        {"component": float(c), "share": share[c].item(), "cos_identity": cos_id[c].item(),
         "best_projector_feature": float(best_j[c]), "projector_cos": best_proj[c].item()}
        for c in range(P.shape[0])
    ]  # fmt: skip
    return summary, per_component


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def tms_best_key(a: dict[str, Any]) -> tuple:
    """Most seeds recovering every feature one-to-one, then the higher mean one-to-one cosine (to 3
    decimals), then fewer duplicate pairs, then the smaller width."""
    return (a["all_recovered"], round(a["matched_mean_cos"], 3), -a["n_duplicate_pairs"], -a["width"])


def run_comparison(
    cfg: CompareConfig, apd_run: DecomposeRun, out_dir: str | Path, log: Callable[[str], None] = print,
    spd_run: DecomposeRun | None = None,
) -> Comparison:
    """The decompositions (each cell of ``cfg.apd`` on top of ``apd_run``'s method, or the finished
    runs of ``cfg.apd.runs``) and every SAE grid, each over ``cfg.seeds``, on ``apd_run``'s TMS
    target; all scored on one evaluation batch. Decomposition runs go to ``out_dir/apd/``, SAEs to
    ``out_dir/saes/``; a finished run there is reloaded, not redone."""
    check_target_kind(apd_run, TMSTargetConfig.kind, "run_comparison")
    out = Path(out_dir)
    target, x = evaluation_target(cfg, apd_run)
    assert isinstance(target, TMS)
    data = tms_activations(target, x)
    results: list[Trained] = []
    notes: list[str] = []
    done = row_logger(results, log)
    decomposition_results(cfg, apd_run, out, lambda dec: evaluate_decomposition(
        dec, target, data, tau=cfg.tau, negligible=cfg.negligible), done, notes, spd_run)  # fmt: skip
    sae_results(cfg, out, lambda name, grid, width, value, seed, save: train_evaluate_sae(
        name, grid, width, value, seed, target, apd_run.target, data, cfg.sae_train, bits_per_value=cfg.bits_per_value,
        tau=cfg.tau, save_dir=save), done)  # fmt: skip
    side = {name for name, grid in cfg.saes.items() if grid.transcoder}
    return Comparison(results, target, data, kind=TMSTargetConfig.kind, side_methods=side, notes=notes)


register_comparison(TargetComparison(kind=TMSTargetConfig.kind, run=run_comparison, columns=COLUMNS, best_key=tms_best_key,
                                       report=tms_report))  # fmt: skip
