import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from apd.config import OutputLoss
from apd.model_io import masked_mean


def output_distance(
    target_out: Float[Tensor, "B ..."], out: Float[Tensor, "B ..."], kind: OutputLoss = OutputLoss.mse,
    valid: Tensor | None = None,
) -> Float[Tensor, ""]:
    """D(f(x; θ*), f'(x)): MSE over outputs, or KL(target ‖ other) for logits.

    MSE is the mean over every output element; KL sums over the last (class) dimension and
    averages over the rest (batch, positions). ``valid`` [B, T] (0/1, a dict batch's attention mask)
    restricts both means to the valid positions.
    """
    if target_out.shape != out.shape:
        raise ValueError(f"output shapes differ: target {tuple(target_out.shape)} vs decomposed {tuple(out.shape)}")
    dtype = torch.promote_types(torch.promote_types(target_out.dtype, out.dtype), torch.float32)
    target_out, out = target_out.to(dtype), out.to(dtype)  # at least float32 (a precision=bf16 step's bfloat16 outputs)
    if OutputLoss(kind) is OutputLoss.mse:
        return masked_mean((target_out - out).pow(2), valid)
    log_p = F.log_softmax(target_out, dim=-1)
    log_q = F.log_softmax(out, dim=-1)
    return masked_mean((log_p.exp() * (log_p - log_q)).sum(-1), valid)
