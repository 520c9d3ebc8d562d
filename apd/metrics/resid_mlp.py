"""Residual MLP recovery metrics (SPEC §3.2), as pure functions on plain tensors.

Component weights come as ``{module_name: Tensor[C, d_out, d_in]}`` in ``nn.Linear`` layout (a
W_in [C, d_mlp, d_embed], a W_out [C, d_embed, d_mlp]); which modules are a layer's W_in and
W_out the model says (``ResidMLP.mlp_pairs``).
Metrics that run a decomposition take callables instead of the component model itself:

- ``masked_forward(x, s)``: the decomposed model's output with component mask s [B, C];
- ``attributions(x)``: component attributions [B, C];
- ``topk_forward(x)``: the decomposed model's output under its own top-k selection.
"""

from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from apd.toy_models.resid_mlp import ResidMLP, resid_mlp_batch, resid_mlp_labels

__all__ = [
    "MaskedForward",
    "Attributions",
    "neuron_contributions",
    "target_neuron_contributions",
    "component_neuron_contributions",
    "ComponentClasses",
    "classify_components",
    "feature_to_component",
    "matched_neuron_contributions",
    "nc_slope",
    "top1_onehot_mse",
    "scrub_antiscrub_mse",
    "label_mses",
    "resid_mlp_metrics",
    "resid_mlp_run_metrics",
    "spd_neuron_contributions",
    "spd_unit_layers",
    "layer_neuron_spans",
    "scrub_antiscrub_mse_per_module",
    "resid_mlp_spd_metrics",
]

MaskedForward = Callable[[Float[Tensor, "B n_features"], Float[Tensor, "B C"]], Tensor]
Attributions = Callable[[Float[Tensor, "B n_features"]], Float[Tensor, "B C"]]


def neuron_contributions(
    W_E: Float[Tensor, "d_embed n_features"],
    W_in: Float[Tensor, "*batch d_mlp d_embed"],
    W_out: Float[Tensor, "*batch d_embed d_mlp"],
) -> Float[Tensor, "*batch n_features d_mlp"]:
    """NC(i) = (W_U[i, :] W_out) ⊙ (W_in W_E[:, i]) for one layer, W_U = W_Eᵀ.

    Leading batch dims (e.g. components) broadcast.
    """
    write = W_E.T @ W_out  # [..., n_features, d_mlp]: W_U[i] W_out
    read = (W_in @ W_E).transpose(-1, -2)  # [..., n_features, d_mlp]: (W_in W_E[:, i])ᵀ
    return write * read


def target_neuron_contributions(model: ResidMLP) -> Float[Tensor, "n_features d_mlp"]:
    """NC of the target model, neurons of all layers concatenated (cross-layer paths ignored)."""
    return torch.cat(
        [
            neuron_contributions(model.W_E, layer.mlp_in.weight, layer.mlp_out.weight)
            for layer in model.layers
        ],
        dim=-1,
    ).detach()


def component_neuron_contributions(
    W_E: Float[Tensor, "d_embed n_features"],
    component_weights: dict[str, Float[Tensor, "C d_out d_in"]],
    pairs: Sequence[tuple[str, str]],
) -> Float[Tensor, "C n_features d_mlp"]:
    """NC_c(i) of every component, neurons of all layers concatenated; ``pairs`` names each layer's
    (W_in, W_out) modules (``ResidMLP.mlp_pairs()``).

    Each layer is scored on its own (the direct path W_E → layer → W_U); paths through several
    layers are ignored, as in the paper's plots.
    """
    return torch.cat(
        [neuron_contributions(W_E, component_weights[w_in], component_weights[w_out]) for w_in, w_out in pairs],
        dim=-1,
    ).detach()


def _serves(
    nc_components: Float[Tensor, "C n_features d_mlp"], threshold: float
) -> Bool[Tensor, "C n_features"]:
    return nc_components.abs().amax(dim=-1) > threshold


class ComponentClasses(TypedDict):
    n_dead: int
    n_mono: int
    n_duo: int
    n_poly: int
    n_features_with_dedicated_component: int
    has_dedicated_component: Bool[Tensor, " n_features"]
    serves: Bool[Tensor, "C n_features"]


