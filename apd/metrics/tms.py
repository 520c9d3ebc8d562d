"""TMS recovery metrics (SPEC §3.1): does each ground-truth mechanism W e_j e_jᵀ get its own component?"""

import torch
from jaxtyping import Float
from torch import Tensor

from apd.metrics.recovery import all_recovered, hungarian_match, represented_features

__all__ = ["tms_recovery", "tms_metrics"]


def tms_recovery(
    W: Float[Tensor, "n_hidden n_features"],
    components: Float[Tensor, "C n_hidden n_features"],
    taus: tuple[float, ...] = (0.9, 0.99),
    represented_frac: float = 0.1,
    dead_frac: float = 1e-2,
    negligible_col: float = 1e-2,
) -> dict[str, float]:
    """Score components of W (``nn.Linear`` layout, e.g. ``component_weights()["enc"]``).

    For feature j, cos_j = max_c cos(P_c[:, j], W[:, j]) and c*(j) its argmax, over the components
    whose column holds at least ``negligible_col`` of ‖W[:, j]‖ (a near-zero column's direction is
    noise: an SPD subcomponent left at 0.06% of a feature's norm once had the best cosine, 0.99973
    against 0.9997, and took the feature's ML2R to 0.0006). Reports MMCS, ML2R
    (‖P_{c*(j)}[:, j]‖ / ‖W[:, j]‖; < 1 is shrinkage), R_τ, the one-to-one Hungarian matching of
    represented features (‖W[:, j]‖ ≥ represented_frac · max_j ‖W[:, j]‖) to distinct components
    (``all_recovered`` = 1 when every represented feature is matched with cos ≥ 0.99:
    :func:`apd.metrics.recovery.all_recovered`, the comparison's definition too), dead
    components (‖P_c‖_F < dead_frac · ‖W‖_F) and mean input selectivity of live components (fraction
    of ‖P_c‖²_F on its best input column).
    """
    if components.shape[1:] != W.shape:
        raise ValueError(f"components have shape {tuple(components.shape)}; expected (C, {W.shape[0]}, {W.shape[1]})")
    W, P = W.detach().float().cpu(), components.detach().float().cpu()
    w_norm = W.norm(dim=0)  # (n,)
    p_cols = P.norm(dim=1)  # (C, n): ‖P_c[:, j]‖
    cos = torch.einsum("mj,cmj->jc", W, P) / (w_norm[:, None] * p_cols.T).clamp_min(1e-12)  # (n, C)
    cos = torch.where(p_cols.T >= negligible_col * w_norm[:, None], cos, torch.zeros_like(cos))
    best_cos, best_c = cos.max(dim=1)
    ml2r = (p_cols[best_c, torch.arange(W.shape[1])] / w_norm.clamp_min(1e-12)).mean()

    represented = represented_features(w_norm, represented_frac)
    _, matched = hungarian_match(cos[represented])
    n_matched = int((matched >= 0.99).sum())

    comp_norm = P.flatten(1).norm(dim=1)
    live = comp_norm >= dead_frac * W.norm()
    selectivity = (p_cols.pow(2).max(dim=1).values / comp_norm.pow(2).clamp_min(1e-12))[live]

    out = {
        "mmcs": best_cos.mean().item(),
        "ml2r": ml2r.item(),
        **{f"n_recovered_{t}": float((best_cos >= t).sum()) for t in taus},
        "matched_mean_cos": matched.mean().item(),
        "n_recovered_matched_0.99": float(n_matched),
        "n_represented": float(represented.sum()),
        "all_recovered": float(all_recovered(cos, w_norm, 0.99, represented_frac)),
        "n_dead": float((~live).sum()),
        "selectivity": selectivity.mean().item() if live.any() else 0.0,
    }
    return out


def identity_recovery(
    P_hidden: Float[Tensor, "C m m"], ci_onehot: Float[Tensor, "n C"], tau: float, cos_threshold: float = 0.99,
    norm_tolerance: float = 0.05,
) -> dict[str, float]:
    """Is the hidden identity of TMS + ID one rank-m mechanism of SPD subcomponents (SPEC §5.5)?

    ``ci_onehot``: the hidden matrix's causal importances on the one-feature inputs x = e_j. Alive
    subcomponents are on (g > τ) for some feature. Recovered (``id_recovered`` = 1): exactly m alive
    subcomponents, nothing else in the matrix alive, and their sum is the identity (Frobenius cosine
    ≥ ``cos_threshold``, norm within ``norm_tolerance``). Also: how many are on for every feature
    (``id_n_always_on``) and the fraction of (feature, alive subcomponent) pairs that are on. A
    subcomponent U_c V_cᵀ whose read direction V_c is orthogonal to feature j's hidden vector does
    nothing on e_j, so its causal importance there is rightly 0: with m = 2 and five features SPD
    picks such a basis (fewer active pieces), and "on for every input" is not what it learns.
    """
    m = P_hidden.shape[-1]
    on = ci_onehot > tau
    alive = on.any(0)
    summed = P_hidden[alive].sum(0) if alive.any() else torch.zeros(m, m)
    eye = torch.eye(m)
    cos = float((summed * eye).sum() / (summed.norm() * eye.norm()).clamp_min(1e-12))
    ratio = float(summed.norm() / eye.norm())
    recovered = int(alive.sum()) == m and cos >= cos_threshold and abs(ratio - 1) <= norm_tolerance
    return {"id_n_alive": float(alive.sum()), "id_n_always_on": float(on[:, alive].all(0).sum()),
            "id_on_fraction": float(on[:, alive].float().mean()) if alive.any() else 0.0,
            "id_cos": cos, "id_norm_ratio": ratio, "id_recovered": float(recovered)}  # fmt: skip


def tms_metrics(target, dec, ctx) -> dict[str, float]:  # noqa: ANN001  (TMS, Decomposition, apd.evaluation.EvalContext)
    """A run's TMS numbers: :func:`tms_recovery` of the components (SPD: subcomponents) of W (the
    ``enc`` matrix); on + ID, for a method whose units live in one matrix each (``Units.per_matrix``:
    SPD), also :func:`identity_recovery` of the hidden matrix under its evaluation masks."""
    from apd.methods import Units

    out = tms_recovery(target.W, dec.component_weights()["enc"])
    if ctx.method.units is Units.per_matrix and target.hidden is not None:
        onehot = torch.eye(target.config.n_features, device=ctx.device)
        masks = ctx.eval_masks(onehot)["hidden"].detach().cpu()
        out |= identity_recovery(dec.component_weights()["hidden"].detach().cpu(), masks, ctx.method.active_threshold())
    return out
