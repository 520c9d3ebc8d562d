"""Ground-truth recovery metrics for a set of learned directions (SPEC §3.1, §4).

Everything here compares ``learned`` directions (APD component columns, SAE decoder rows, ...)
with ``truth`` directions (e.g. the columns of a TMS embedding) by cosine similarity. The functions
are shared by the APD and SAE evaluations so both are scored on exactly the same axes.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "cosine_matrix",
    "max_cosines",
    "hungarian_match",
    "represented_features",
    "all_recovered",
    "RecoveryScores",
    "recovery_scores",
]


def cosine_matrix(
    truth: Float[Tensor, "n d"], learned: Float[Tensor, "k d"], eps: float = 1e-12
) -> Float[Tensor, "n k"]:
    """Cosine similarity of every truth direction with every learned direction (0 for zero vectors)."""
    if truth.shape[-1] != learned.shape[-1]:
        raise ValueError(
            f"truth directions have dimension {truth.shape[-1]} but learned ones have "
            f"{learned.shape[-1]}; pass both as [count, dim] with the same dim"
        )
    t = truth / truth.norm(dim=-1, keepdim=True).clamp_min(eps)
    lrn = learned / learned.norm(dim=-1, keepdim=True).clamp_min(eps)
    return t @ lrn.T


def max_cosines(cos: Float[Tensor, "n k"]) -> tuple[Float[Tensor, " n"], Tensor]:
    """Best cosine of each row and the column that attains it."""
    return cos.max(dim=1)


def hungarian_match(cos: Float[Tensor, "n k"]) -> tuple[Tensor, Float[Tensor, " n"]]:
    """One-to-one assignment of rows to distinct columns maximising the summed cosine.

    Returns (column index per row, matched cosine per row); rows left unmatched (more rows than
    columns) get index -1 and cosine 0.
    """
    rows, cols = linear_sum_assignment(cos.detach().cpu().double().numpy(), maximize=True)
    match = torch.full((cos.shape[0],), -1, dtype=torch.long)
    match[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    matched = torch.zeros(cos.shape[0], dtype=cos.dtype)
    ok = match >= 0
    matched[ok] = cos.detach().cpu()[ok.nonzero().squeeze(-1), match[ok]]
    return match, matched


def represented_features(norms: Float[Tensor, " n"], represented_frac: float = 0.1) -> Bool[Tensor, " n"]:
    """Features whose ground-truth norm is at least ``represented_frac`` of the largest one's.

    A model in superposition may leave a feature out (TMS shrinks its column of W to almost
    nothing): such a feature has no mechanism to recover, and its direction is noise.
    """
    return norms >= represented_frac * norms.max()


def all_recovered(
    cos: Float[Tensor, "n k"], truth_norms: Float[Tensor, " n"], tau: float = 0.99, represented_frac: float = 0.1
) -> bool:
    """The success criterion of SPEC §3.1: every represented feature (:func:`represented_features`)
    is matched one-to-one (a Hungarian matching of the represented features to distinct learned
    directions) with cosine ≥ ``tau``. ``cos[j, c]``: feature j's cosine with learned direction c."""
    _, matched = hungarian_match(cos[represented_features(truth_norms, represented_frac)])
    return bool((matched >= tau).all())


@dataclass(frozen=True)
class RecoveryScores:
    """How well ``learned`` directions recover ``truth`` directions."""

    mmcs: float  # mean over truth of the best cosine with any learned direction
    mmcs_learned: float  # mean over live learned directions of the best cosine with any truth
    matched_mean_cos: float  # mean cosine of the one-to-one (Hungarian) matching
    n_recovered: dict[float, int]  # tau -> #truth directions with best cosine >= tau
    n_recovered_matched: dict[float, int]  # tau -> #truth directions matched one-to-one with cos >= tau
    best_cos: Tensor  # [n] best cosine per truth direction
    best_index: Tensor  # [n] learned index attaining it
    matched_index: Tensor  # [n] Hungarian-matched learned index (-1 if none)
    matched_cos: Tensor  # [n] cosine of that match


def recovery_scores(
    truth: Float[Tensor, "n d"],
    learned: Float[Tensor, "k d"],
    taus: tuple[float, ...] = (0.9, 0.99),
    live: Tensor | None = None,
) -> RecoveryScores:
    """Score ``learned`` against ``truth`` (SPEC §3.1): MMCS both ways, Hungarian matching, R_tau.

    ``live`` (bool [k]) marks the learned directions counted by ``mmcs_learned`` (dead latents or
    components would otherwise drag it down); all non-zero directions by default.
    """
    cos = cosine_matrix(truth.detach().float(), learned.detach().float())
    best_cos, best_index = max_cosines(cos)
    match, matched = hungarian_match(cos)
    if live is None:
        live = learned.detach().norm(dim=-1) > 0
    mmcs_learned = cos[:, live].max(dim=0).values.mean().item() if live.any() else 0.0
    return RecoveryScores(
        mmcs=best_cos.mean().item(),
        mmcs_learned=mmcs_learned,
        matched_mean_cos=matched.mean().item(),
        n_recovered={t: int((best_cos >= t).sum()) for t in taus},
        n_recovered_matched={t: int((matched >= t).sum()) for t in taus},
        best_cos=best_cos,
        best_index=best_index,
        matched_index=match,
        matched_cos=matched,
    )
