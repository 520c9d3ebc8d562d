"""The residual-MLP comparison (SPEC §2.2, §3.2, §4): decompositions against transcoders and SAEs.

What ``python -m experiments.compare experiment=compare_resid_mlp_1`` runs; the grid spec, the
loops and the target-independent scoring are :mod:`apd.compare.config`'s, :mod:`apd.compare.runs`'
and :mod:`apd.compare.scoring`'s. The target is a 1-layer residual MLP r = W_E x,
ŷ = W_U (r + W_out ReLU(W_in r)) with W_U = W_Eᵀ (no biases); its W_in and W_out are the modules it
declares (``ResidMLP.mlp_pairs()``). The SAE grids sit at one of two places:

- ``transcoder: true`` (the main baseline): reads the MLP's input r = W_E x and predicts the MLP's
  output W_out ReLU(W_in r); spliced in, the model's output is W_U (r + transcoder(r)).
- ``transcoder: false``: an SAE on the MLP's neurons a = ReLU(W_in r) (d_mlp wide); spliced in,
  the output is W_U (r + W_out SAE(a)).

APD decomposes W_in and W_out (the shipped ``resid_mlp_1`` preset: 130 rank-1 components, batch
top-k 1.28). Either it is trained inside the comparison (small runs, the tests) or finished run dirs
of ``python -m experiments.decompose experiment=resid_mlp_1 seed=S`` are scored as they are
(``apd.runs``); both go through :func:`evaluate_decomposition_resid`, which scores any method's
decomposition under its method's evaluation masks (APD: the batch top-k).

Ground truth per feature i (x = e_i, the value 1 where ReLU(x_i) is on): the MLP's input direction
W_E[:, i]; its output contribution t_i = W_out ReLU(W_in W_E[:, i]); its neuron pattern
a_i = ReLU(W_in W_E[:, i]); its neuron contributions NC(i) = (W_U[i] W_out) ⊙ (W_in W_E[:, i])
(SPEC §3.2; NC_c(i) the same from component c's matrices). Every row has :data:`RESID_COLUMNS`
(= :data:`apd.compare.COLUMNS` + the residual-MLP columns at the end), defined here as (APD
standing for any decomposition, its top-k for its method's evaluation masks):

- ``mmcs``, ``matched_mean_cos``, ``n_recovered_τ``, ``n_recovered_matched_0.99``,
  ``all_recovered``: per feature i, the best cosine with its ground truth, and the one-to-one
  (Hungarian) matching of features to distinct latents / components. Transcoder: decoder rows vs
  t_i. Neuron SAE: decoder rows vs a_i. APD: NC_c(i) vs NC(i) (both in R^{d_mlp}), exactly as TMS
  compares P_c[:, j] with W[:, j] (:func:`apd.compare.decomposition_recovery_row` on NCᵀ);
  ``all_recovered`` needs every represented feature (ground truth of norm ≥ 0.1 of the largest)
  matched with cosine ≥ 0.99 (strict for the residual MLP: expect 0).
- ``mmcs_learned``: SAEs: per live latent, the best cosine of its decoder row with any feature's
  ground truth. APD: per live component, the best Frobenius cosine of its whole NC_c (n × d_mlp) with
  a one-feature mechanism NC(i) e_iᵀ (< 1 when it serves several features).
- ``shrinkage``: per feature i, what its unit alone adds to output i on x = e_i over what the MLP
  adds, g_i = W_U[i] · t_i (≈ ReLU(1) = 1: the feature's computed nonlinearity); mean over features,
  below 1 = shrunk. Read off at output i rather than as a norm in the residual stream: most of
  R^{d_embed} is invisible to W_U (a norm would count what no output sees). SAEs: the
  Hungarian-matched latent ℓ, f_ℓ(e_i) · W_U[i] · (its write into the residual stream: W_dec[ℓ];
  neuron SAE: W_out W_dec[ℓ]). APD: the component c of best NC cosine (as ML2R takes the best one),
  W_U[i] · P_c^out ReLU(P_c^in W_E[:, i]).
- ``l0``: mean non-zero latents per sample; APD: mean active components under its batch top-k
  (per-module masks: summed over the modules, ``Method.mask_l0``).
- ``fvu``: transcoder and APD: of the MLP's output W_out ReLU(W_in r) in R^{d_embed} (APD: the MLP
  output of the top-k forward pass; a transcoder is trained on exactly this MSE, APD only on the
  outputs and the neurons, so its error may sit in directions no output reads); neuron SAE: of the
  neurons a.
- ``fvu_read``: every model alike: of the MLP's output as the unembedding reads it, W_U · (MLP
  output) in R^{n_features}, with the reconstruction spliced in (SAE: its write into the residual
  stream; APD: the masked MLP output). ``fvu`` counts the whole R^{d_embed}, of which W_U sees only
  n_features directions: a decomposition trained on the outputs may leave its MLP output wrong in
  the others (SPD on ``resid_mlp_1``: ``fvu`` 1.67, ``fvu_read`` 0.025) at no cost to any output.
- ``loss_recovered``: 1 − MSE(spliced output, target output) / MSE(output with the MLP
  zero-ablated, W_U r, target output). SAEs: their reconstruction spliced in; APD: the top-k model.
- ``n_dead``: latents / components never active on the evaluation batch (per-module masks: summed
  over the modules; ``mmcs_learned`` and the feature splitting take the live components of W_in).
- ``latents_per_feature``, ``n_split_features``, ``n_duplicate_pairs``: as for TMS, on the same
  vectors as ``mmcs`` (APD: NC_c(i) carries feature i when its cosine ≥ tau and its norm ≥
  ``negligible`` · ‖NC(i)‖).
- ``n_params``, ``bits_per_datapoint``: as for TMS (APD: Σ_l C·m·(d_in + d_out); L0·log₂ C).
- ``id_*``: NaN (no identity matrix).
- ``mmcs_enc``, ``matched_mean_cos_enc``: the read side. SAEs: encoder columns W_enc[:, ℓ] vs the
  feature's input (transcoder: W_E[:, i]; neuron SAE: a_i). APD: ‖P_c^in ŵ_i‖ / ‖P_c^in‖_F with
  ŵ_i = W_E[:, i] / ‖W_E[:, i]‖ (for rank-1 components |cos(A_c, W_E[:, i])|: the sign of a rank-1
  factor is arbitrary).
- ``n_features_dedicated``, ``n_mono``, ``n_duo``, ``n_poly`` (SPEC §3.2): a unit *serves* feature
  i when its contribution to output i on x = e_i exceeds ``serve_threshold`` (0.04, the paper's);
  mono / duo / poly: serving 1 / 2 / ≥ 3 features; a feature is dedicated when a mono unit serves
  it. APD: max over neurons of |NC_c(i)| (the decompose run's ``n_features_with_dedicated_component``).
  SAEs: |f_ℓ(e_i) · W_U[i] · (what latent ℓ writes to the residual stream)|, each latent being one
  "neuron" (its activation times its read-off: NC of a one-neuron component).
- ``mse_vs_target``, ``mse_vs_labels``: the spliced (APD: top-k) model's output MSE against the
  target's output and against the labels y = x + ReLU(x); the target's and the monosemantic
  baseline's own MSEs are in :attr:`apd.compare.Comparison.notes`.

Only 1-layer targets (:func:`run_resid_comparison` refuses others: there is one MLP to transcode).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from apd.baselines import SAE
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
    sae_eval_mode,
    score_sae,
)
from apd.compare.toy_report import resid_report
from apd.decomposition import Decomposition
from apd.experiment import DecomposeRun
from apd.methods import method_for
from apd.metrics.recovery import hungarian_match, recovery_scores
from apd.metrics.resid_mlp import (
    ComponentClasses,
    classify_components,
    label_mses,
    target_neuron_contributions,
)
from apd.metrics.sae import fraction_variance_unexplained
from apd.targets import ResidMLPTargetConfig, TargetConfig
from apd.toy_models.resid_mlp import ResidMLP, monosemantic_baseline, resid_mlp_labels

__all__ = [
    "RESID_COLUMNS",
    "ResidActivations",
    "resid_hidden",
    "resid_activations",
    "resid_site",
    "resid_training_data",
    "serving_columns",
    "latent_contributions",
    "unit_shrinkage",
    "evaluate_sae_resid",
    "component_outputs",
    "read_cosines",
    "evaluate_decomposition_resid",
    "run_resid_comparison",
    "resid_best_key",
]

RESID_COLUMNS = COLUMNS + [
    "mmcs_enc", "matched_mean_cos_enc", "n_features_dedicated", "n_mono", "n_duo", "n_poly",
    "mse_vs_target", "mse_vs_labels", "fvu_read",
]  # fmt: skip
"""Columns of a residual-MLP comparison row: the TMS ones, then the residual-MLP ones (module docstring)."""


@dataclass
class ResidActivations:
    """One evaluation batch of a 1-layer residual MLP and its one-feature inputs."""

    x: Float[Tensor, "N n_features"]
    r: Float[Tensor, "N d_embed"]
    """W_E x: the MLP's input (what a transcoder reads)"""
    acts: Float[Tensor, "N d_mlp"]
    """ReLU(W_in r): the neurons (what the neuron SAE reads)"""
    mlp_out: Float[Tensor, "N d_embed"]
    """W_out acts: the MLP's output (what a transcoder predicts)"""
    out: Float[Tensor, "N n_features"]
    """the target's output W_U (r + mlp_out)"""
    ablated_out: Float[Tensor, "N n_features"]
    """W_U r: the output with the MLP zero-ablated"""
    labels: Float[Tensor, "N n_features"]
    """y = x + ReLU(x)"""
    onehot_r: Float[Tensor, "n_features d_embed"]
    """r(e_i) = W_E[:, i]"""
    onehot_acts: Float[Tensor, "n_features d_mlp"]
    """a_i = ReLU(W_in W_E[:, i])"""
    truth: Float[Tensor, "n_features d_embed"]
    """t_i = W_out a_i: feature i's MLP output (a transcoder latent's ground truth)"""
    gain: Float[Tensor, " n_features"]
    """g_i = W_U[i] · t_i: what the MLP adds to output i on x = e_i (ideally ReLU(1) = 1)"""


