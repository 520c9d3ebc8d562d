import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from apd.config import OutputLoss


def output_distance(
    target_out: Float[Tensor, "B ..."], out: Float[Tensor, "B ..."], kind: OutputLoss = OutputLoss.mse
) -> Float[Tensor, ""]:
    """D(f(x; θ*), f'(x)): MSE over outputs, or KL(target ‖ other) for logits.

    MSE is the mean over every output element; KL sums over the last (class) dimension and
    averages over the rest (batch, positions).
    """
    if target_out.shape != out.shape:
        raise ValueError(f"output shapes differ: target {tuple(target_out.shape)} vs decomposed {tuple(out.shape)}")
    if OutputLoss(kind) is OutputLoss.mse:
        return (target_out - out).pow(2).mean()
    log_p = F.log_softmax(target_out, dim=-1)
    log_q = F.log_softmax(out, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
