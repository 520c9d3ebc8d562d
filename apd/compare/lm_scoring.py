"""The language-model comparison's computations: the evaluation tokens, scoring neurons, SAEs and
decompositions on them, seed consistency and the SAE-component relations. The definitions of every
column are in the docstring of :mod:`apd.compare.lm` (which finds and trains the runs and
re-exports these names); its report is :mod:`apd.compare.lm_report`.
"""

import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apd.baselines import SAE
from apd.browser.extract import ExtractConfig, FamilyActs, extract_family
from apd.compare.scoring import Trained, mask_bits, sae_eval_mode
from apd.component_model import Masks
from apd.config import OutputLoss
from apd.decomposition import Decomposition
from apd.targets import LMTargetConfig
from apd.losses.distance import output_distance
from apd.methods import method_for
from apd.metrics.recovery import cosine_matrix, hungarian_match
from apd.metrics.sae import description_length_bits, fraction_variance_unexplained, parameter_count
from apd.toy_models.lm import TransformerLM, lm_loss
from apd.toy_models.lm_data import Split

__all__ = [
    "LM_COLUMNS",
    "PROXIES",
    "LMActivations",
    "UnitSet",
    "LMTrained",
    "lm_activations",
    "lm_training_data",
    "logit_scores",
    "splice_scores",
    "unit_proxies",
    "density_columns",
    "proxy_columns",
    "top_positions",
    "evaluate_neurons",
    "evaluate_sae_lm",
    "rank_one_directions",
    "evaluate_decomposition_lm",
    "matched_cosine",
    "matched_correlation",
    "seed_consistency",
    "sae_component_relations",
    "relation_summary",
]

PROXIES = ("top_token_frac", "top_bigram_frac", "token_entropy")
"""The monosemanticity proxies of ``apd.browser.extract`` (per unit)."""

LM_COLUMNS = [
    "method", "architecture", "seed", "width", "sparsity_knob", "sparsity",
    "l0", "loss_recovered", "loss_recovered_thresholded", "kl", "lm_loss", "fvu", "fvu_mlp_out",
    "n_live", "n_dead", "n_ultralow", "median_log10_density", "n_params", "bits_per_token",
    *[f"{p}_{s}" for p in PROXIES for s in ("median", "mean")],
    "seed_cos_out", "seed_cos_in", "seed_act_corr", "wall_seconds",
]  # fmt: skip
"""Columns of a language-model comparison row (module docstring)."""


# ---------------------------------------------------------------------------------------------
# The evaluation tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class LMActivations:
    """The held-out evaluation windows through the target: what every model is scored on."""

    tokens: Int[Tensor, "S T"]
    """model inputs"""
    next_tokens: Int[Tensor, "S T"]
    """next-token targets"""
    mlp_in: Float[Tensor, "S T d_model"]
    acts: Float[Tensor, "S T d_mlp"]
    mlp_out: Float[Tensor, "S T d_model"]
    logits: Float[Tensor, "S T vocab"]
    """the target's"""
    loss_clean: float
    loss_ablated: float
    """the next-token loss with the MLP's output zero-ablated"""

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


@torch.no_grad()
def lm_activations(model: TransformerLM, target: LMTargetConfig, n_windows: int, seed: int) -> LMActivations:
    """``n_windows`` held-out windows (from ``seed``) through ``model``: its MLP's input, neurons,
    output and logits, and the clean and MLP-ablated next-token losses."""
    w = target.windows(Split.heldout, n_windows, torch.Generator().manual_seed(seed), length=target.seq_len + 1)
    x, y = w[:, :-1], w[:, 1:]
    io = model.mlp_io(x)
    logits = model(x)
    ablated = model(x, mlp_out=torch.zeros_like(io.mlp_out))
    if not torch.allclose(model(x, mlp_out=io.mlp_out), logits, atol=1e-5):
        raise RuntimeError("splicing the MLP's own output back in does not reproduce the logits; the model's "
                           "mlp_io and forward disagree")  # fmt: skip
    return LMActivations(tokens=x, next_tokens=y, mlp_in=io.mlp_in, acts=io.acts, mlp_out=io.mlp_out, logits=logits,
                         loss_clean=float(lm_loss(logits, y)), loss_ablated=float(lm_loss(ablated, y)))  # fmt: skip


