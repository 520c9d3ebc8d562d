import math

import torch
from jaxtyping import Float
from torch import Tensor

from apd.distributed import rank_and_world
from apd.losses.registry import register_loss


def importance_minimality_loss(
    ci_upper: dict[str, Float[Tensor, "*rows C"]], p: float, eps: float = 1e-12, beta: float = 0.0,
    valid: Tensor | None = None,
) -> Float[Tensor, ""]:
    """Σ_l Σ_c mean_rows (g⁺_{l,c} + ε)^p (SPEC §5.3): summed over layers and subcomponents, not averaged;
    rows are the batch's samples (or sample positions). With ``beta`` > 0 each subcomponent's mean is
    also weighted by β·log₂(1 + its sum over the rows) (goodfire-ai/spd's frequency term).

    Data-parallel (``apd.distributed``): the frequency term's sums are the global batch's. Its value
    is the global loss; its gradient on each rank is the rank's rows' share of the global gradient
    times the world size, so the averaged gradient equals one process's on the whole batch.

    ``valid`` [*rows] (0/1, a dict batch's attention mask) keeps only those rows: sums and means run
    over the valid positions."""
    rank, world = rank_and_world()
    total = None
    for g in ci_upper.values():
        rows = _power(g + eps, p).reshape(-1, g.shape[-1])
        n_rows = rows.shape[0]
        if valid is not None:
            w = valid.reshape(-1, 1).to(rows.dtype)
            rows, n_rows = rows * w, w.sum().clamp_min(1)  # type: ignore[assignment]
        sums = rows.sum(0)
        mean = sums / n_rows
        if beta == 0:
            layer = mean.sum()
        elif world == 1:
            layer = (mean + beta * mean * torch.log2(1 + sums)).sum()
        else:  # L = Σ_c S_c/N (1 + β log₂(1 + S_c)), S_c global: dL = Σ_c k_c dS_c with k_c from the global sums
            S = sums.detach().clone()
            torch.distributed.all_reduce(S)
            N = n_rows * world  # (with ``valid``: assumes the ranks' shards hold equally many valid rows)
            k = (1 + beta * torch.log2(1 + S)) / N + beta * (S / N) / (math.log(2) * (1 + S))
            value = (S / N * (1 + beta * torch.log2(1 + S))).sum()
            surrogate = (sums * k).sum() * world
            layer = value + surrogate - surrogate.detach()
        total = layer if total is None else total + layer
    assert total is not None, "no causal importances"
    return total


def _power(x: Tensor, p: float) -> Tensor:
    """x^p, and x itself at p 1 (where the annealed presets end): pow(1.0)'s backward still computes
    p·x^(p−1). On the 1-layer LM's g⁺ (2 × [2048, 512]) the loss's forward and backward take about
    half the time (pow's over this: 1.9-2.7× in four runs; benchmarks/README.md, ``minimality_power``).
    At p 2, x·x was not measurably faster than pow (0.87-1.29× over five runs), so pow stays."""
    return x if p == 1 else x.pow(p)


@register_loss("importance_minimality", order=30)
def _importance_minimality(ctx) -> Tensor:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    from apd.methods.spd import annealed_p, minimality_scale

    c = ctx.config
    loss = importance_minimality_loss(ctx.ci_upper, annealed_p(c, ctx.step), c.importance_minimality_eps,
                                      c.importance_minimality_beta, ctx.valid)  # fmt: skip
    scale = minimality_scale(c, ctx.step)
    return loss if scale == 1.0 else loss * scale
