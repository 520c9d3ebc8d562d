from jaxtyping import Float
from torch import Tensor

from apd.config import OutputLoss
from apd.losses.distance import output_distance
from apd.losses.registry import register_loss


def minimality_loss(
    target_out: Float[Tensor, "B ..."], masked_out: Float[Tensor, "B ..."], kind: OutputLoss = OutputLoss.mse
) -> Float[Tensor, ""]:
    """L_min = D(f(x; θ*), f(x; Σ_c s_c P_c)) (SPEC §1.4): MSE over outputs, or KL(target ‖
    decomposed) for logits (``apd.losses.distance.output_distance``)."""
    return output_distance(target_out, masked_out, kind)


@register_loss("minimality", order=10)
def _minimality(ctx) -> Tensor:  # noqa: ANN001  (apd.methods.apd.APDStep)
    return minimality_loss(ctx.target_out, ctx.masked_out, ctx.config.output_loss)