def lm_training_data(model: TransformerLM, target: LMTargetConfig, transcoder: bool) -> Callable[[int, torch.Generator], Any]:
    """Fresh SAE batches of ``batch_size`` tokens (rounded up to whole windows, then cut) from the
    training plays: the neurons, or (MLP input, MLP output) for a transcoder."""
    T = target.seq_len

    @torch.no_grad()
    def draw(batch_size: int, generator: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        io = model.mlp_io(target.batch(math.ceil(batch_size / T), generator))
        if transcoder:
            return io.mlp_in.reshape(-1, io.mlp_in.shape[-1])[:batch_size], io.mlp_out.reshape(-1, io.mlp_out.shape[-1])[:batch_size]
        return io.acts.reshape(-1, io.acts.shape[-1])[:batch_size]

    return draw


# ---------------------------------------------------------------------------------------------
# Columns shared by every model
# ---------------------------------------------------------------------------------------------


def logit_scores(data: LMActivations, logits: Float[Tensor, "S T vocab"]) -> dict[str, float]:
    """``lm_loss``, ``loss_recovered`` (against zero-ablating the MLP) and ``kl`` (target ‖ these) of
    logits computed on the evaluation windows."""
    loss = float(lm_loss(logits, data.next_tokens))
    return {"lm_loss": loss, "loss_recovered": (data.loss_ablated - loss) / (data.loss_ablated - data.loss_clean),
            "kl": float(output_distance(data.logits, logits, OutputLoss.kl))}  # fmt: skip


@torch.no_grad()
def splice_scores(model: TransformerLM, data: LMActivations, mlp_out: Float[Tensor, "S T d_model"]) -> dict[str, float]:
    """:func:`logit_scores` of the target with ``mlp_out`` spliced in for its MLP's output."""
    return logit_scores(data, model(data.tokens, mlp_out=mlp_out))


def density_columns(density: Float[Tensor, " U"], ultralow: float) -> dict[str, float]:
    """Dead (density 0), ultralow (0 < density < ``ultralow``) and live counts, and the median
    log10 density of the live units (NaN if none)."""
    live = density > 0
    return {"n_live": float(live.sum()), "n_dead": float((~live).sum()), "n_ultralow": float((live & (density < ultralow)).sum()),
            "median_log10_density": density[live].log10().median().item() if live.any() else math.nan}  # fmt: skip


def _proxy_config(top_k: int) -> ExtractConfig:
    """Only what the proxies need: no contexts, one quantile interval without examples."""
    return ExtractConfig(n_top=0, ctx_before=0, ctx_after=0, quantiles=(0.0, 1.0), n_per_quantile=0, n_hist_bins=1,
                         n_logits=0, n_proxy=top_k, n_top_tokens=1)  # fmt: skip


def unit_proxies(
    tokens: Int[Tensor, "S T"], vocab_size: int, acts: Float[Tensor, "N U"], top_k: int
) -> dict[str, Float[Tensor, " n_live"]]:
    """Per live unit (active somewhere), the proxies of ``apd.browser.extract`` (:data:`PROXIES`)
    from its activations (active: > 0) on ``tokens``, over its ``top_k`` top-activating tokens."""
    fam = extract_family(tokens, vocab_size, FamilyActs(name="units", acts=acts), _proxy_config(top_k))
    live = [u for u in fam.units if u.n_active > 0]
    return {p: torch.tensor([float(getattr(u, p)) for u in live], dtype=torch.float64) for p in PROXIES}


def proxy_columns(values: Mapping[str, Tensor]) -> dict[str, float]:
    """Median and mean of each proxy over the units given (NaN when there are none)."""
    out = {}
    for p in PROXIES:
        v = values[p]
        out[f"{p}_median"] = v.median().item() if v.numel() else math.nan
        out[f"{p}_mean"] = v.mean().item() if v.numel() else math.nan
    return out


def top_positions(acts: Float[Tensor, "N U"], k: int) -> Int[Tensor, "U k"]:
    """Each unit's ``k`` top-activating token positions (rows of ``acts``), -1 where it is not active."""
    k = min(k, acts.shape[0])
    values, idx = acts.topk(k, dim=0)  # (k, U)
    return torch.where(values > 0, idx, -1).T.contiguous()


# ---------------------------------------------------------------------------------------------
# Units and their directions
# ---------------------------------------------------------------------------------------------


@dataclass
class UnitSet:
    """One set of units of a scored model whose directions live in fixed spaces: an SAE's latents,
    a decomposed matrix's (sub)components, the neurons."""

    space_out: str
    """where ``write`` lives: "neurons" (d_mlp) or "mlp_out" (d_model)"""
    space_in: str
    """where ``read`` lives: "neurons" or "mlp_in" (d_model)"""
    write: Float[Tensor, "U d_write"]
    """output directions: decoder rows, a rank-one U_c"""
    read: Float[Tensor, "U d_read"]
    """input directions: encoder columns, a rank-one V_c"""
    live: Bool[Tensor, " U"]
    """active somewhere on the evaluation tokens"""
    top: Int[Tensor, "U k"]
    """top-activating token positions (-1: not active)"""
    signed: bool
    """the directions' sign means something (SAE latents); rank-one factors are compared by |cos|"""


@dataclass
class LMTrained(Trained):
    """A scored model of the language-model comparison, with what the cross-model tables read."""

    units: dict[str, UnitSet] = field(default_factory=dict)
    """"latents" (SAEs), or each decomposed matrix's name"""
    densities: dict[str, Tensor] = field(default_factory=dict)
    """per family of units (SAE: "latents"; SPD: each matrix; APD: "components"; "neurons"), each
    unit's density on the evaluation tokens (for the log-density histograms)"""
    acts: dict[str, Tensor] = field(default_factory=dict)
    """per family of units (not the neurons), the units' activations on the evaluation tokens,
    [N, U] as a sparse COO tensor (for :func:`matched_correlation`)"""


def _empty_arrows(live: Bool[Tensor, " U"]) -> dict[str, Tensor]:
    """The TMS figures' fields, unused here."""
    return {"arrows": torch.zeros(0, 1), "arrows_live": live.new_zeros(0)}


@torch.no_grad()
def evaluate_neurons(
    model: TransformerLM, data: LMActivations, *, bits_per_value: float = 8.0, ultralow_density: float = 1e-4,
    proxy_top_k: int = 50,
) -> LMTrained:  # fmt: skip
    """The row of the MLP's own neurons (method "neurons"): spliced in unchanged they recover the
    whole loss; their L0, densities, description length as a dictionary of d_mlp units, and proxies."""
    t0 = time.perf_counter()
    acts = data.acts.reshape(-1, data.acts.shape[-1])
    density = (acts > 0).float().mean(0)
    l0 = (acts > 0).float().sum(-1).mean().item()
    n_params = sum(p.numel() for p in model.mlp.parameters())
    row = {"method": "neurons", "architecture": "neurons", "seed": 0, "width": acts.shape[1], "sparsity_knob": "none",
           "sparsity": 0.0, "l0": l0, **splice_scores(model, data, data.mlp_out), "loss_recovered_thresholded": math.nan,
           "fvu": 0.0, "fvu_mlp_out": 0.0, **density_columns(density, ultralow_density), "n_params": float(n_params),
           "bits_per_token": description_length_bits(l0, acts.shape[1], bits_per_value),
           **proxy_columns(unit_proxies(data.tokens, data.logits.shape[-1], acts, proxy_top_k)),
           "seed_cos_out": math.nan, "seed_cos_in": math.nan, "seed_act_corr": math.nan}  # fmt: skip
    row["wall_seconds"] = time.perf_counter() - t0
    return LMTrained(row=row, **_empty_arrows(density > 0), densities={"neurons": density})


@torch.no_grad()
def evaluate_sae_lm(
    sae: SAE, model: TransformerLM, data: LMActivations, *, transcoder: bool, bits_per_value: float = 8.0,
    ultralow_density: float = 1e-4, proxy_top_k: int = 50,
) -> LMTrained:  # fmt: skip
    """Score a neuron SAE (``transcoder=False``: reads and reconstructs the neurons) or a transcoder
    (reads the MLP input, predicts its output) on ``data`` (module docstring); in eval mode, so a
    BatchTopK SAE uses its inference threshold. The method fields and wall time are the caller's."""
    lead = data.mlp_out.shape[:-1]
    if transcoder:
        inputs, target = data.mlp_in.reshape(-1, data.mlp_in.shape[-1]), data.mlp_out.reshape(-1, data.mlp_out.shape[-1])
    else:
        inputs = target = data.acts.reshape(-1, data.acts.shape[-1])
    with sae_eval_mode(sae):
        f = sae.encode(inputs.to(sae.W_enc))
        recon = sae.decode(f)
    mlp_out = recon if transcoder else model.mlp.down(recon)
    fired = f != 0
    density = fired.float().mean(0)
    l0 = fired.float().sum(-1).mean().item()
    acts = f * sae.W_dec.norm(dim=-1)  # what each latent writes (its value with unit-norm rows)
    row = {"l0": l0, **splice_scores(model, data, mlp_out.reshape(*lead, -1)), "loss_recovered_thresholded": math.nan,
           "fvu": fraction_variance_unexplained(target, recon),
           "fvu_mlp_out": fraction_variance_unexplained(data.mlp_out.reshape(-1, data.mlp_out.shape[-1]), mlp_out),
           **density_columns(density, ultralow_density), "n_params": float(parameter_count(sae)),
           "bits_per_token": description_length_bits(l0, sae.cfg.d_sae, bits_per_value),
           **proxy_columns(unit_proxies(data.tokens, data.logits.shape[-1], acts, proxy_top_k)),
           "seed_cos_out": math.nan, "seed_cos_in": math.nan, "seed_act_corr": math.nan}  # fmt: skip
    units = UnitSet(space_out="mlp_out" if transcoder else "neurons", space_in="mlp_in" if transcoder else "neurons",
                    write=sae.W_dec.detach().cpu().clone(), read=sae.W_enc.detach().T.cpu().clone(), live=(density > 0).cpu(),
                    top=top_positions(acts, proxy_top_k).cpu(), signed=True)  # fmt: skip
    return LMTrained(row=row, **_empty_arrows(units.live), units={"latents": units}, densities={"latents": density.cpu()},
                     acts={"latents": acts.cpu().to_sparse()})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decompositions
# ---------------------------------------------------------------------------------------------

_SPACES = {"mlp.up": ("neurons", "mlp_in"), "mlp.down": ("mlp_out", "neurons")}
"""(space of U, space of V) of each decomposed matrix of the target"""


def rank_one_directions(dec: Decomposition) -> dict[str, tuple[Float[Tensor, "C d_out"], Float[Tensor, "C d_in"]]]:
    """(U, V) of every decomposed matrix with rank-one components (P_c = U_c V_cᵀ: SPD always, APD
    with rank 1); empty when the components have a higher rank (no single direction each)."""
    if any(a.shape[1] != 1 for a in dec.A.values()):
        return {}
    return {n: (dec.B[n][:, :, 0].detach().float().cpu(), dec.A[n][:, 0, :].detach().float().cpu()) for n in dec.matrix_names}


@torch.no_grad()
def evaluate_decomposition_lm(
    dec: Decomposition, model: TransformerLM, data: LMActivations, *, ultralow_density: float = 1e-4, proxy_top_k: int = 50,
) -> LMTrained:  # fmt: skip
    """Score a decomposition of the MLP (any method, under its evaluation masks per token) on
    ``data`` (module docstring); the method fields and wall time are the caller's."""
    cm = dec.component_model if dec.component_model is not None else dec.attach(model)
    method = method_for(dec.config)
    x = data.tokens
    masks: Masks = method.eval_masks(cm, x)
    tau = method.active_threshold()
    with cm.capture(cm.layer_names, inputs=True) as a_in:
        cm(x)
    a_in = dict(a_in)
    with cm.capture(["mlp.down"]) as out:
        logits = cm(x, masks=masks)
    mlp_out = out["mlp.down"]
    row: dict[str, Any] = {"l0": method.mask_l0(masks)["l0"], **logit_scores(data, logits), "loss_recovered_thresholded": math.nan}
    if isinstance(masks, Mapping):  # graded masks (SPD's causal importances): also binary, g > τ
        hard = {n: (g > tau).to(g.dtype) for n, g in masks.items()}
        row["loss_recovered_thresholded"] = logit_scores(data, cm(x, masks=hard))["loss_recovered"]
    flat_out = data.mlp_out.reshape(-1, data.mlp_out.shape[-1])
    fvu = fraction_variance_unexplained(flat_out, mlp_out.reshape(-1, mlp_out.shape[-1]))
    row |= {"fvu": fvu, "fvu_mlp_out": fvu}

    # unit activations: the norm of what each unit writes under its mask (zero where inactive)
    writes = {n: cm.layers[n].per_component_sq_norm(cm.layers[n].component_acts(a_in[n])).clamp_min(0).sqrt()
              for n in cm.layer_names}  # ‖P_c a‖ per position
    if isinstance(masks, Mapping):  # one family per matrix
        families = {n: torch.where(g > tau, g * writes[n], 0.0) for n, g in masks.items()}
        family_of = {n: n for n in cm.layer_names}
    else:  # one family of components spanning every matrix
        total = torch.stack([w.pow(2) for w in writes.values()]).sum(0).sqrt()
        families = {"components": torch.where(masks > tau, masks * total, 0.0)}
        family_of = {n: "components" for n in cm.layer_names}
    flat = {f: a.reshape(-1, a.shape[-1]) for f, a in families.items()}
    densities = {f: (a > 0).float().mean(0).cpu() for f, a in flat.items()}
    counts = density_columns(torch.cat(list(densities.values())), ultralow_density)  # every family's units together
    proxies = [unit_proxies(x, data.logits.shape[-1], a, proxy_top_k) for a in flat.values()]
    pooled = {p: torch.cat([v[p] for v in proxies]) for p in PROXIES}
    row |= counts | {"n_params": float(sum(t.numel() for t in dec.params.values())), "bits_per_token": mask_bits(masks, tau),
                     **proxy_columns(pooled), "seed_cos_out": math.nan, "seed_cos_in": math.nan, "seed_act_corr": math.nan}  # fmt: skip
    details = [{"family": f, "l0": (a > 0).float().sum(-1).mean().item(), **density_columns(densities[f], ultralow_density),
                **proxy_columns(v)} for (f, a), v in zip(flat.items(), proxies)]  # fmt: skip

    tops = {f: top_positions(a, proxy_top_k).cpu() for f, a in flat.items()}
    units = {}
    for n, (U, V) in rank_one_directions(dec).items():
        fam = family_of[n]
        space_out, space_in = _SPACES.get(n, (f"{n}.out", f"{n}.in"))
        units[n] = UnitSet(space_out=space_out, space_in=space_in, write=U, read=V, live=densities[fam] > 0, top=tops[fam],
                           signed=False)  # fmt: skip
    live = torch.cat([d > 0 for d in densities.values()])
    return LMTrained(row=row, **_empty_arrows(live), details=details, units=units, densities=densities,  # type: ignore[arg-type]
                     acts={f: a.cpu().to_sparse() for f, a in flat.items()})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Seed consistency
# ---------------------------------------------------------------------------------------------


def matched_cosine(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"], signed: bool = True, tau: float = 0.9) -> dict[str, float]:
    """One-to-one (Hungarian) matching of the rows of ``a`` to distinct rows of ``b`` maximising the
    summed cosine (|cos| when not ``signed``): the mean cosine over the min(n, m) matched pairs, the
    fraction of them with cosine ≥ ``tau`` and their number (NaN / 0 when either is empty)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return {"mean": math.nan, "frac_above": math.nan, "n": 0.0}
    cos = cosine_matrix(a.double(), b.double())
    return _one_to_one(cos if signed else cos.abs(), tau)[3]


def _one_to_one(sim: Float[Tensor, "n m"], tau: float) -> tuple[bool, Int[Tensor, " k"], Float[Tensor, " k"], dict[str, float]]:
    """Hungarian matching of the smaller side of ``sim`` to distinct units of the other, maximising the
    summed similarity: whether the rows are ``sim``'s columns (it had more rows), the index on the other
    side and the similarity of each of the k = min(n, m) pairs, and their mean, fraction ≥ ``tau`` and k."""
    flipped = sim.shape[0] > sim.shape[1]
    match, matched = hungarian_match(sim.T if flipped else sim)
    summary = {"mean": matched.mean().item(), "frac_above": (matched >= tau).double().mean().item(), "n": float(matched.numel())}
    return flipped, match, matched, summary


def _column_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per column of the sparse COO ``x`` [N, U], the mean, the mean square and the density (the
    fraction of rows where it is ≠ 0), float64."""
    x = x.coalesce()
    col, val = x.indices()[1], x.values().double()
    zeros = torch.zeros(x.shape[1], dtype=torch.float64)
    moments = (zeros.index_add(0, col, v) / x.shape[0] for v in (val, val * val, (val != 0).double()))
    return tuple(moments)  # type: ignore[return-value]


def matched_correlation(
    a: Float[Tensor, "N n"], b: Float[Tensor, "N m"], tau: float = 0.9, frequent: float = 0.01
) -> dict[str, float]:
    """Seed consistency of what units do: the Pearson correlation over the N tokens of every unit of
    ``a`` with every unit of ``b`` (activations on the same tokens, dense or sparse COO), the units
    active (≠ 0) somewhere only; then as :func:`matched_cosine`: the mean correlation of a one-to-one
    (Hungarian) matching maximising its sum, the fraction ≥ ``tau`` and the number of pairs; and
    the mean over the matched pairs whose two units are both active on at least ``frequent`` of the
    tokens (``mean_frequent``, ``n_frequent``: a unit seen on a few tokens has a noisy correlation).

    ``a`` stays sparse (its [n, m] products cost nnz(a)·m); ``b``'s live columns are made dense."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"matched_correlation: the activations cover {a.shape[0]} and {b.shape[0]} tokens; both "
                         "must be of the same evaluation tokens")  # fmt: skip
    a, b = (t.to_sparse() if not t.is_sparse else t.coalesce() for t in (a, b))
    (mean_a, sq_a, dens_a), (mean_b, sq_b, dens_b) = _column_moments(a), _column_moments(b)
    live_a, live_b = (sq_a > 0).nonzero().squeeze(-1), (sq_b > 0).nonzero().squeeze(-1)
    if live_a.numel() == 0 or live_b.numel() == 0:
        return {"mean": math.nan, "frac_above": math.nan, "n": 0.0, "mean_frequent": math.nan, "n_frequent": 0.0}
    a, b = a.index_select(1, live_a).coalesce(), b.index_select(1, live_b).to_dense()
    mean_a, sq_a, dens_a = mean_a[live_a], sq_a[live_a], dens_a[live_a]
    mean_b, sq_b, dens_b = mean_b[live_b], sq_b[live_b], dens_b[live_b]
    second = torch.sparse.mm(a.t().coalesce().double(), b.double()) / a.shape[0]  # E[a_i b_j], [n, m]
    std_a, std_b = (sq_a - mean_a**2).clamp_min(0).sqrt(), (sq_b - mean_b**2).clamp_min(0).sqrt()
    scale = (std_a[:, None] * std_b[None, :]).clamp_min(1e-30)
    corr = ((second - mean_a[:, None] * mean_b[None, :]) / scale).clamp(-1, 1)
    corr = torch.where((std_a[:, None] > 0) & (std_b[None, :] > 0), corr, 0.0)  # a constant unit correlates with nothing
    flipped, match, matched, summary = _one_to_one(corr, tau)
    rows, cols = (dens_b, dens_a) if flipped else (dens_a, dens_b)
    both = (rows >= frequent) & (cols[match] >= frequent)
    return summary | {"mean_frequent": matched[both].mean().item() if both.any() else math.nan, "n_frequent": float(both.sum())}


def _pooled(parts: list[dict[str, float]], keys: tuple[str, ...] = ("mean", "frac_above"), n: str = "n") -> dict[str, float]:
    """Means of ``keys`` of several :func:`matched_cosine` / :func:`matched_correlation` results
    weighted by their numbers of pairs ``n``."""
    total = sum(p[n] for p in parts)
    if total == 0:
        return dict.fromkeys(keys, math.nan) | {n: 0.0}
    return {k: sum(p[k] * p[n] for p in parts if p[n]) / total for k in keys} | {n: total}


def _pair_consistency(a: LMTrained, b: LMTrained, tau: float) -> dict[str, float]:
    """Seed consistency of two models of one setting, per direction kind pooled over their unit sets."""
    out: dict[str, float] = {}
    for kind in ("write", "read"):
        parts = []
        for name, ua in a.units.items():
            ub = b.units.get(name)
            if ub is None:
                continue
            parts.append(matched_cosine(getattr(ua, kind)[ua.live], getattr(ub, kind)[ub.live], signed=ua.signed, tau=tau))
        pooled = _pooled(parts)
        label = "out" if kind == "write" else "in"
        out |= {f"cos_{label}": pooled["mean"], f"frac_{label}_above": pooled["frac_above"], f"n_{label}": pooled["n"]}
    parts = [matched_correlation(acts, b.acts[f], tau) for f, acts in a.acts.items() if f in b.acts]
    pooled, frequent = _pooled(parts), _pooled(parts, ("mean_frequent",), "n_frequent")
    return out | {"act_corr": pooled["mean"], "frac_act_above": pooled["frac_above"], "n_act": pooled["n"],
                  "act_corr_frequent": frequent["mean_frequent"], "n_act_frequent": frequent["n_frequent"]}  # fmt: skip


def seed_consistency(results: list[Trained], tau: float = 0.9) -> list[dict[str, Any]]:
    """For every setting (method × width × sparsity) trained with several seeds, every pair of its
    seeds: the Hungarian-matched mean cosine of their live units' output and input directions
    (:func:`matched_cosine`, per unit set, pooled by number of pairs) and the fraction ≥ ``tau``,
    and the Hungarian-matched correlation of their live units' activations (:func:`matched_correlation`,
    per family of units, pooled; ``act_corr_frequent`` over the pairs of units both active on ≥ 1% of
    the tokens). Fills each row's ``seed_cos_out`` / ``seed_cos_in`` /
    ``seed_act_corr`` with its mean over the pairs it is in;
    returns the table (one row per pair)."""
    groups: dict[tuple, list[LMTrained]] = {}
    for t in results:
        if isinstance(t, LMTrained) and t.units:
            r = t.row
            groups.setdefault((r["method"], r["width"], r["sparsity"]), []).append(t)
    table = []
    for (method, width, sparsity), members in groups.items():
        per_model: dict[int, list[dict[str, float]]] = {}
        for i, j in itertools.combinations(range(len(members)), 2):
            c = _pair_consistency(members[i], members[j], tau)
            table.append({"method": method, "width": width, "sparsity_knob": members[i].row["sparsity_knob"],
                          "sparsity": sparsity, "seed_a": members[i].row["seed"], "seed_b": members[j].row["seed"], **c})  # fmt: skip
            per_model.setdefault(i, []).append(c)
            per_model.setdefault(j, []).append(c)
        for i, cs in per_model.items():
            for column, key in (("seed_cos_out", "cos_out"), ("seed_cos_in", "cos_in"), ("seed_act_corr", "act_corr")):
                vals = [c[key] for c in cs if not math.isnan(c[key])]
                members[i].row[column] = statistics.fmean(vals) if vals else math.nan
    return table


# ---------------------------------------------------------------------------------------------
# SAE latents against components
# ---------------------------------------------------------------------------------------------


def _best(cos: Float[Tensor, "n k"], candidates: Bool[Tensor, " k"]) -> tuple[Int[Tensor, " n"], Float[Tensor, " n"]]:
    """Per row, the best candidate column by |cos| (index -1 and NaN when there are none)."""
    n = cos.shape[0]
    if not bool(candidates.any()):
        return torch.full((n,), -1, dtype=torch.long), torch.full((n,), math.nan, dtype=torch.float64)
    masked = cos.abs().masked_fill(~candidates[None, :], -1.0)
    value, index = masked.max(dim=1)
    return index, value


def _jaccard(a: Int[Tensor, "n k"], b: Int[Tensor, "n k"]) -> Float[Tensor, " n"]:
    """Jaccard overlap of each row's valid (≥ 0) entries of ``a`` and ``b`` (NaN when both are empty)."""
    va, vb = a >= 0, b >= 0
    inter = ((a[:, :, None] == b[:, None, :]) & va[:, :, None] & vb[:, None, :]).sum((1, 2))
    union = va.sum(1) + vb.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.nan).double()


