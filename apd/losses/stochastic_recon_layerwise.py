from jaxtyping import Float
from torch import Tensor

from apd.losses.distance import output_distance
from apd.losses.registry import register_loss


@register_loss("stochastic_recon_layerwise", order=20)
def stochastic_recon_layerwise_loss(ctx) -> Float[Tensor, ""] | None:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    """(1/(L·S)) Σ_l Σ_s D(f(x | only layer l masked with m_s), f(x | W)) (SPEC §5.3): each layer use
    masked alone, the others at their target weights. None (off) under subset routing, whose one pass
    stands in for these."""
    if ctx.config.layer_routing.value == "uniform_k_subset":
        return None
    total, count = None, 0
    for _ in range(ctx.config.n_mask_samples):
        masks, deltas = ctx.stochastic_masks()
        for n, m in masks.items():
            out = ctx.masked_out({n: m}, None if deltas is None else {n: deltas[n]})
            d = output_distance(ctx.target_out, out, ctx.config.output_loss, ctx.valid)
            total = d if total is None else total + d
            count += 1
    return total / count