def classify_components(
    nc_components: Float[Tensor, "C n_features d_mlp"], threshold: float = 0.04
) -> ComponentClasses:
    """Count components serving 0 / 1 / 2 / ≥3 features (dead / mono / duo / poly).

    Component c serves feature i if max over neurons |NC_c(i)| > threshold. A feature has a
    dedicated component if some mono component serves it.
    """
    serves = _serves(nc_components, threshold)
    n_served = serves.sum(dim=1)
    mono = n_served == 1
    dedicated = (serves & mono[:, None]).any(dim=0)
    return ComponentClasses(
        n_dead=int((n_served == 0).sum()),
        n_mono=int(mono.sum()),
        n_duo=int((n_served == 2).sum()),
        n_poly=int((n_served >= 3).sum()),
        n_features_with_dedicated_component=int(dedicated.sum()),
        has_dedicated_component=dedicated,
        serves=serves,
    )


def feature_to_component(
    nc_components: Float[Tensor, "C n_features d_mlp"], threshold: float = 0.04
) -> Int[Tensor, " n_features"]:
    """Per feature, the component of largest max-over-neurons |NC_c(i)|; -1 if none serves it."""
    strength = nc_components.abs().amax(dim=-1)  # [C, n_features]
    best_value, best = strength.max(dim=0)
    return torch.where(best_value > threshold, best, torch.full_like(best, -1))


def matched_neuron_contributions(
    nc_components: Float[Tensor, "C n_features d_mlp"],
    groups: Int[Tensor, " C"] | None = None,
) -> Float[Tensor, "n_features d_mlp"]:
    """Per feature i, NC_{c*(i)}(i) of the component of largest max-over-neurons |NC|.

    With ``groups`` (a group id per component: SPD's W_in subcomponents by layer), c*(i) is chosen in
    each group and the chosen NCs are summed: a feature's pieces in every layer, its mechanism (a
    subcomponent's NC is zero outside its layer's neurons, so the sum is their concatenation).
    """
    n = torch.arange(nc_components.shape[1], device=nc_components.device)
    strength = nc_components.abs().amax(dim=-1)  # [C, n_features]
    if groups is None:
        return nc_components[strength.argmax(dim=0), n]
    matched = torch.zeros_like(nc_components[0])
    for g in groups.unique():
        in_group = (groups == g)[:, None]
        best = strength.masked_fill(~in_group, -1.0).argmax(dim=0)
        matched += nc_components[best, n]
    return matched


def nc_slope(
    nc_target: Float[Tensor, "n_features d_mlp"],
    nc_components: Float[Tensor, "C n_features d_mlp"],
    groups: Int[Tensor, " C"] | None = None,
) -> float:
    """Least-squares slope through the origin of the matched NC(i) against NC_target(i).

    The match is :func:`matched_neuron_contributions` (the component of largest |NC| for feature i,
    or with ``groups`` one per group, summed); the fit pools every (feature, neuron) pair. 1.0 means
    no shrinkage; NaN if the target has no neuron contributions.
    """
    matched = matched_neuron_contributions(nc_components, groups)
    return float((matched * nc_target).sum() / (nc_target * nc_target).sum())


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _per_row_mse(a: Float[Tensor, "B n"], b: Float[Tensor, "B n"]) -> Float[Tensor, " B"]:
    return ((a - b) ** 2).mean(dim=-1)


def top1_onehot_mse(
    target_model: nn.Module,
    masked_forward: MaskedForward,
    attributions: Attributions,
    n_features: int,
    value: float = 1.0,
) -> Float[Tensor, " n_features"]:
    """Per feature i: MSE to the target on input value·e_i with only the top-1 component kept.

    The single component is the one of largest attribution on that input (exact top-1, not batch
    top-k). ``value`` defaults to 1, where feature i's ReLU is active.
    """
    device = _device(target_model)
    x = value * torch.eye(n_features, device=device)
    attr = attributions(x).detach()
    s = F.one_hot(attr.argmax(dim=-1), attr.shape[-1]).to(x.dtype)
    with torch.no_grad():
        return _per_row_mse(masked_forward(x, s), target_model(x))


