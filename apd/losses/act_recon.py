from jaxtyping import Float
from torch import Tensor

from apd.losses.registry import register_loss


def act_recon_loss(target_acts: dict[str, Tensor], masked_acts: dict[str, Tensor]) -> Float[Tensor, ""]:
    """Mean over the named modules of the MSE between target and decomposed hidden activations."""
    if set(target_acts) != set(masked_acts) or not target_acts:
        raise ValueError(f"activation sets differ or are empty: {sorted(target_acts)} vs {sorted(masked_acts)}")
    losses = [(target_acts[n] - masked_acts[n]).pow(2).mean() for n in target_acts]
    return sum(losses) / len(losses)  # type: ignore[return-value]


@register_loss("act_recon", order=30, captures=lambda config: config.act_recon_modules)
def _act_recon(ctx) -> Tensor:  # noqa: ANN001  (apd.methods.apd.APDStep)
    return act_recon_loss(ctx.target_acts, ctx.masked_acts)
