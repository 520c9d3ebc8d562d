"""Mechanisms from co-active parts: grouping subcomponents (or components) that fire together.

SPD's subcomponents are rank one and live in one matrix each; a mechanism of the network (the
identity of TMS + ID, a residual MLP's W_out as a whole, one feature's path through two layers) is a
group of them that are active on the same inputs. Binarise the activity of every unit on a set of
inputs (SPD: causal importance g > τ; APD: selected by top-k), then join units whose active inputs
overlap with Jaccard index ≥ ``threshold`` (0.9: they fire together at least nine times in ten),
transitively. Two units that always co-fire are one mechanism; a unit that fires on a few of
another's inputs is not.

The summary also reports the description length the SPD/VPD authors use to judge a grouping: per
input, Σ over its active groups of (log₂(K + 1) + α·rank), K the number of groups (a group's name or
the end of the list, then α bits per rank-one piece), in bits per input, for the units and for the
groups. It is measured, not minimised: a greedy merge that minimises it joins units that never
fire together (fewer groups make every name cheaper on every input; with 40 units each on its own
2.5% of the inputs it merged disjoint ones), which is not what a mechanism is.

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

__all__ = ["Mechanism", "find_mechanisms", "description_bits", "mechanisms_from_masks", "mechanism_summary"]


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
    active: Bool[Tensor, "N K"], groups: Sequence[Sequence[int]], pieces: Sequence[set], alpha: float = 1.0
) -> float:
    """Mean bits per input of the groups' activity: Σ_g n_g (log₂(K + 1) + α·rank_g) / N, n_g the
    inputs where group g fires and rank_g the size of its set of rank-one pieces ``pieces[g]``."""
    K = len(groups)
    if K == 0:
        return 0.0
    counts = torch.stack([active[:, list(g)].any(1) for g in groups], 1).sum(0).double()
    rank = torch.tensor([len(r) for r in pieces], dtype=torch.float64)
    return float((counts * (math.log2(K + 1) + alpha * rank)).sum() / active.shape[0])


def _jaccard_groups(active: Bool[Tensor, "N K"], alive: list[int], threshold: float) -> list[list[int]]:
    acts = active[:, alive].double()
    co = acts.T @ acts
    n = acts.sum(0)
    jaccard = co / (n[:, None] + n[None, :] - co).clamp_min(1)
    parent = list(range(len(alive)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in (jaccard >= threshold).triu(1).nonzero().tolist():
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(alive):
        groups.setdefault(root(i), []).append(k)
    return list(groups.values())


def find_mechanisms(active: Bool[Tensor, "N K"], threshold: float = 0.9) -> list[list[int]]:
    """Groups of the K units with activity ``active`` over N inputs: joined, transitively, where two
    units' active inputs have Jaccard index ≥ ``threshold``. Returns groups of unit indices, largest
    first; units never active are left out."""
    alive = active.any(0).nonzero().flatten().tolist()
    return _sorted(_jaccard_groups(active, alive, threshold))


def _sorted(groups: list[list[int]]) -> list[list[int]]:
    groups = [sorted(g) for g in groups]
    return sorted(groups, key=lambda g: (-len(g), g))


def mechanisms_from_masks(
    masks: Tensor | Mapping[str, Tensor], tau: float, tied: Mapping[str, str] | None = None, *,
    ranks: Mapping[str, int] | None = None, threshold: float = 0.9, alpha: float = 1.0,
) -> tuple[list[Mechanism], dict[str, float]]:  # fmt: skip
    """Mechanisms of a decomposition from its evaluation masks on some inputs.

    ``masks``: one [*rows, C] tensor (APD: each component one unit spanning every matrix, its rank
    Σ_l m_l from ``ranks`` {matrix: m}) or ``{layer use: [*rows, C]}`` (SPD: every subcomponent a
    unit; a tied second use shares its matrix's pieces, ``tied`` {use: matrix}). A unit is active on
    a row where its mask exceeds ``tau``. Returns the mechanisms (largest first) and a summary:
    the number of mechanisms, of live units, and the description bits per input before and after
    merging."""
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
    groups = find_mechanisms(active, threshold)
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