@torch.no_grad()
def resid_hidden(target: ResidMLP, x: Float[Tensor, "B n_features"]) -> tuple[Tensor, Tensor, Tensor]:
    """(r, a, mlp_out): the MLP's input W_E x, its neurons ReLU(W_in r) and its output W_out a."""
    layer = target.layers[0]
    r = x @ target.W_E.T
    a = layer.act(layer.mlp_in(r))
    return r, a, layer.mlp_out(a)


@torch.no_grad()
def resid_activations(target: ResidMLP, x: Float[Tensor, "N n_features"]) -> ResidActivations:
    """The evaluation batch ``x`` through the 1-layer ``target``, and each feature's one-feature activations."""
    _check_one_layer(target)
    r, a, mlp_out = resid_hidden(target, x)
    onehot_r, onehot_a, truth = resid_hidden(target, torch.eye(target.config.n_features, device=x.device))
    return ResidActivations(x=x, r=r, acts=a, mlp_out=mlp_out, out=(r + mlp_out) @ target.W_E, ablated_out=r @ target.W_E,
                            labels=resid_mlp_labels(x),
                            onehot_r=onehot_r, onehot_acts=onehot_a, truth=truth,
                            gain=(truth * target.W_E.T).sum(dim=1))  # fmt: skip


def _check_one_layer(target: ResidMLP) -> None:
    if target.config.n_layers != 1:
        raise ValueError(f"the residual-MLP comparison covers 1-layer targets (one MLP to transcode); this one has "
                         f"n_layers={target.config.n_layers}: use target=resid_mlp_1")  # fmt: skip


