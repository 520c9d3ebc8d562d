from jaxtyping import Float
from torch import Tensor

from apd.losses.distance import output_distance
from apd.losses.registry import register_loss


@register_loss("ci_masked_recon", order=25)
def ci_masked_recon_loss(ctx) -> Float[Tensor, ""]:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    """D(f(x | every layer masked with its causal importances g), f(x | W)) (SPEC §5.3, optional):
    the model the run is evaluated with, trained to reconstruct the target directly."""
    return output_distance(ctx.target_out, ctx.masked_out(ctx.ci), ctx.config.output_loss, ctx.valid)
