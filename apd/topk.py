"""Top-k and batch top-k selection of components from their attributions (SPEC §1.3).

Attributions are [B, C] or, for sequences, [B, *pos, C]: selection is per position, and batch
top-k pools every (sample, position) of the batch.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["topk_mask", "with_best_samples"]


def topk_mask(attributions: Float[Tensor, "B *pos C"], k: float, batch_topk: bool = True) -> Float[Tensor, "B *pos C"]:
    """{0, 1} mask of the selected (position, component) pairs; no gradient flows through it.

    Per-sample top-k keeps the k largest attributions of each row (each sample, or each position of
    a sequence; k a whole number). Batch top-k keeps the ⌊k·N⌋ largest over the whole batch of N
    rows (N = B, or B·T for sequences; at least one), so k may be fractional: k = 1.28 keeps 1.28
    components per row on average.
    """
    attr = attributions.detach()
    C = attr.shape[-1]
    rows = attr.reshape(-1, C)
    N = rows.shape[0]
    if batch_topk:
        n = max(1, min(N * C, math.floor(k * N)))
        flat = rows.flatten()
        idx = flat.topk(n, sorted=False).indices
        return torch.zeros_like(flat).scatter(0, idx, 1.0).view(attr.shape)  # out of place: runs under vmap
    if not float(k).is_integer() or not 1 <= k <= C:
        raise ValueError(f"per-sample top-k needs a whole k in [1, C={C}], got {k}; use batch_topk for fractional k")
    idx = rows.topk(int(k), dim=1, sorted=False).indices
    return torch.zeros_like(rows).scatter(1, idx, 1.0).view(attr.shape)


def with_best_samples(mask: Float[Tensor, "B *pos C"], attributions: Float[Tensor, "B *pos C"], n: int) -> Float[Tensor, "B *pos C"]:
    """``mask`` with each component also selected on the ``n`` rows (samples, or positions of a
    sequence) of the batch where its attribution is largest.

    A component that top-k never selects gets no minimality gradient and cannot take over part of
    another component's work; switched on where it matters most, it can (``APDConfig.min_active``).
    """
    if n <= 0:
        return mask
    C = attributions.shape[-1]
    rows = attributions.detach().reshape(-1, C)
    idx = rows.topk(min(n, rows.shape[0]), dim=0, sorted=False).indices  # (n, C)
    return mask.reshape(-1, C).scatter(0, idx, 1.0).view(mask.shape)