def _writes(target: ResidMLP, transcoder: bool) -> Float[Tensor, "d_embed d_out"] | None:
    """Maps an SAE's reconstruction into the residual stream: identity (None) for a transcoder,
    W_out for the neuron SAE."""
    return None if transcoder else target.layers[0].mlp_out.weight.detach()


def resid_site(target: ResidMLP, data: ResidActivations, transcoder: bool) -> SAESite:
    """The transcoder's site (r → MLP output, truth t_i) or the neuron SAE's (a → a, truth a_i)."""
    W_E, r = target.W_E, data.r
    if transcoder:
        return SAESite(inputs=r, targets=data.mlp_out, truth=data.truth, onehot_in=data.onehot_r,
                       downstream=lambda h: (r + h) @ W_E)  # fmt: skip
    W_out = target.layers[0].mlp_out.weight.detach()
    return SAESite(inputs=data.acts, targets=None, truth=data.onehot_acts, onehot_in=data.onehot_acts,
                   downstream=lambda a: (r + a @ W_out.T) @ W_E)  # fmt: skip


def resid_training_data(target: ResidMLP, target_cfg: TargetConfig, transcoder: bool) -> Callable[[int, torch.Generator], Any]:
    """Fresh batches of ``target_cfg`` (the target's own data) mapped to the SAE's data: (r, MLP
    output) or the neurons a."""

    def draw(batch_size: int, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        r, a, mlp_out = resid_hidden(target, target_cfg.batch(batch_size, generator))
        return (r, mlp_out) if transcoder else a

    return draw


def serving_columns(classes: ComponentClasses) -> dict[str, float]:
    """The dedicated / mono / duo / poly columns of :func:`apd.metrics.resid_mlp.classify_components`."""
    return {"n_features_dedicated": float(classes["n_features_with_dedicated_component"]),
            "n_mono": float(classes["n_mono"]), "n_duo": float(classes["n_duo"]), "n_poly": float(classes["n_poly"])}  # fmt: skip


@torch.no_grad()
def latent_contributions(
    sae: SAE, onehot_in: Float[Tensor, "n d_in"], W_E: Float[Tensor, "d_embed n"], write: Tensor | None = None
) -> Float[Tensor, "d_sae n"]:
    """f_ℓ(e_i) · W_U[i] · (latent ℓ's write into the residual stream): what latent ℓ alone adds to
    output i on x = e_i. ``write`` maps a reconstruction into the residual stream (None: it is there)."""
    with sae_eval_mode(sae):
        acts = sae.encode(onehot_in.to(sae.W_enc))  # (n, d_sae)
    W_dec = sae.W_dec.detach()
    resid = W_dec if write is None else W_dec @ write.T.to(W_dec)  # (d_sae, d_embed)
    return acts.T * (resid @ W_E.to(W_dec))  # (d_sae, n)


def unit_shrinkage(contributions: Float[Tensor, "k n"], unit: Int[Tensor, " n"], gain: Float[Tensor, " n"]) -> float:
    """Mean over features i of contributions[unit[i], i] / gain[i] (0 where unit[i] = -1)."""
    contributions, gain = contributions.detach().float().cpu(), gain.detach().float().cpu()
    unit = unit.cpu()
    idx = unit.clamp_min(0)
    ratio = contributions[idx, torch.arange(len(idx))] / gain.clamp_min(1e-12)
    return torch.where(unit >= 0, ratio, torch.zeros_like(ratio)).mean().item()


@torch.no_grad()
def evaluate_sae_resid(
    sae: SAE, target: ResidMLP, data: ResidActivations, *, transcoder: bool, bits_per_value: float = 8.0,
    tau: float = 0.9, serve_threshold: float = 0.04,
) -> Trained:  # fmt: skip
    """Score a trained transcoder (or neuron SAE) on ``data`` (module docstring); the row's method
    fields and wall time are the caller's."""
    site = resid_site(target, data, transcoder)
    trained = score_sae(sae, site, bits_per_value=bits_per_value, tau=tau)
    with sae_eval_mode(sae):
        out = site.downstream(sae(site.inputs))
    enc = recovery_scores(site.onehot_in, sae.W_enc.detach().T, taus=(tau,), live=trained.arrows_live)
    contributions = latent_contributions(sae, site.onehot_in, target.W_E, _writes(target, transcoder))
    matched = recovery_scores(site.truth, sae.W_dec.detach(), taus=(tau,)).matched_index
    trained.row |= nan_identity() | {
        "shrinkage": unit_shrinkage(contributions, matched, data.gain),
        "mmcs_enc": enc.mmcs, "matched_mean_cos_enc": enc.matched_mean_cos,
        **serving_columns(classify_components(contributions[:, :, None].cpu(), serve_threshold)),
        **_output_columns(out, data),
    }  # fmt: skip
    return trained


def _output_columns(out: Tensor, data: ResidActivations) -> dict[str, float]:
    """``mse_vs_target``, ``mse_vs_labels`` and ``fvu_read`` of the spliced model's output ``out``
    = W_U (r + MLP output'): W_U r is shared with the target's output, so out − W_U r is the
    reconstructed MLP output as W_U reads it."""
    return {"mse_vs_target": F.mse_loss(out, data.out).item(), "mse_vs_labels": F.mse_loss(out, data.labels).item(),
            "fvu_read": fraction_variance_unexplained(data.out - data.ablated_out, out - data.ablated_out)}  # fmt: skip


def component_outputs(
    P_in: Float[Tensor, "C d_mlp d_embed"], P_out: Float[Tensor, "C d_embed d_mlp"], W_E: Float[Tensor, "d_embed n"]
) -> Float[Tensor, "C d_embed n"]:
    """o_c(i) = P_c^out ReLU(P_c^in W_E[:, i]): what component c alone makes the MLP write on x = e_i."""
    return P_out @ F.relu(P_in @ W_E)


def read_cosines(P_in: Float[Tensor, "C d_mlp d_embed"], W_E: Float[Tensor, "d_embed n"]) -> Float[Tensor, "n C"]:
    """‖P_c^in ŵ_i‖ / ‖P_c^in‖_F: how much of component c's input part reads along W_E[:, i]
    (|cos(A_c, W_E[:, i])| for a rank-1 component)."""
    w_hat = W_E / W_E.norm(dim=0, keepdim=True).clamp_min(1e-12)
    reads = (P_in @ w_hat).norm(dim=1)  # (C, n)
    return (reads / P_in.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)).T


