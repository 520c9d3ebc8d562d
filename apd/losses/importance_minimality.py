import torch
from jaxtyping import Float
from torch import Tensor

from apd.losses.registry import register_loss


def importance_minimality_loss(
    ci_upper: dict[str, Float[Tensor, "*rows C"]], p: float, eps: float = 1e-12, beta: float = 0.0
) -> Float[Tensor, ""]:
    """Σ_l Σ_c mean_rows (g⁺_{l,c} + ε)^p (SPEC §5.3): summed over layers and subcomponents, not averaged;
    rows are the batch's samples (or sample positions). With ``beta`` > 0 each subcomponent's mean is
    also weighted by β·log₂(1 + its sum over the rows) (goodfire-ai/spd's frequency term)."""
    total = None
    for g in ci_upper.values():
        rows = (g + eps).pow(p).reshape(-1, g.shape[-1])
        sums = rows.sum(0)
        mean = sums / rows.shape[0]
        layer = (mean + beta * mean * torch.log2(1 + sums)).sum() if beta > 0 else mean.sum()
        total = layer if total is None else total + layer
    assert total is not None, "no causal importances"
    return total


@register_loss("importance_minimality", methods=("spd",), order=30)
def _importance_minimality(ctx) -> Tensor:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    from apd.methods.spd import annealed_p

    c = ctx.config
    return importance_minimality_loss(ctx.ci_upper, annealed_p(c, ctx.step), c.importance_minimality_eps,
                                      c.importance_minimality_beta)  # fmt: skip