def sae_component_relations(sae: LMTrained, dec: LMTrained, W_down: Float[Tensor, "d_model d_mlp"]) -> list[dict[str, Any]]:
    """For every live latent of ``sae`` (a neuron SAE or a transcoder), its best-matching rank-one
    subcomponents of ``dec`` (module docstring): ``out_*`` by output direction in the MLP output
    space against ``mlp.down``'s U; ``neuron_*`` (neuron SAEs) by neuron-space write against
    ``mlp.up``'s U; ``in_*`` by input direction (neuron SAE: against ``mlp.down``'s V; transcoder:
    ``mlp.up``'s V); ``top_jaccard``: overlap of the latent's top-activating token positions with
    those of its ``out`` match. Candidates are the decomposition's live subcomponents; |cos|."""
    lat = sae.units["latents"]
    down, up = dec.units.get("mlp.down"), dec.units.get("mlp.up")
    if down is None or up is None:
        raise ValueError("the decomposition has no rank-one units of mlp.up and mlp.down to relate SAE latents to")
    live = lat.live.nonzero().squeeze(-1)
    neuron_sae = lat.space_out == "neurons"
    out_dirs = lat.write[live] @ W_down.T.cpu().float() if neuron_sae else lat.write[live]  # (n, d_model)
    out_idx, out_cos = _best(cosine_matrix(out_dirs, down.write), down.live)
    in_target = down if neuron_sae else up
    in_idx, in_cos = _best(cosine_matrix(lat.read[live], in_target.read), in_target.live)
    if neuron_sae:
        neuron_idx, neuron_cos = _best(cosine_matrix(lat.write[live], up.write), up.live)
    else:
        neuron_idx, neuron_cos = torch.full_like(out_idx, -1), torch.full_like(out_cos, math.nan)
    matched_top = torch.where(out_idx[:, None] >= 0, down.top[out_idx.clamp_min(0)], -1)
    jaccard = _jaccard(lat.top[live], matched_top)
    density = sae.densities["latents"][live]
    s, d = sae.row, dec.row
    head = {"sae_method": s["method"], "sae_width": s["width"], "sae_sparsity": s["sparsity"], "sae_seed": s["seed"],
            "decomposition": d["method"], "decomposition_seed": d["seed"]}  # fmt: skip
    rows = []
    for i, latent in enumerate(live.tolist()):
        rows.append(head | {"latent": latent, "density": density[i].item(),
                            "out_component": int(out_idx[i]), "out_cos": out_cos[i].item(),
                            "neuron_component": int(neuron_idx[i]), "neuron_cos": neuron_cos[i].item(),
                            "in_component": int(in_idx[i]), "in_cos": in_cos[i].item(), "top_jaccard": jaccard[i].item()})  # fmt: skip
    return rows