@torch.no_grad()
def evaluate_decomposition_resid(
    dec: Decomposition, target: ResidMLP, data: ResidActivations, *, tau: float = 0.9, negligible: float = 0.1,
    serve_threshold: float = 0.04,
) -> Trained:  # fmt: skip
    """Score a decomposition of a 1-layer residual MLP (any method, under its method's evaluation
    masks) on ``data`` (module docstring); the row's method fields and wall time are the caller's."""
    _check_one_layer(target)
    ((w_in, w_out),) = target.mlp_pairs()
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    method = method_for(dec.config)
    masks = method.eval_masks(cm, data.x)
    active = method.active_threshold()
    with cm.capture([w_out]) as acts:
        out_masked = cm(data.x, masks=masks)
    live = live_components(masks, w_in, active)

    W_E = target.W_E.detach().float().cpu()
    weights = {n: w.detach().float().cpu() for n, w in dec.component_weights().items()}
    units = method.mlp_units(W_E, weights, target.mlp_pairs())  # APD: components; SPD: W_in subcomponents (SPEC §5.5)
    nc, out_map = units.nc, units.out_maps[w_in]  # (U, n, d_mlp), (U, d_embed, d_mlp)
    nc_target = target_neuron_contributions(target).float().cpu()  # (n, d_mlp)
    W, P = nc_target.T, nc.transpose(1, 2)  # as TMS's W (d, n) and P_c (d, n)
    row = {"l0": method.mask_l0(masks)["l0"], **decomposition_recovery_row(W, P, live, tau=tau, negligible=negligible)}
    best = column_cosines(W, P).argmax(dim=0)  # (n,): the component of best NC cosine per feature
    contributions = torch.einsum("cdn,dn->cn", component_outputs(weights[w_in], out_map, W_E), W_E)  # W_U[i] · o_c(i)
    row["shrinkage"] = unit_shrinkage(contributions, best, data.gain)
    reads = read_cosines(weights[w_in], W_E)
    _, matched_reads = hungarian_match(reads)
    row |= {
        "fvu": fraction_variance_unexplained(data.mlp_out, acts[w_out]),
        "loss_recovered": output_loss_recovered(out_masked, data.out, data.ablated_out).score,
        "n_dead": n_dead_components(masks, active),
        "n_params": float(decomposition_n_params(dec)), "bits_per_datapoint": mask_bits(masks, active),
        **nan_identity(),
        "mmcs_enc": reads.max(dim=1).values.mean().item(), "matched_mean_cos_enc": matched_reads.mean().item(),
        **serving_columns(classify_components(nc, serve_threshold)),
        **_output_columns(out_masked, data),
    }  # fmt: skip
    return Trained(row=row, arrows=W_E.new_zeros(0, W_E.shape[0]), arrows_live=live.new_zeros(0))


