"""Merging parallel components: one mechanism split over several components becomes one.

With spare components (C above the number of mechanisms) APD sometimes splits one mechanism evenly
over two components whose weights point the same way (TMS 40-10 at C = 80: 15 of 40 features,
each half the size, so ML2R ≈ 0.5 for them). Summing such components describes the same weights
with one component fewer. ``merge_parallel_`` finds groups of components whose weights, across all
decomposed matrices, have cosine similarity ≥ a threshold, moves each group's summed weight into its
largest member and zeroes the others (a zero component gets no gradient from any loss, so it stays
dead). ``APDConfig.merge_threshold`` does this once, at the start of the unpenalised fine-tune,
which then re-fits the merged components.
"""

from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["parallel_groups", "merge_parallel_", "merge_parallel_components"]


def _flat(weights: dict[str, Float[Tensor, "C d_out d_in"]]) -> Float[Tensor, "C D"]:
    return torch.cat([w.flatten(1) for w in weights.values()], dim=1)


def parallel_groups(weights: dict[str, Float[Tensor, "C d_out d_in"]], threshold: float) -> list[list[int]]:
    """Groups (of two or more) of components whose weights, concatenated over all matrices, have
    pairwise-to-the-largest cosine ≥ ``threshold``; each group lists its largest member first.

    Greedy: components are visited from the largest norm down; each unassigned one collects every
    smaller unassigned component parallel to it. Components with zero weight are never grouped.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a cosine threshold must lie in (0, 1]")
    flat = _flat(weights).double()
    norms = flat.norm(dim=1)
    alive = norms > 1e-12 * norms.max().clamp_min(1e-300)
    unit = flat / norms.clamp_min(1e-300)[:, None]
    cos = unit @ unit.T
    order = torch.argsort(norms, descending=True).tolist()
    taken: set[int] = set()
    groups = []
    for c in order:
        if c in taken or not alive[c]:
            continue
        members = [c] + [d for d in order if d != c and d not in taken and alive[d] and cos[c, d] >= threshold]
        taken.update(members)
        if len(members) > 1:
            groups.append(members)
    return groups


@torch.no_grad()
def merge_parallel_(
    A: dict[str, Float[Tensor, "C m d_in"]],
    B: dict[str, Float[Tensor, "C d_out m"]],
    threshold: float,
    optimizer_states: Iterable[tuple[Tensor, dict]] = (),
) -> list[list[int]]:
    """Merge parallel components in place (see the module docstring); returns the merged groups.

    In each matrix the keeper's ``B`` is rescaled so that its weight is the least-squares fit of the
    group's summed weight along the keeper's own weight (exact when the members are exactly
    parallel); the other members' ``A`` and ``B`` are set to zero. ``optimizer_states`` pairs each
    parameter tensor with its optimiser state (``opt.state[p]``): state tensors of the parameter's
    shape (Adam's moments) are zeroed for the dropped components, so momentum does not revive them.
    """
    weights = {n: torch.einsum("com,cmi->coi", B[n], A[n]) for n in A}
    groups = parallel_groups(weights, threshold)
    if not groups:
        return groups
    for n, w in weights.items():
        for keep, *drop in groups:
            total = w[[keep, *drop]].sum(0)
            own = w[keep]
            denom = (own * own).sum()
            if denom > 0:
                B[n][keep] *= (total * own).sum() / denom
    dropped = [c for _, *drop in groups for c in drop]
    for n in A:
        A[n][dropped] = 0
        B[n][dropped] = 0
    for param, state in optimizer_states:
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value[dropped] = 0
    return groups


def merge_parallel_components(cm, opt: torch.optim.Optimizer | None, threshold: float) -> list[list[int]]:  # noqa: ANN001
    """:func:`merge_parallel_` on a ``ComponentModel``'s factors (and their optimiser state)."""
    A = {n: cm.layers[n].A.data for n in cm.matrix_names}
    B = {n: cm.layers[n].B.data for n in cm.matrix_names}
    states = [] if opt is None else [(p.data, opt.state[p]) for p in cm.component_parameters() if p in opt.state]
    return merge_parallel_(A, B, threshold, states)
