"""APD against the sparse-autoencoder baselines on the TMS toys (SPEC §3.1, §4).

The library side of ``python -m experiments.compare``: the grid spec, the TMS hidden activations,
one function that trains and scores an SAE (:func:`train_evaluate_sae`), one that scores an APD run
(:func:`evaluate_apd`), and the loop over the grid (:func:`run_comparison`). Every model is scored
on the same evaluation batch of the same shipped target, into one row of :data:`COLUMNS`. No Hydra,
no plotting: the entry point writes the CSV, the Markdown table and the figures. The pieces that do
not depend on the target (:class:`SAESite` and :func:`score_sae`, :func:`train_sae_cell`,
:func:`apd_recovery_row`, the APD and SAE loops) are shared with the residual-MLP comparison in
:mod:`apd.compare_resid`.

Where APD's numbers are defined differently from the SAE ones (an SAE has latents, APD has
parameter components):

- ``mmcs``, ``matched_mean_cos``, ``n_recovered_τ``: per feature j, the best cosine of a
  component's column P_c[:, j] with W[:, j] (:func:`apd.metrics.tms.tms_recovery`); for an SAE the
  best cosine of a decoder row with the feature's hidden direction.
- ``mmcs_learned``: per live component, the best Frobenius cosine of P_c with a ground-truth
  mechanism W e_j e_jᵀ (a component holding two features scores < 1); for an SAE, per live latent
  the best cosine of its decoder row with a feature direction.
- ``shrinkage``: APD's ML2R ‖P_{c*(j)}[:, j]‖ / ‖W[:, j]‖; for an SAE the matched latent's
  magnitude on the one-feature input, times its decoder norm, over ‖W[:, j]‖.
- ``l0``: mean active components per sample under the run's (batch) top-k; for an SAE mean non-zero
  latents.
- ``fvu``: the hidden activations of the top-k forward pass (ĥ = Σ_c s_c P_c^{enc} x, after the
  masked identity for +ID) against the target's; for an SAE its reconstruction.
- ``loss_recovered``: 1 − MSE(top-k output, target output) / MSE(zero-ablated hidden, target
  output); for an SAE the reconstruction is spliced into the target's hidden layer.
- ``n_dead``: components (latents) never active on the evaluation batch.
- ``n_params``: Σ_l C·m·(d_in + d_out) (a tied matrix once); for an SAE its trainable parameters.
- ``bits_per_datapoint``: L0·log₂ C (binary masks: an active component costs its index); for an SAE
  L0·(log₂ K + b), b bits for each active latent's value.
"""

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from apd.attributions import compute_attributions
from apd.baselines import SAE, SAEConfig, SAETrainConfig, get_sae_class, load_sae, save_sae, train_sae
from apd.methods.apd import APDConfig
from apd.decomposition import Decomposition, load_decomposition
from apd.experiment import DecomposeRun, run_decompose
from apd.metrics.recovery import cosine_matrix
from apd.metrics.sae import LossRecovered, duplicate_latents, evaluate_sae, fraction_variance_unexplained
from apd.metrics.tms import tms_recovery
from apd.targets import TMSTargetConfig, get_target
from apd.topk import topk_mask
from apd.toy_models.tms import TMS

__all__ = [
    "SPARSITY_KNOBS",
    "COLUMNS",
    "SAEGrid",
    "APDGrid",
    "CompareConfig",
    "TMSActivations",
    "tms_hidden",
    "tms_activations",
    "tms_downstream",
    "sae_training_data",
    "Trained",
    "SAESite",
    "score_sae",
    "train_sae_cell",
    "train_evaluate_sae",
    "evaluate_sae_row",
    "apd_recovery_row",
    "evaluate_apd",
    "run_apd",
    "load_apd_run",
    "apd_results",
    "sae_results",
    "row_logger",
    "Comparison",
    "run_comparison",
    "feature_splitting",
    "apd_feature_splitting",
    "column_cosines",
    "identity_parts",
    "apd_loss_recovered",
    "apd_n_params",
    "apd_bits",
    "nan_identity",
    "summarise",
    "tms_best_key",
    "best_settings",
]