def resid_best_key(a: dict[str, Any]) -> tuple:
    """Most features with a dedicated latent / component, then the higher one-to-one cosine (to 3
    decimals), then the higher loss recovered, then the smaller width."""
    return (a["n_features_dedicated"], round(a["matched_mean_cos"], 3), a["loss_recovered"], -a["width"])


def run_resid_comparison(
    cfg: CompareConfig, apd_run: DecomposeRun, out_dir: str | Path, log: Callable[[str], None] = print,
    spd_run: DecomposeRun | None = None,
) -> Comparison:
    """The decompositions (trained per cell of ``cfg.apd`` × seed on top of ``apd_run``'s method,
    or the finished runs of ``cfg.apd.runs``) and every SAE grid over ``cfg.seeds`` on ``apd_run``'s
    1-layer residual MLP, all scored on one evaluation batch. Layout of ``out_dir`` as
    :func:`apd.compare.run_comparison`; the notes give the target's and the monosemantic baseline's
    output MSEs."""
    check_target_kind(apd_run, ResidMLPTargetConfig.kind, "run_resid_comparison")
    out = Path(out_dir)
    t0 = time.perf_counter()
    target, x = evaluation_target(cfg, apd_run)
    assert isinstance(target, ResidMLP)
    _check_one_layer(target)
    data = resid_activations(target, x)
    results: list[Trained] = []
    notes = [_baseline_note(target, data)]
    done = row_logger(results, log)
    decomposition_results(cfg, apd_run, out, lambda dec: evaluate_decomposition_resid(
        dec, target, data, tau=cfg.tau, negligible=cfg.negligible, serve_threshold=cfg.serve_threshold), done, notes, spd_run)  # fmt: skip

    def train(name: str, grid: SAEGrid, width: int, value: float, seed: int, save: Path | None) -> Trained:
        site = resid_site(target, data, grid.transcoder)
        return train_sae_cell(
            name, grid, width, value, seed, site.inputs.shape[1], site.truth.shape[1],
            resid_training_data(target, apd_run.target, grid.transcoder),
            lambda sae: evaluate_sae_resid(sae, target, data, transcoder=grid.transcoder, bits_per_value=cfg.bits_per_value,
                                           tau=cfg.tau, serve_threshold=cfg.serve_threshold),
            cfg.sae_train, save,
        )  # fmt: skip

    sae_results(cfg, out, train, done)
    log(f"residual-MLP comparison: {len(results)} models in {time.perf_counter() - t0:.0f} s")
    return Comparison(results, target, data, kind=ResidMLPTargetConfig.kind, notes=notes)


@torch.no_grad()
def _baseline_note(target: ResidMLP, data: ResidActivations) -> str:
    m = label_mses(target, monosemantic_baseline(target.config), None, data.x, data.labels)
    ablated = F.mse_loss(data.ablated_out, data.out).item()
    return (f"Reference output MSEs on the evaluation batch: target vs labels {m['mse_target_vs_labels']:.3g}; "
            f"monosemantic baseline (features 0..{target.config.d_mlp - 1} computed by one neuron each, SPEC §2.2) vs labels "
            f"{m['mse_monosemantic_vs_labels']:.3g} and vs the target {m['mse_monosemantic_vs_target']:.3g}; "
            f"MLP zero-ablated vs the target {ablated:.3g} (the denominator of loss recovered).")  # fmt: skip


register_comparison(TargetComparison(kind=ResidMLPTargetConfig.kind, run=run_resid_comparison, columns=RESID_COLUMNS,
                                     best_key=resid_best_key, report=resid_report))  # fmt: skip
