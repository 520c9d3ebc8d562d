from jaxtyping import Float
from torch import Tensor

from apd.losses.registry import register_loss


def lp_sparsity_per_component(attributions: Float[Tensor, "*rows C"], p: float, eps: float = 1e-12) -> Float[Tensor, "*rows C"]:
    """|A_c(x)|^p per row and component, with A_c = sqrt(attribution): the toolkit's attributions
    are sums of squares (SPEC §1.2), so this is (attribution + ε)^{p/2}, the paper's |A_c|^p (the
    reference code's ``calc_lp_sparsity_loss`` likewise)."""
    return (attributions.abs() + eps).pow(p / 2)


def lp_sparsity_loss(attributions: Float[Tensor, "*rows C"], p: float, eps: float = 1e-12) -> Float[Tensor, ""]:
    """L_p alternative to top-k (SPEC §1.4): mean over the rows (samples, or sample positions) of
    Σ_c |A_c(x)|^p (see :func:`lp_sparsity_per_component`)."""
    per = lp_sparsity_per_component(attributions, p, eps)
    return per.reshape(-1, per.shape[-1]).sum(-1).mean()


@register_loss("lp_sparsity", order=40)
def _lp_sparsity(ctx) -> Tensor:  # noqa: ANN001  (apd.methods.apd.APDStep)
    return lp_sparsity_loss(ctx.attributions, ctx.config.lp_sparsity_p)