def scrub_antiscrub_mse(
    target_model: nn.Module,
    masked_forward: MaskedForward,
    feature_component: Int[Tensor, " n_features"],
    n_components: int,
    n_features: int,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Float[Tensor, " n_features"], Float[Tensor, " n_features"]]:
    """Per feature: output MSE to the target under random masks, its component forced on / off.

    Inputs are v·e_i with v ~ U[-1, 1]; every component is kept with probability 0.5, except the
    feature's component (``feature_component[i]``), which is forced on ("scrubbed") or off
    ("anti-scrubbed"); both use the same inputs and random masks. Features with component -1
    get NaN. ``generator`` must live on the model's device.
    """
    device = _device(target_model)
    feats = torch.arange(n_features, device=device).repeat_interleave(n_samples)  # [n·S]
    values = torch.rand(feats.shape, generator=generator, device=device) * 2 - 1
    x = F.one_hot(feats, n_features).float() * values[:, None]
    keep = torch.rand((feats.shape[0], n_components), generator=generator, device=device) < 0.5
    comp = feature_component.to(device)[feats]  # [n·S]
    has = comp >= 0
    forced = F.one_hot(comp.clamp_min(0), n_components).bool() & has[:, None]
    s_on = (keep | forced).float()
    s_off = (keep & ~forced).float()
    with torch.no_grad():
        y = target_model(x)
        scrubbed = _per_row_mse(masked_forward(x, s_on), y).view(n_features, n_samples).mean(1)
        anti = _per_row_mse(masked_forward(x, s_off), y).view(n_features, n_samples).mean(1)
    none = feature_component.to(device) < 0
    nan = torch.full_like(scrubbed, float("nan"))
    return torch.where(none, nan, scrubbed), torch.where(none, nan, anti)


@torch.no_grad()
def label_mses(
    target: nn.Module,
    monosemantic: nn.Module,
    topk_forward: Callable[[Tensor], Tensor] | None,
    x: Float[Tensor, "B n_features"],
    labels: Float[Tensor, "B n_features"],
) -> dict[str, float]:
    """MSEs (mean over batch and outputs) of the target, the monosemantic baseline and APD top-k.

    Keys: mse_target_vs_labels, mse_monosemantic_vs_labels, mse_monosemantic_vs_target and, when
    ``topk_forward`` is given, mse_topk_vs_labels, mse_topk_vs_target.
    """
    y_target, y_mono = target(x), monosemantic(x)
    out = {
        "mse_target_vs_labels": F.mse_loss(y_target, labels).item(),
        "mse_monosemantic_vs_labels": F.mse_loss(y_mono, labels).item(),
        "mse_monosemantic_vs_target": F.mse_loss(y_mono, y_target).item(),
    }
    if topk_forward is not None:
        y_topk = topk_forward(x)
        out["mse_topk_vs_labels"] = F.mse_loss(y_topk, labels).item()
        out["mse_topk_vs_target"] = F.mse_loss(y_topk, y_target).item()
    return out


