import torch
from jaxtyping import Float
from torch import Tensor

from apd.losses.registry import register_loss


def faithfulness_loss(
    target_weights: dict[str, Float[Tensor, "d_out d_in"]],
    summed_component_weights: dict[str, Float[Tensor, "d_out d_in"]],
) -> Float[Tensor, ""]:
    """L_faith = (1/N) Σ_l ‖W_l - Σ_c P_{c,l}‖²_F, N = number of decomposed weights.

    Takes Σ_c P_{c,l} already summed (``ComponentModel.summed_weights``: one matmul, no [C, d_out,
    d_in] tensor).
    """
    total = sum(((w - summed_component_weights[n]) ** 2).sum() for n, w in target_weights.items())
    n_weights = sum(w.numel() for w in target_weights.values())
    return torch.as_tensor(total) / n_weights


@register_loss("faithfulness", order=0)
def _faithfulness(ctx) -> Tensor:  # noqa: ANN001  (a method's step context with .cm)
    return faithfulness_loss(ctx.cm.target_weights(), ctx.cm.summed_weights())
