"""Mechanisms from co-active parts: grouping subcomponents (or components) that fire together.

SPD's subcomponents are rank one and live in one matrix each; a mechanism of the network (the
identity of TMS + ID, a residual MLP's W_out as a whole, one feature's path through two layers) is a
group of them that are active on the same inputs. Binarise the activity of every unit on a set of
inputs (SPD: causal importance g > τ; APD: selected by top-k), then merge units greedily by the
description length the SPD/VPD authors use to judge a grouping: per input, Σ over its active groups
of (log₂(K + 1) + α·rank), K the number of groups (a group's name or the end of the list, then α
bits per rank-one piece), in bits per input. Joining two groups that fire together saves a name on
each shared input; the merged group pays its whole rank wherever either fired. Only groups that
fire together on at least half of the rarer one's inputs are candidates: otherwise the falling K
alone pays for joining rare units that never co-fire.

``find_mechanisms`` works on any binary activity matrix; ``mechanisms_from_masks`` turns a
method's evaluation masks into one (SPD: per layer use; APD: one mask shared by all matrices, so
each component is one unit already spanning every layer).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["ALPHA", "MAX_PAIRS", "MechanismSearchTooLarge", "Mechanism", "find_mechanisms", "description_bits", "mechanisms_from_masks", "mechanism_summary"]


ALPHA = 3.0
"""Default bits per rank-one piece. Measured on SPD runs of the toys: with 1 or 2 bits TMS 5-2 + ID
(K ≈ 12 units, ~3.6 bits a name) folds a feature into the identity, and at 1 all of it into one
group; at 3 it gives the identity as one rank-2 mechanism and each feature's W/Wᵀ pieces as one,
TMS 40-10 + ID the identity as one rank-10 mechanism and 40 rank-one features."""


MAX_PAIRS = 2_000_000
"""Default cap on the candidate pairs (units that fire together enough to merge) of one search: a
round costs O(pairs) and there are up to K rounds. Measured on 1000-step runs of ``spd_lm_4l``
(8,192 tokens, ~4,090 live subcomponents): L0 367 per token gave 0.79 M pairs (its evaluation,
mechanisms included, ~2 min); with the adversarial loss, L0 1,336 gave 4.8 M and the search ran
for over 5 minutes without ending. So dense a decomposition has no sparse mechanisms to find."""


class MechanismSearchTooLarge(ValueError):
    """More candidate pairs than ``max_pairs``: the greedy search would not end in useful time."""


@dataclass
class Mechanism:
    """A group of units that fire together: its members (``"layer:index"``), the matrices it
    spans, its rank (distinct rank-one pieces, a tied matrix's two uses counted once) and the
    fraction of inputs it is active on."""

    members: list[str]
    layers: list[str]
    rank: int
    frequency: float

    def to_dict(self) -> dict:
        return asdict(self)


def description_bits(
    active: Bool[Tensor, "N K"], groups: Sequence[Sequence[int]], pieces: Sequence[set], alpha: float = ALPHA
) -> float:
    """Mean bits per input of the groups' activity: Σ_g n_g (log₂(K + 1) + α·rank_g) / N, n_g the
    inputs where group g fires and rank_g the size of its set of rank-one pieces ``pieces[g]``."""
    K = len(groups)
    if K == 0:
        return 0.0
    counts = torch.stack([active[:, list(g)].any(1) for g in groups], 1).sum(0).double()
    rank = torch.tensor([len(r) for r in pieces], dtype=torch.float64)
    return float((counts * (math.log2(K + 1) + alpha * rank)).sum() / active.shape[0])


def find_mechanisms(
    active: Bool[Tensor, "N K"], pieces: Sequence[set] | None = None, *, alpha: float = ALPHA, min_overlap: float = 0.5,
    max_pairs: int | None = MAX_PAIRS,
) -> list[list[int]]:  # fmt: skip
    """Groups of the K units with activity ``active`` over N inputs, by a greedy merge that lowers the
    description length :func:`description_bits` (α bits per rank-one piece; ``pieces[k]`` is unit k's
    set of pieces, default one piece each). Each round joins the two groups whose merge saves the
    most bits, among the pairs that fire together on at least ``min_overlap`` of the rarer group's
    inputs; it stops when no such merge saves bits. Returns groups of unit indices, largest first;
    units never active are left out.

    The overlap condition keeps the merge from joining units that never fire together: without it,
    every merge makes each group's name cheaper on every input (K falls), which pays for joining two
    rare units that fire apart. Among overlapping units the bits decide: a unit that fires on a
    tenth of a frequent one's inputs stays apart (the merged group would carry its rank on the
    other nine tenths), the identity's two pieces that fire on 4 of 5 inputs each join.

    More than ``max_pairs`` candidate pairs (None: no cap) raises :class:`MechanismSearchTooLarge`
    before the search starts (:data:`MAX_PAIRS`)."""
    alive = active.any(0).nonzero().flatten().tolist()
    if not alive:
        return []
    pieces = [{k} for k in range(active.shape[1])] if pieces is None else list(pieces)
    universe = sorted(set().union(*(pieces[k] for k in alive)), key=repr)
    index = {p: i for i, p in enumerate(universe)}
    acts = active[:, alive].float()  # 0/1: float32 counts are exact up to 2^24 inputs
    inc = torch.zeros(len(alive), len(universe))  # group x piece incidence, 0/1 (exact counts)
    for g, k in enumerate(alive):
        inc[g, [index[p] for p in pieces[k]]] = 1.0
    groups: list[list[int]] = [[k] for k in alive]
    n = acts.sum(0).double()  # inputs where each group fires
    rank = inc.sum(1).double()  # pieces each group holds
    live = torch.ones(len(alive), dtype=torch.bool)  # merged-away groups stay in place, switched off
    # Only pairs that may merge are kept, as a list (i < j, co-firing inputs, shared pieces): a merge
    # changes the pairs of the merged group alone, so each round costs O(pairs + units), not O(units²).
    co = (acts.T @ acts).double()
    ok = (co >= min_overlap * torch.minimum(n[:, None], n[None, :])).triu(1)
    if max_pairs is not None and int(ok.sum()) > max_pairs:
        raise MechanismSearchTooLarge(
            f"{int(ok.sum()):,} pairs of the {len(alive):,} live units fire together on at least {min_overlap:g} of the "
            f"rarer one's inputs (cap max_pairs={max_pairs:,}): the activity is too dense for a greedy merge to end in "
            "useful time; lower L0 (a larger sparsity coefficient) or raise max_pairs"
        )  # fmt: skip
    pi, pj = ok.nonzero(as_tuple=True)
    pco = co[pi, pj]
    pshared = (inc @ inc.T)[pi, pj].double()
    del co, ok
    for K in range(len(alive), 1, -1):
        if not len(pi):
            break
        total = (n * live).sum()
        union_rank = rank[pi] + rank[pj] - pshared
        n_union = n[pi] + n[pj] - pco
        delta = (total - pco) * math.log2(K) - total * math.log2(K + 1)
        delta += alpha * (n_union * union_rank - n[pi] * rank[pi] - n[pj] * rank[pj])
        best = delta.min()
        if not best < -1e-9:
            break
        key = torch.where(delta == best, pi * len(alive) + pj, len(alive) ** 2)  # ties: first in row order
        i, j = divmod(int(key.min()), len(alive))
        acts[:, i] = torch.maximum(acts[:, i], acts[:, j])
        inc[i] = torch.maximum(inc[i], inc[j])
        groups[i] += groups[j]
        live[j] = False
        n[i], rank[i] = acts[:, i].sum().double(), inc[i].sum().double()
        keep = (pi != i) & (pj != i) & (pi != j) & (pj != j)
        col = (acts.T @ acts[:, i]).double()
        new = live & (col >= min_overlap * torch.minimum(n, n[i]))
        new[i] = False
        others = new.nonzero().flatten()
        ni = torch.full_like(others, i)
        lo, hi = torch.minimum(ni, others), torch.maximum(ni, others)
        pi, pj = torch.cat([pi[keep], lo]), torch.cat([pj[keep], hi])
        pco = torch.cat([pco[keep], col[others]])
        pshared = torch.cat([pshared[keep], (inc[others] @ inc[i]).double()])
    groups = [g for g, on in zip(groups, live.tolist()) if on]
    return _sorted(groups)


def _sorted(groups: list[list[int]]) -> list[list[int]]:
    groups = [sorted(g) for g in groups]
    return sorted(groups, key=lambda g: (-len(g), g))


def mechanisms_from_masks(
    masks: Tensor | Mapping[str, Tensor], tau: float, tied: Mapping[str, str] | None = None, *,
    ranks: Mapping[str, int] | None = None, alpha: float = ALPHA, min_overlap: float = 0.5, max_pairs: int | None = MAX_PAIRS,
) -> tuple[list[Mechanism], dict[str, float]]:  # fmt: skip
    """Mechanisms of a decomposition from its evaluation masks on some inputs.

    ``masks``: one [*rows, C] tensor (APD: each component one unit spanning every matrix, its rank
    Σ_l m_l from ``ranks`` {matrix: m}) or ``{layer use: [*rows, C]}`` (SPD: every subcomponent a
    unit; a tied second use shares its matrix's pieces, ``tied`` {use: matrix}). A unit is active on
    a row where its mask exceeds ``tau``. Returns the mechanisms (largest first) and a summary:
    the number of mechanisms, of live units, and the description bits per input before and after
    merging. Too dense an activity for the search raises :class:`MechanismSearchTooLarge`
    (``max_pairs``)."""
    tied = dict(tied or {})
    if isinstance(masks, Tensor):
        C = masks.shape[-1]
        active = (masks.reshape(-1, C) > tau).cpu()
        names = [f"component:{c}" for c in range(C)]
        pieces = [{(m, c, r) for m, rank in (ranks or {"all": 1}).items() for r in range(rank)} for c in range(C)]
        layer_of = ["all" if ranks is None else ",".join(ranks)] * C
    else:
        cols, names, pieces, layer_of = [], [], [], []
        for layer, g in masks.items():
            C = g.shape[-1]
            cols.append((g.reshape(-1, C) > tau).cpu())
            matrix = tied.get(layer, layer)
            names += [f"{layer}:{c}" for c in range(C)]
            pieces += [{(matrix, c)} for c in range(C)]
            layer_of += [layer] * C
        active = torch.cat(cols, 1)
    groups = find_mechanisms(active, pieces, alpha=alpha, min_overlap=min_overlap, max_pairs=max_pairs)
    mechs = []
    for g in groups:
        freq = float(active[:, g].any(1).float().mean())
        span = sorted({layer_of[k] for k in g}, key=layer_of.index)
        mechs.append(Mechanism(members=[names[k] for k in g], layers=span, rank=len(set().union(*(pieces[k] for k in g))),
                               frequency=freq))  # fmt: skip
    singles = [[k] for k in active.any(0).nonzero().flatten().tolist()]
    summary = {
        "n_mechanisms": float(len(groups)),
        "n_live_units": float(len(singles)),
        "mechanism_bits_unmerged": description_bits(active, singles, [pieces[g[0]] for g in singles], alpha),
        "mechanism_bits": description_bits(active, groups, [set().union(*(pieces[k] for k in g)) for g in groups], alpha),
    }
    return mechs, summary


def mechanism_summary(mechs: Sequence[Mechanism], limit: int = 50) -> list[dict]:
    """The largest ``limit`` mechanisms as JSON-ready dicts (metrics.json)."""
    return [m.to_dict() for m in mechs[:limit]]