def relation_summary(rows: list[dict[str, Any]], components_live: int, tau: float = 0.9) -> dict[str, Any]:
    """One line of the SAE-component summary: medians of the best cosines and of the Jaccard overlap
    (and its mean), the fraction of latents whose best output cosine is ≥ ``tau``, and how many
    distinct live ``mlp.down`` subcomponents (of ``components_live``) are such a match."""

    def values(col: str) -> list[float]:
        return [r[col] for r in rows if not math.isnan(r[col])]

    def med(col: str) -> float:
        return statistics.median(values(col)) if values(col) else math.nan

    close = [r for r in rows if not math.isnan(r["out_cos"]) and r["out_cos"] >= tau]
    first = rows[0] if rows else {}
    jaccard = values("top_jaccard")
    return {k: first.get(k) for k in ("sae_method", "sae_width", "sae_sparsity", "sae_seed", "decomposition", "decomposition_seed")} | {
        "n_latents": len(rows), "median_out_cos": med("out_cos"), "frac_out_above": len(close) / len(rows) if rows else math.nan,
        "median_neuron_cos": med("neuron_cos"), "median_in_cos": med("in_cos"), "median_top_jaccard": med("top_jaccard"),
        "mean_top_jaccard": statistics.fmean(jaccard) if jaccard else math.nan,
        "components_matched": len({r["out_component"] for r in close}), "components_live": components_live,
    }  # fmt: skip
