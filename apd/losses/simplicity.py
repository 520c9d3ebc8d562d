from jaxtyping import Float
from torch import Tensor

from apd.losses.registry import register_loss


def simplicity_loss(
    A: dict[str, Float[Tensor, "C m d_in"]],
    B: dict[str, Float[Tensor, "C d_out m"]],
    mask: Float[Tensor, "*rows C"],
    p: float,
    n_weights: int,
    eps: float = 1e-12,
) -> Float[Tensor, ""]:
    """Schatten-p proxy over active components (SPEC §1.4):

    L_simp = (1/(N·rows)) Σ_b Σ_c s_c(x_b) Σ_l Σ_m (‖A_{c,l,m}‖² ‖B_{c,l,m}‖² + ε)^{p/2},

    rows = the samples of the batch, or its (sample, position) pairs for sequences.
    """
    per_component = 0
    for name, a in A.items():
        sq = a.pow(2).sum(-1) * B[name].pow(2).sum(-2)  # (C, m): ‖A_{c,m}‖² ‖B_{c,m}‖²
        per_component = per_component + (sq + eps).pow(p / 2).sum(-1)  # (C,)
    rows = mask.reshape(-1, mask.shape[-1])
    return (rows * per_component).sum() / (n_weights * rows.shape[0])


@register_loss("simplicity", order=20)
def _simplicity(ctx) -> Tensor | None:  # noqa: ANN001  (apd.methods.apd.APDStep)
    if ctx.finetune:  # the unpenalised fine-tune
        return None
    cm = ctx.cm
    A = {n: cm.layers[n].A for n in cm.matrix_names}
    B = {n: cm.layers[n].B for n in cm.matrix_names}
    return simplicity_loss(A, B, ctx.simplicity_weights, ctx.config.schatten_p, cm.n_weights(), ctx.config.schatten_eps)