SPARSITY_KNOBS = {"standard": "l1_coeff", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coeff"}
"""The default sparsity knob of each SAE architecture (APD's is ``topk``)."""

COLUMNS = [
    "method", "architecture", "seed", "width", "sparsity_knob", "sparsity",
    "l0", "mmcs", "mmcs_learned", "matched_mean_cos", "n_recovered_0.9", "n_recovered_0.99",
    "n_recovered_matched_0.99", "all_recovered", "shrinkage", "fvu", "loss_recovered", "n_dead",
    "latents_per_feature", "n_split_features", "n_duplicate_pairs",
    "n_params", "bits_per_datapoint", "wall_seconds",
    "id_n_components", "id_max_share", "id_best_cos_identity", "id_projector_cos",
]  # fmt: skip
"""Columns of a comparison row, in CSV order (``id_*`` only for APD on a +ID target, NaN otherwise).
``all_recovered`` is 1 when every feature is matched one-to-one with cosine ≥ 0.99 (SPEC §3.1)."""


@dataclass(kw_only=True)
class SAEGrid:
    """One SAE architecture over widths × sparsity values (each trained once per seed)."""

    architecture: str = "topk"
    """registry name: standard, topk, batchtopk, jumprelu"""
    widths: list[int] = field(default_factory=lambda: [5])
    """dictionary sizes d_sae"""
    sparsity_knob: str | None = None
    """config field swept by ``sparsity_values``; None = the architecture's (SPARSITY_KNOBS)"""
    sparsity_values: list[float] = field(default_factory=lambda: [1.0])
    transcoder: bool = False
    """read the hidden layer's input, reconstruct its output (for +ID: across the identity)"""
    options: dict[str, Any] = field(default_factory=dict)
    """further SAE config fields, e.g. {threshold_init: 0.1} for JumpReLU"""
    train: dict[str, Any] = field(default_factory=dict)
    """overrides of the shared SAE training config for this architecture, e.g. {lr: 3e-3}"""

    def __post_init__(self) -> None:
        self.widths, self.sparsity_values = list(self.widths), list(self.sparsity_values)
        self.options, self.train = dict(self.options), dict(self.train)
        _, cfg_cls = get_sae_class(self.architecture)  # raises on an unknown name
        if self.sparsity_knob is None:
            self.sparsity_knob = SPARSITY_KNOBS.get(self.architecture)
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        if self.sparsity_knob not in fields:
            raise ValueError(f"sparsity_knob={self.sparsity_knob!r} is not a field of {cfg_cls.__name__}; "
                             f"choose one of {sorted(fields)}")  # fmt: skip
        reserved = {"d_in", "d_sae", "d_out", "apply_b_dec_to_input", self.sparsity_knob}
        bad = sorted(set(self.options) - (fields - reserved))
        if bad:
            raise ValueError(f"options {bad} are not settable fields of {cfg_cls.__name__} (d_in/d_sae/d_out and "
                             f"the sparsity knob are set by the grid); settable: {sorted(fields - reserved)}")  # fmt: skip
        train_fields = {f.name for f in dataclasses.fields(SAETrainConfig)} - {"seed"}
        bad = sorted(set(self.train) - train_fields)
        if bad:
            raise ValueError(f"train {bad} are not SAETrainConfig fields (seed comes from the grid); choose from {sorted(train_fields)}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths={self.widths}: give at least one width, each >= 1")
        if not self.sparsity_values:
            raise ValueError("sparsity_values is empty: give at least one value")

    @property
    def knob(self) -> str:
        assert self.sparsity_knob is not None
        return self.sparsity_knob

    def sae_config(self, d_in: int, width: int, value: float, d_out: int | None = None) -> SAEConfig:
        """The architecture's config for one grid cell (``d_out`` for a transcoder)."""
        _, cfg_cls = get_sae_class(self.architecture)
        transcoder = {"d_out": d_out if d_out is not None else d_in, "apply_b_dec_to_input": False} if self.transcoder else {}
        return cfg_cls(d_in=d_in, d_sae=width, **transcoder, **self.options, **{self.knob: value})


@dataclass(kw_only=True)
class APDGrid:
    """APD over numbers of components C × top-k values; empty lists take the APD preset's value."""

    enabled: bool = True
    widths: list[int] = field(default_factory=list)
    """numbers of components C (empty = the preset's C)"""
    topks: list[float] = field(default_factory=list)
    """top-k values (empty = the preset's topk)"""
    steps: int | None = None
    """APD steps (None = the preset's)"""
    runs: list[str] = field(default_factory=list)
    """finished APD run dirs (``python -m experiments.decompose ...``) to score instead of training
    (each loaded with ``apd.load_decomposition``; its seed, C and topk come from its own config, so
    ``widths``/``topks``/``steps`` and the comparison's ``seeds`` do not apply to APD)"""

    def __post_init__(self) -> None:
        self.widths, self.topks, self.runs = list(self.widths), list(self.topks), [str(r) for r in self.runs]

    def settings(self, method: APDConfig) -> list[APDConfig]:
        """One APD config per (C, topk) cell, the preset's other settings unchanged."""
        widths = self.widths or [method.C]
        topks = self.topks or [method.topk]
        steps = self.steps if self.steps is not None else method.steps
        return [dataclasses.replace(method, C=C, topk=k, steps=steps) for C in widths for k in topks]


@dataclass(kw_only=True)
class CompareConfig:
    """The whole comparison: APD and every SAE grid, each over the same seeds and evaluation data."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    apd: APDGrid = field(default_factory=APDGrid)
    saes: dict[str, SAEGrid] = field(default_factory=dict)
    """method label -> architecture grid"""
    sae_train: SAETrainConfig = field(default_factory=SAETrainConfig)
    """training config shared by every SAE (``seed`` is set per run)"""
    n_eval: int = 10_000
    """evaluation samples, the same for every model"""
    eval_seed: int = 12_345
    bits_per_value: float = 8.0
    """b: bits to encode one active SAE latent's value in the description length"""
    tau: float = 0.9
    """cosine above which a latent (component) counts as a feature's copy, or two as duplicates"""
    negligible: float = 0.1
    """norm fraction below which a component's part of a feature column or of the identity is ignored"""
    serve_threshold: float = 0.04
    """residual MLP: a component (latent) serves feature i when its contribution to output i on
    x = e_i exceeds this (APD: max over neurons of |NC_c(i)|, SPEC §3.2)"""
    save_models: bool = True

    def __post_init__(self) -> None:
        self.seeds = list(self.seeds)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed (>= 5 for the reported comparison)")
        if self.n_eval < 100:
            raise ValueError(f"n_eval={self.n_eval}: use at least 100 evaluation samples")
        if not 0 < self.tau < 1 or not 0 < self.negligible < 1:
            raise ValueError(f"tau={self.tau}, negligible={self.negligible}: both must lie in (0, 1)")
        if self.serve_threshold <= 0:
            raise ValueError(f"serve_threshold={self.serve_threshold}: must be > 0 (the paper uses 0.04)")


# ---------------------------------------------------------------------------------------------
# TMS activations
# ---------------------------------------------------------------------------------------------


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
    h_in, h = tms_hidden(target, x)
    eye = torch.eye(target.config.n_features, device=x.device)
    onehot_in, truth = tms_hidden(target, eye)
    return TMSActivations(x=x, h_in=h_in, h=h, out=tms_downstream(target)(h), truth=truth, onehot_in=onehot_in)


def sae_training_data(target: TMS, target_cfg: TMSTargetConfig, transcoder: bool) -> Callable[[int, torch.Generator], Any]:
    """Fresh TMS batches mapped to the SAE's data: h (autoencoder) or (h_in, h) (transcoder)."""

    def draw(batch_size: int, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        h_in, h = tms_hidden(target, target_cfg.batch(batch_size, generator))
        return (h_in, h) if transcoder else h

    return draw


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """A scored model: its CSV row and what the figures draw."""

    row: dict[str, Any]
    arrows: Float[Tensor, "k n_hidden"]
    """what each latent writes for a feature: its decoder row times its largest activation on a
    one-feature input (unit length if it never fires on one); APD: every column P_c[:, j] holding at
    least ``negligible`` of ‖W[:, j]‖"""
    arrows_live: Bool[Tensor, " k"]
    """active on the evaluation batch"""
    arrow_labels: list[str] = field(default_factory=list)
    """APD: the component each arrow belongs to (one component may draw several)"""
    details: list[dict[str, float]] = field(default_factory=list)
    """APD: per component its main feature column (``enc_feature``, ``enc_cos``, ``enc_share``) and,
    on +ID, its part of the identity (see :func:`identity_parts`)"""
    parts: dict[str, Tensor] = field(default_factory=dict)
    """the learned weights: APD's component weights per matrix ([C, d_out, d_in]), an SAE's W_dec"""


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


def apd_feature_splitting(
    W: Float[Tensor, "n_hidden n_features"],
    P: Float[Tensor, "C n_hidden n_features"],
    live: Bool[Tensor, " C"],
    tau: float = 0.9,
    negligible: float = 0.1,
) -> dict[str, float]:
    """:func:`feature_splitting` for APD components: component c carries feature j when its column
    P_c[:, j] has cosine ≥ tau with W[:, j] and at least ``negligible`` of its norm; duplicates are
    live components whose whole matrices have Frobenius cosine > tau."""
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


def column_cosines(W: Float[Tensor, "m n"], P: Float[Tensor, "C m n"]) -> Float[Tensor, "C n"]:
    """cos(P_c[:, j], W[:, j]) for every component c and feature j (0 for a zero column)."""
    W, P = W.detach().float().cpu(), P.detach().float().cpu()
    return torch.einsum("mj,cmj->cj", W, P) / (W.norm(dim=0)[None] * P.norm(dim=1)).clamp_min(1e-12)


def _mechanism_cosines(W: Float[Tensor, "m n"], P: Float[Tensor, "C m n"]) -> Float[Tensor, "C n"]:
    """Frobenius cosine of each component with each ground-truth mechanism Z_j = W e_j e_jᵀ."""
    W, P = W.detach().float().cpu(), P.detach().float().cpu()
    inner = torch.einsum("mj,cmj->cj", W, P)  # ⟨P_c, Z_j⟩ = P_c[:, j] · W[:, j]
    return inner / (P.flatten(1).norm(dim=1)[:, None] * W.norm(dim=0)[None]).clamp_min(1e-12)


def identity_parts(
    P_hidden: Float[Tensor, "C d d"], M: Float[Tensor, "d d"], W: Float[Tensor, "d n"], negligible: float = 0.1
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """How APD splits the hidden matrix M (the +ID identity) over its components.

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


def apd_loss_recovered(out_topk: Tensor, out_clean: Tensor, out_ablated: Tensor) -> LossRecovered:
    """1 − MSE(top-k output, target output) / MSE(ablated output, target output)."""
    mse = lambda o: float((o.double() - out_clean.double()).pow(2).mean())  # noqa: E731
    spliced, ablated = mse(out_topk), mse(out_ablated)
    if ablated == 0:
        raise ValueError("the ablated and clean outputs are equal; loss recovered is undefined")
    return LossRecovered(score=1.0 - spliced / ablated, mse_clean=0.0, mse_spliced=spliced, mse_ablated=ablated)


def apd_n_params(dec: Decomposition) -> int:
    """Σ_l C·m·(d_in + d_out) over the decomposed matrices (a tied matrix counted once)."""
    return sum(dec.A[n].numel() + dec.B[n].numel() for n in dec.A)


def apd_bits(l0: float, C: int) -> float:
    """L0·log₂ C: each active component costs its index; the masks are binary, so no value."""
    return l0 * math.log2(C) if C > 1 else 0.0


def nan_identity() -> dict[str, float]:
    return {k: float("nan") for k in COLUMNS if k.startswith("id_")}


@torch.no_grad()
def _sae_arrows(sae: SAE, onehot_in: Tensor) -> Tensor:
    acts = sae.encode(onehot_in.to(sae.W_enc))  # (n, d_sae)
    scale = acts.max(dim=0).values
    W_dec = sae.W_dec.detach()
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where((scale > 0)[:, None], W_dec * scale[:, None], unit).cpu()


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


@torch.no_grad()
def score_sae(sae: SAE, site: SAESite, *, bits_per_value: float = 8.0, tau: float = 0.9) -> Trained:
    """The target-independent columns of an SAE's row (:func:`apd.metrics.sae.evaluate_sae` on the
    site); the caller adds the method fields, wall time and its target's own columns."""
    ev = evaluate_sae(sae, site.inputs, site.targets, truth=site.truth, onehot_inputs=site.onehot_in,
                      downstream=site.downstream, bits_per_value=bits_per_value)  # fmt: skip
    assert ev.recovery is not None and ev.loss_recovered is not None and ev.mean_shrinkage is not None
    live = (ev.frequency > 0).cpu()
    rec = ev.recovery
    row = {
        "l0": ev.l0, "mmcs": rec.mmcs, "mmcs_learned": rec.mmcs_learned, "matched_mean_cos": rec.matched_mean_cos,
        "n_recovered_0.9": float(rec.n_recovered[0.9]), "n_recovered_0.99": float(rec.n_recovered[0.99]),
        "n_recovered_matched_0.99": float(rec.n_recovered_matched[0.99]),
        "all_recovered": float(rec.n_recovered_matched[0.99] == site.truth.shape[0]),
        "shrinkage": ev.mean_shrinkage, "fvu": ev.fvu, "loss_recovered": ev.loss_recovered.score,
        "n_dead": float(ev.n_dead),
        **feature_splitting(sae.W_dec.detach().cpu(), site.truth.cpu(), live, tau),
        "n_params": float(ev.n_params), "bits_per_datapoint": ev.description_length_bits,
    }  # fmt: skip
    return Trained(row=row, arrows=_sae_arrows(sae, site.onehot_in), arrows_live=live, parts={"W_dec": sae.W_dec.detach().cpu()})


def train_sae_cell(
    name: str,
    grid: SAEGrid,
    width: int,
    value: float,
    seed: int,
    d_in: int,
    d_out: int,
    data: Callable[[int, torch.Generator], Any],
    score: Callable[[SAE], Trained],
    train_cfg: SAETrainConfig | None = None,
    save_dir: Path | None = None,
) -> Trained:
    """Train one SAE (one grid cell, one seed) on fresh batches from ``data``, score it with
    ``score`` and fill in the row's method fields and wall time. With ``save_dir`` the SAE is saved
    there with its training config and time (``training.json``); an SAE already saved there with
    the same SAE and training configs is reloaded, not retrained (its wall time: the saved one +
    this evaluation)."""
    t0 = time.perf_counter()
    sae_cls, _ = get_sae_class(grid.architecture)
    sae_cfg = grid.sae_config(d_in, width, value, d_out=d_out)
    train = dataclasses.replace(train_cfg or SAETrainConfig(), seed=seed, **grid.train)
    record = {"train": {k: getattr(v, "value", v) for k, v in dataclasses.asdict(train).items()}}
    sae, seconds = _saved_sae(save_dir, sae_cfg, record) if save_dir is not None else (None, 0.0)
    if sae is None:
        sae = sae_cls(sae_cfg)
        train_sae(sae, data, train)
        seconds = time.perf_counter() - t0
        if save_dir is not None:
            save_sae(sae, save_dir)
            (save_dir / "training.json").write_text(json.dumps(record | {"seconds": seconds}, indent=2) + "\n")
    t1 = time.perf_counter()
    trained = score(sae)
    trained.row = {"method": name, "architecture": grid.architecture, "seed": seed, "width": width,
                   "sparsity_knob": grid.knob, "sparsity": value, **trained.row,
                   "wall_seconds": seconds + time.perf_counter() - t1}  # fmt: skip
    return trained


def _saved_sae(save_dir: Path, sae_cfg: SAEConfig, record: dict[str, Any]) -> tuple[SAE | None, float]:
    """The SAE saved in ``save_dir`` and its training seconds, if it was trained with ``sae_cfg`` and
    the training config in ``record``; (None, 0) otherwise."""
    info = save_dir / "training.json"
    if not info.is_file():
        return None, 0.0
    saved = json.loads(info.read_text())
    sae = load_sae(save_dir)
    if saved.get("train") != record["train"] or sae.cfg != sae_cfg:
        return None, 0.0
    return sae, float(saved["seconds"])


def train_evaluate_sae(
    name: str,
    grid: SAEGrid,
    width: int,
    value: float,
    seed: int,
    target: TMS,
    target_cfg: TMSTargetConfig,
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
        sae_training_data(target, target_cfg, grid.transcoder),
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


def apd_recovery_row(
    W: Float[Tensor, "d n_features"],
    P: Float[Tensor, "C d n_features"],
    live: Bool[Tensor, " C"],
    *,
    tau: float = 0.9,
    negligible: float = 0.1,
) -> dict[str, float]:
    """The recovery columns of an APD row from per-feature ground-truth columns W[:, j] and each
    component's version of them P_c[:, j] (TMS: W and the components of W; residual MLP: the neuron
    contributions NC(j) and NC_c(j)): MMCS, R_τ, the one-to-one matching and ML2R as ``shrinkage``
    (:func:`apd.metrics.tms.tms_recovery`), MMCS learned (per live component, the best Frobenius
    cosine with a mechanism W e_j e_jᵀ) and feature splitting (:func:`apd_feature_splitting`)."""
    rec = tms_recovery(W, P, taus=(0.9, 0.99))
    mech = _mechanism_cosines(W, P)
    return {
        "mmcs": rec["mmcs"], "mmcs_learned": mech.max(dim=1).values[live].mean().item() if live.any() else 0.0,
        "matched_mean_cos": rec["matched_mean_cos"], "n_recovered_0.9": rec["n_recovered_0.9"],
        "n_recovered_0.99": rec["n_recovered_0.99"], "n_recovered_matched_0.99": rec["n_recovered_matched_0.99"],
        "all_recovered": float(rec["n_recovered_matched_0.99"] == W.shape[1]), "shrinkage": rec["ml2r"],
        **apd_feature_splitting(W, P, live, tau, negligible),
    }  # fmt: skip


@torch.no_grad()
def evaluate_apd(
    dec: Decomposition, target: TMS, data: TMSActivations, *, tau: float = 0.9, negligible: float = 0.1
) -> Trained:
    """Score an APD decomposition of ``target`` on ``data`` with the SAE columns' meanings (module
    docstring); the row's method fields and wall time are the caller's."""
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    cfg = dec.config
    k = cfg.topk if cfg.topk is not None else cm.C
    mask = topk_mask(compute_attributions(cm, data.x, cfg.attribution), k, cfg.batch_topk)
    hidden_name = "hidden" if target.hidden is not None else "enc"
    with cm.capture([hidden_name]) as acts:
        out_topk = cm(data.x, masks=mask)
    h_hat = acts[hidden_name]

    W = target.W.detach()
    P = dec.component_weights()["enc"].to(W)
    live = (mask.sum(0) > 0).cpu()
    l0 = mask.sum(1).mean().item()
    ablated = tms_downstream(target)(torch.zeros_like(data.h))
    row = {
        "l0": l0, **apd_recovery_row(W, P, live, tau=tau, negligible=negligible),
        "fvu": fraction_variance_unexplained(data.h, h_hat),
        "loss_recovered": apd_loss_recovered(out_topk, data.out, ablated).score,
        "n_dead": float((~live).sum()),
        "n_params": float(apd_n_params(dec)), "bits_per_datapoint": apd_bits(l0, cm.C),
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
    if target.hidden is not None and "hidden" in weights:
        summary, per_component = identity_parts(weights["hidden"], target.hidden.weight, W, negligible)
        row |= summary
        details = [d | e for d, e in zip(details, per_component)]
    else:
        row |= nan_identity()
    drawn = (cols >= negligible * w_norm[None]).nonzero().tolist()  # (component, feature) pairs
    return Trained(row=row, arrows=torch.stack([Pc[c, :, j] for c, j in drawn]) if drawn else Pc.new_zeros(0, Pc.shape[1]),
                   arrows_live=torch.stack([live[c] for c, _ in drawn]) if drawn else live.new_zeros(0),
                   arrow_labels=[f"c{c}" for c, _ in drawn], details=details, parts=weights)  # fmt: skip


def _apd_method_fields(trained: Trained, config: APDConfig, wall_seconds: float) -> Trained:
    trained.row = {"method": "apd", "architecture": "apd", "seed": config.seed, "width": config.C,
                   "sparsity_knob": "topk", "sparsity": config.topk, **trained.row, "wall_seconds": wall_seconds}  # fmt: skip
    return trained


def run_apd(run: DecomposeRun, target: TMS, data: TMSActivations, out_dir: Path, *, tau: float = 0.9,
            negligible: float = 0.1, progress: bool = False) -> Trained:  # fmt: skip
    """Decompose (or reload a finished run from ``out_dir``) and score it on ``data``."""
    return _apd_run(run, out_dir, lambda dec: evaluate_apd(dec, target, data, tau=tau, negligible=negligible), progress)


def _apd_run(run: DecomposeRun, out_dir: Path, score: Callable[[Decomposition], Trained], progress: bool = False) -> Trained:
    result = run_decompose(run, out_dir, progress=progress)
    t0 = time.perf_counter()
    trained = score(result.decomposition)
    # the decomposition's own time (kept in its metrics.json when reloaded) + this evaluation
    return _apd_method_fields(trained, run.method, result.metrics["wall_seconds"] + time.perf_counter() - t0)


def load_apd_run(run_dir: str | Path) -> tuple[Decomposition, float]:
    """A finished APD run (a ``python -m experiments.decompose`` run dir, or a decomposition file):
    the decomposition and its wall seconds from ``metrics.json`` (NaN when there is none)."""
    dec = load_decomposition(run_dir)
    metrics = Path(run_dir) / "metrics.json"
    wall = json.loads(metrics.read_text()).get("wall_seconds", math.nan) if metrics.is_file() else math.nan
    return dec, float(wall)


def apd_results(
    cfg: CompareConfig, apd_run: DecomposeRun, out: Path, score: Callable[[Decomposition], Trained],
    done: Callable[[Trained], None], notes: list[str] | None = None,
) -> None:  # fmt: skip
    """Every APD model of the comparison, scored by ``score`` and handed to ``done``: the finished
    runs of ``cfg.apd.runs`` when given (scored as they are), else each cell of ``cfg.apd`` on top of
    ``apd_run``'s method × ``cfg.seeds``, decomposed into ``out/apd/`` (a finished run there is
    reloaded, not redone). Appends a line per loaded run to ``notes``."""
    if not cfg.apd.enabled:
        return
    for run_dir in cfg.apd.runs:
        dec, wall = load_apd_run(run_dir)
        m = dec.config
        if notes is not None:
            notes.append(f"APD seed {m.seed}: loaded from `{run_dir}` (C={m.C}, rank={m.rank if m.rank is not None else 'full'}, "
                         f"batch top-k={m.topk}, {m.steps} steps, coefficients faithfulness/minimality/simplicity "
                         f"{m.faithfulness_coeff:g}/{m.minimality_coeff:g}/{m.simplicity_coeff:g}, its own time {wall:.0f} s)")  # fmt: skip
        t0 = time.perf_counter()
        trained = score(dec)
        done(_apd_method_fields(trained, m, wall + time.perf_counter() - t0))
    if cfg.apd.runs:
        return
    for method in cfg.apd.settings(apd_run.method):
        for seed in cfg.seeds:
            run = dataclasses.replace(apd_run, method=method, seed=seed, steps=method.steps)
            done(_apd_run(run, out / "apd" / f"C{method.C}_topk{method.topk:g}" / f"seed{seed}", score))


def sae_results(
    cfg: CompareConfig, out: Path, train: Callable[[str, SAEGrid, int, float, int, Path | None], Trained],
    done: Callable[[Trained], None],
) -> None:  # fmt: skip
    """Every SAE grid cell × seed: ``train(name, grid, width, value, seed, save_dir)`` → ``done``
    (models saved under ``out/saes/`` when ``cfg.save_models``)."""
    for name, grid in cfg.saes.items():
        for width in grid.widths:
            for value in grid.sparsity_values:
                for seed in cfg.seeds:
                    save = out / "saes" / f"{name}_w{width}_{grid.knob}{value:g}_seed{seed}" if cfg.save_models else None
                    done(train(name, grid, width, value, seed, save))


def row_logger(results: list[Trained], log: Callable[[str], None]) -> Callable[[Trained], None]:
    """A ``done`` callback for :func:`apd_results` / :func:`sae_results`: log a one-line summary
    of the row, append the model to ``results``."""

    def done(t: Trained) -> None:
        r = t.row
        log(f"{r['method']:>12} width={r['width']:<3} {r['sparsity_knob']}={r['sparsity']:<7.4g} seed={r['seed']}: "
            f"l0={r['l0']:.3f} mmcs={r['mmcs']:.3f} matched={r['matched_mean_cos']:.3f} "
            f"shrink={r['shrinkage']:.3f} fvu={r['fvu']:.3f} lossrec={r['loss_recovered']:.3f} ({r['wall_seconds']:.1f}s)")  # fmt: skip
        results.append(t)

    return done


@dataclass
class Comparison:
    """Every scored model, and the target and evaluation batch they were scored on."""

    results: list[Trained]
    target: Any
    """the target model (TMS or ResidMLP)"""
    data: Any
    """the evaluation batch (:class:`TMSActivations` or :class:`apd.compare_resid.ResidActivations`);
    ``data.truth`` is the features' ground truth the figures draw"""
    kind: str = "tms"
    """the target kind (``TargetConfig.kind``): tms or resid_mlp"""
    side_methods: set[str] = field(default_factory=set)
    """SAE grids kept out of the main table and Pareto figure (TMS: the transcoders, a side study)"""
    notes: list[str] = field(default_factory=list)
    """lines for comparison.md (e.g. which finished APD runs were loaded)"""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r.row for r in self.results]


def run_comparison(
    cfg: CompareConfig, apd_run: DecomposeRun, out_dir: str | Path, log: Callable[[str], None] = print
) -> Comparison:
    """APD (each cell of ``cfg.apd`` on top of ``apd_run``'s method, or the finished runs of
    ``cfg.apd.runs``) and every SAE grid, each over ``cfg.seeds``, on ``apd_run``'s TMS target; all
    scored on one evaluation batch. APD runs go to ``out_dir/apd/``, SAEs to ``out_dir/saes/``; a
    finished APD run there is reloaded, not redone. (Residual MLPs: :func:`apd.compare_resid.run_resid_comparison`.)"""
    if not isinstance(apd_run.target, TMSTargetConfig):
        raise TypeError(f"run_comparison covers the TMS targets, not {type(apd_run.target).__name__}; "
                        "for a residual MLP use apd.compare_resid.run_resid_comparison")  # fmt: skip
    out = Path(out_dir)
    target_cfg = apd_run.target
    target, _ = get_target(target_cfg)
    assert isinstance(target, TMS)
    target.eval()
    x = target_cfg.batch(cfg.n_eval, torch.Generator().manual_seed(cfg.eval_seed))
    data = tms_activations(target, x)
    results: list[Trained] = []
    notes: list[str] = []
    done = row_logger(results, log)
    apd_results(cfg, apd_run, out, lambda dec: evaluate_apd(dec, target, data, tau=cfg.tau, negligible=cfg.negligible),
                done, notes)  # fmt: skip
    sae_results(cfg, out, lambda name, grid, width, value, seed, save: train_evaluate_sae(
        name, grid, width, value, seed, target, target_cfg, data, cfg.sae_train, bits_per_value=cfg.bits_per_value,
        tau=cfg.tau, save_dir=save), done)  # fmt: skip
    side = {name for name, grid in cfg.saes.items() if grid.transcoder}
    return Comparison(results, target, data, kind="tms", side_methods=side, notes=notes)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def summarise(
    rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("method", "width", "sparsity")
) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds of every numeric column, per ``keys`` group, in first-seen
    order: ``{<key>: ..., "n": seeds, "<col>": mean, "<col>_std": std}``; NaN columns stay NaN."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key)) | {"n": len(members)}
        for r0 in members[:1]:
            agg |= {c: r0[c] for c in ("architecture", "sparsity_knob") if c in r0 and c not in keys}
        for col, v0 in members[0].items():
            if col in keys or col == "seed" or not isinstance(v0, (int, float)) or isinstance(v0, bool):
                continue
            vals = [float(m[col]) for m in members]
            if any(math.isnan(v) for v in vals):
                agg[col], agg[f"{col}_std"] = float("nan"), float("nan")
                continue
            agg[col] = statistics.fmean(vals)
            agg[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def tms_best_key(a: dict[str, Any]) -> tuple:
    """Most seeds recovering every feature one-to-one, then the higher mean one-to-one cosine (to 3
    decimals), then fewer duplicate pairs, then the smaller width."""
    return (a["all_recovered"], round(a["matched_mean_cos"], 3), -a["n_duplicate_pairs"], -a["width"])


def best_settings(
    rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple] = tms_best_key
) -> list[dict[str, Any]]:
    """Per method, its setting (width × sparsity, aggregated by :func:`summarise`) that maximises
    ``key`` (default :func:`tms_best_key`)."""
    best: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for a in summarise(rows):
        k = key(a)
        if a["method"] not in best or k > best[a["method"]][0]:
            best[a["method"]] = (k, a)
    return [a for _, a in best.values()]
