from jaxtyping import Float
from torch import Tensor

from apd.losses.distance import output_distance
from apd.losses.registry import register_loss


@register_loss("stochastic_recon", order=10)
def stochastic_recon_loss(ctx) -> Float[Tensor, ""]:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    """(1/S) Σ_s D(f(x | every matrix W'(m_s)), f(x | W)) with stochastic masks m = g + (1 − g)·r
    (SPEC §5.3): every decomposed layer masked at once (and each Δ-component under its own r_Δ); with
    ``layer_routing=uniform_k_subset`` only a random subset of the layers per input (``SPDStep.routed_masks``)."""
    routed = ctx.config.layer_routing.value == "uniform_k_subset"
    total = None
    for _ in range(ctx.config.n_mask_samples):
        masks, deltas = ctx.routed_masks() if routed else ctx.stochastic_masks()
        d = output_distance(ctx.target_out, ctx.masked_out(masks, deltas), ctx.config.output_loss, ctx.valid)
        total = d if total is None else total + d
    return total / ctx.config.n_mask_samples
