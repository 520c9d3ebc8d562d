"""Top-k and batch top-k selection of components from their attributions (SPEC §1.3)."""

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["topk_mask", "with_best_samples"]


def topk_mask(attributions: Float[Tensor, "B C"], k: float, batch_topk: bool = True) -> Float[Tensor, "B C"]:
    """{0, 1} mask of the selected (sample, component) pairs; no gradient flows through it.

    Per-sample top-k keeps the k largest attributions of each row (k a whole number). Batch top-k
    keeps the ⌊k·B⌋ largest over the whole batch (at least one), so k may be fractional: k = 1.28
    keeps 1.28 components per sample on average.
    """
    attr = attributions.detach()
    B, C = attr.shape
    if batch_topk:
        n = max(1, min(B * C, math.floor(k * B)))
        flat = attr.flatten()
        idx = flat.topk(n, sorted=False).indices
        return torch.zeros_like(flat).scatter(0, idx, 1.0).view(B, C)  # out of place: runs under vmap
    if not float(k).is_integer() or not 1 <= k <= C:
        raise ValueError(f"per-sample top-k needs a whole k in [1, C={C}], got {k}; use batch_topk for fractional k")
    idx = attr.topk(int(k), dim=1, sorted=False).indices
    return torch.zeros_like(attr).scatter(1, idx, 1.0)


def with_best_samples(mask: Float[Tensor, "B C"], attributions: Float[Tensor, "B C"], n: int) -> Float[Tensor, "B C"]:
    """``mask`` with each component also selected on the ``n`` samples where its attribution is largest.

    A component that top-k never selects gets no minimality gradient and cannot take over part of
    another component's work; switched on where it matters most, it can (``APDConfig.min_active``).
    """
    if n <= 0:
        return mask
    idx = attributions.detach().topk(min(n, attributions.shape[0]), dim=0, sorted=False).indices  # (n, C)
    return mask.scatter(0, idx, 1.0)
