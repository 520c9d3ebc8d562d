import torch
from jaxtyping import Float
from torch import Tensor

from apd.config import FaithfulnessNorm
from apd.losses.registry import register_loss
from apd.precision import full_precision


def faithfulness_loss(
    target_weights: dict[str, Float[Tensor, "d_out d_in"]],
    summed_component_weights: dict[str, Float[Tensor, "d_out d_in"]],
    norm: FaithfulnessNorm = FaithfulnessNorm.entries,
) -> Float[Tensor, ""]:
    """L_faith = (1/N) Σ_l ‖W_l - Σ_c P_{c,l}‖²_F, N = number of decomposed weights (``norm=entries``),
    or (1/L) Σ_l ‖W_l - Σ_c P_{c,l}‖²_F / ‖W_l‖²_F over the L matrices (``norm=relative``; a zero
    matrix counts its squared distance alone).

    Takes Σ_c P_{c,l} already summed (``ComponentModel.summed_weights``: one matmul, no [C, d_out,
    d_in] tensor).
    """
    sq = {n: ((w - summed_component_weights[n]) ** 2).sum() for n, w in target_weights.items()}
    if FaithfulnessNorm(norm) is FaithfulnessNorm.relative:
        scale = {n: (w**2).sum() for n, w in target_weights.items()}
        return sum(v / torch.where(scale[n] > 0, scale[n], torch.ones_like(scale[n])) for n, v in sq.items()) / len(sq)
    n_weights = sum(w.numel() for w in target_weights.values())
    return torch.as_tensor(sum(sq.values())) / n_weights


@register_loss("faithfulness", order=0)
def _faithfulness(ctx) -> Tensor:  # noqa: ANN001  (a method's step context with .cm)
    # float32 in a bf16 step: Σ_c P_c rounded to bfloat16 is 2^-8 off W at best, noise a large coefficient would chase
    with full_precision():
        norm = getattr(ctx.config, "faithfulness_norm", FaithfulnessNorm.entries)  # APD: entries
        return faithfulness_loss(ctx.cm.target_weights(), ctx.cm.summed_weights(), norm)