def resid_mlp_metrics(
    target: ResidMLP,
    monosemantic: ResidMLP,
    component_weights: dict[str, Float[Tensor, "C d_out d_in"]],
    masked_forward: MaskedForward,
    attributions: Attributions,
    topk_forward: Callable[[Tensor], Tensor] | None = None,
    threshold: float = 0.04,
    n_eval: int = 10_000,
    n_scrub_samples: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """All SPEC §3.2 numbers as scalars, keyed as in metrics.json.

    Per-feature metrics are averaged over features (scrubbed / anti-scrubbed over the features that
    some component serves; NaN if none). Label MSEs use ``n_eval`` fresh samples.
    """
    cfg = target.config
    device = target.W_E.device
    nc_c = component_neuron_contributions(target.W_E, component_weights, target.mlp_pairs())
    classes = classify_components(nc_c, threshold)
    g = torch.Generator(device=device).manual_seed(seed)
    scrubbed, anti = scrub_antiscrub_mse(
        target,
        masked_forward,
        feature_to_component(nc_c, threshold),
        n_components=nc_c.shape[0],
        n_features=cfg.n_features,
        n_samples=n_scrub_samples,
        generator=g,
    )
    x = resid_mlp_batch(cfg.n_features, n_eval, cfg.feature_probability, g, device)
    return {
        "n_features_with_dedicated_component": classes["n_features_with_dedicated_component"],
        "n_mono": classes["n_mono"],
        "n_duo": classes["n_duo"],
        "n_poly": classes["n_poly"],
        "n_dead": classes["n_dead"],
        "nc_slope": nc_slope(target_neuron_contributions(target), nc_c),
        "top1_onehot_mse": top1_onehot_mse(
            target, masked_forward, attributions, cfg.n_features
        ).mean().item(),
        "scrubbed_mse": scrubbed.nanmean().item(),
        "antiscrubbed_mse": anti.nanmean().item(),
        **label_mses(target, monosemantic, topk_forward, x, resid_mlp_labels(x)),
    }


def spd_neuron_contributions(
    W_E: Float[Tensor, "d_embed n_features"],
    component_weights: dict[str, Float[Tensor, "C d_out d_in"]],
    pairs: Sequence[tuple[str, str]],
) -> tuple[Float[Tensor, "U n_features d_mlp"], list[tuple[str, int]]]:
    """NC of every W_in subcomponent of SPD (SPEC §3.2, §5.5): its read P_c^in W_E[:, i] through its
    layer's decomposed W_out (the sum of that matrix's subcomponents), on that layer's neurons; the
    neurons of all layers concatenated (zero outside the subcomponent's layer). Also the (module,
    index) of each row."""
    blocks, units = [], []
    spans = layer_neuron_spans(component_weights, pairs)
    total = spans[-1][1]
    for (w_in, w_out), (start, end) in zip(pairs, spans, strict=True):
        nc = neuron_contributions(W_E, component_weights[w_in], component_weights[w_out].sum(0))  # (C, n, d_mlp_l)
        blocks.append(F.pad(nc, (start, total - end)))
        units += [(w_in, c) for c in range(nc.shape[0])]
    return torch.cat(blocks).detach(), units


def layer_neuron_spans(
    component_weights: dict[str, Float[Tensor, "C d_out d_in"]], pairs: Sequence[tuple[str, str]]
) -> list[tuple[int, int]]:
    """Each layer's (start, end) in the concatenated neuron axis of :func:`spd_neuron_contributions`
    (and of :func:`target_neuron_contributions`): its W_in's output widths, in layer order."""
    ends = torch.tensor([component_weights[w_in].shape[1] for w_in, _ in pairs]).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def spd_unit_layers(units: Sequence[tuple[str, int]], pairs: Sequence[tuple[str, str]]) -> Int[Tensor, " U"]:
    """The layer index of each (W_in module, index) unit of :func:`spd_neuron_contributions`: the
    ``groups`` that :func:`nc_slope` needs to match a feature's piece in every layer."""
    w_ins = [w_in for w_in, _ in pairs]
    return torch.tensor([w_ins.index(m) for m, _ in units])


def scrub_antiscrub_mse_per_module(
    target_model: nn.Module,
    masked_forward: Callable[[Tensor, dict[str, Tensor]], Tensor],
    feature_unit: Sequence[tuple[str, int] | None],
    C_per_module: dict[str, int],
    n_features: int,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Float[Tensor, " n_features"], Float[Tensor, " n_features"]]:
    """:func:`scrub_antiscrub_mse` for per-module masks (SPD): every subcomponent of every module is
    kept with probability 0.5, except the feature's own unit ``feature_unit[i]`` (module, index),
    forced on (scrubbed) or off (anti-scrubbed); NaN for features without one."""
    device = _device(target_model)
    feats = torch.arange(n_features, device=device).repeat_interleave(n_samples)
    values = torch.rand(feats.shape, generator=generator, device=device) * 2 - 1
    x = F.one_hot(feats, n_features).float() * values[:, None]
    keep = {n: torch.rand((feats.shape[0], C), generator=generator, device=device) < 0.5 for n, C in C_per_module.items()}
    on, off = {n: k.clone() for n, k in keep.items()}, {n: k.clone() for n, k in keep.items()}
    for i, unit in enumerate(feature_unit):
        if unit is not None:
            rows = feats == i
            on[unit[0]][rows, unit[1]] = True
            off[unit[0]][rows, unit[1]] = False
    with torch.no_grad():
        y = target_model(x)
        scrubbed = _per_row_mse(masked_forward(x, {n: m.float() for n, m in on.items()}), y).view(n_features, n_samples).mean(1)
        anti = _per_row_mse(masked_forward(x, {n: m.float() for n, m in off.items()}), y).view(n_features, n_samples).mean(1)
    none = torch.tensor([u is None for u in feature_unit], device=device)
    nan = torch.full_like(scrubbed, float("nan"))
    return torch.where(none, nan, scrubbed), torch.where(none, nan, anti)


def resid_mlp_spd_metrics(target: ResidMLP, monosemantic: ResidMLP, ctx, threshold: float = 0.04) -> dict[str, float]:  # noqa: ANN001
    """A run's residual-MLP numbers for SPD (SPEC §3.2, §5.5), from its subcomponents: per feature a
    dedicated W_in subcomponent (NC through the decomposed W_out, as APD's), the NC slope of those
    subcomponents (shrinkage), scrubbed vs anti-scrubbed output MSE, the label MSEs of the
    CI-masked model, and whether each layer's W_out is one mechanism (the run's mechanisms,
    ``ctx.mechanisms``, grouped over every layer at once: how many of its live subcomponents the
    mechanism holding most of them has, that count's share of them, and how many mechanisms its
    subcomponents fall in). With several layers a feature's mechanism has a W_in piece per layer:
    ``nc_slope`` sums the best-matching subcomponent of each layer, ``nc_slope/<W_in>`` is each
    layer's own slope on its neurons."""
    cfg, cm, dec = target.config, ctx.cm, ctx.dec
    pairs, weights = target.mlp_pairs(), dec.component_weights()
    nc_c, units = spd_neuron_contributions(target.W_E, weights, pairs)
    classes = classify_components(nc_c, threshold)
    best = feature_to_component(nc_c, threshold)
    feature_unit = [units[int(u)] if u >= 0 else None for u in best]
    g = torch.Generator(device=target.W_E.device).manual_seed(ctx.seed)
    scrubbed, anti = scrub_antiscrub_mse_per_module(target, ctx.masked_forward, feature_unit, cm.C_per_module(),
                                                    cfg.n_features, 100, g)  # fmt: skip
    x = resid_mlp_batch(cfg.n_features, ctx.n_eval, cfg.feature_probability, g, target.W_E.device)
    layer_of = spd_unit_layers(units, pairs).to(nc_c.device)
    nc_t = target_neuron_contributions(target)
    out = {
        "n_features_with_dedicated_component": classes["n_features_with_dedicated_component"],
        "n_mono": classes["n_mono"], "n_duo": classes["n_duo"], "n_poly": classes["n_poly"], "n_dead": classes["n_dead"],
        "nc_slope": nc_slope(nc_t, nc_c, layer_of),
        "scrubbed_mse": scrubbed.nanmean().item(), "antiscrubbed_mse": anti.nanmean().item(),
    }  # fmt: skip
    if len(pairs) > 1:
        for layer, ((w_in, _), (a, b)) in enumerate(zip(pairs, layer_neuron_spans(weights, pairs), strict=True)):
            out[f"nc_slope/{w_in}"] = nc_slope(nc_t[:, a:b], nc_c[layer_of == layer][:, :, a:b])
    mses = label_mses(target, monosemantic, ctx.eval_forward, x, resid_mlp_labels(x))
    out[f"mse_{ctx.method.name}_{ctx.method.eval_mask_name}_vs_labels"] = mses.pop("mse_topk_vs_labels")
    mses.pop("mse_topk_vs_target")
    out |= mses
    mechs = ctx.mechanisms
    for _, w_out in pairs:  # the mechanism holding most of this W_out's live subcomponents
        per = [sum(m.startswith(f"{w_out}:") for m in mech.members) for mech in mechs]
        live = sum(per)
        out[f"w_out_mechanism_rank/{w_out}"] = float(max(per, default=0))
        out[f"w_out_mechanism_share/{w_out}"] = max(per, default=0) / live if live else 0.0
        out[f"w_out_n_mechanisms/{w_out}"] = float(sum(p > 0 for p in per))
    return out


def resid_mlp_run_metrics(target: ResidMLP, monosemantic: ResidMLP, ctx) -> dict[str, float]:  # noqa: ANN001  (EvalContext)
    """A run's residual-MLP numbers (:func:`resid_mlp_metrics`) with the run's own masks: the
    method's evaluation masks for the output MSEs and, for the top-1 and scrubbing numbers, the
    component of largest score (APD: attribution; ``Method.unit_scores``); a method whose units live
    in one matrix each (``not Method.units_span_matrices``: SPD): :func:`resid_mlp_spd_metrics`."""
    method, cm = ctx.method, ctx.cm
    if not method.units_span_matrices:
        return resid_mlp_spd_metrics(target, monosemantic, ctx)

    def ranking(x: Tensor) -> Tensor:
        with torch.no_grad():
            return method.unit_scores(cm, x)

    with torch.no_grad():
        m = resid_mlp_metrics(target, monosemantic, ctx.dec.component_weights(), ctx.masked_forward, ranking,
                              ctx.eval_forward, n_eval=ctx.n_eval, seed=ctx.seed)  # fmt: skip
    m[f"mse_{method.name}_{method.eval_mask_name}_vs_labels"] = m.pop("mse_topk_vs_labels")
    m.pop("mse_topk_vs_target")  # = the generic <mask>_recon_mse (same batch size, other samples)
    return m
