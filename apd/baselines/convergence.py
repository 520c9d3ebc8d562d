"""When a baseline has finished training: a held-out metric's curve flat over the last part of training.

The trainer (:func:`apd.baselines.train_sae` with ``eval_every``) records a metric (loss recovered
on a language model, FVU by default) on one fixed held-out batch every N steps. The curve counts as
**converged** when, over its last ``window`` fraction of training (the points at steps ≥ (1 −
window) · last step), the change the least-squares line through those points predicts across the
window, ``|slope| · window · last step``, is below ``tol``.

Why a fitted line and not the difference of the window's end points: the points scatter (the batch
is fixed but the SAE moves step to step, and resampling or a sparsity warm-up jolts it), and one
lucky end point would decide a two-point difference; the fit uses every point of the window. Why 0.005 absolute loss recovered as the default for the comparison: the
conclusions drawn from the language-model table rest on gaps of 0.01 and more (e.g. APD 0.958 against
the best SAEs' 0.94–0.96), so a curve still moving by less than 0.005 per 20% of its training
cannot turn them; a stricter tolerance costs steps that the 2-core budget does not have.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["ConvergenceRule", "window_change"]


def window_change(
    steps: Float[Tensor, " n"] | list[float], values: Float[Tensor, " n"] | list[float], window: float = 0.2,
    min_points: int = 3,
) -> float:  # fmt: skip
    """The change over the last ``window`` of training that the least-squares line through the curve's
    points there predicts: slope · window · last step (signed; NaN with fewer than ``min_points``
    points in the window)."""
    s = torch.as_tensor(steps, dtype=torch.float64)
    v = torch.as_tensor(values, dtype=torch.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps {tuple(s.shape)} and values {tuple(v.shape)} must be two 1-D sequences of equal length")
    if not 0 < window <= 1:
        raise ValueError(f"window={window} must lie in (0, 1] (a fraction of training, e.g. 0.2)")
    if s.numel() == 0:
        return math.nan
    last = float(s.max())
    inside = s >= (1 - window) * last
    if int(inside.sum()) < min_points:
        return math.nan
    x, y = s[inside], v[inside]
    x = x - x.mean()
    denom = float((x * x).sum())
    if denom == 0:
        return math.nan
    slope = float((x * (y - y.mean())).sum()) / denom
    return slope * window * last


@dataclass(frozen=True)
class ConvergenceRule:
    """Converged = ``|window_change(steps, values, window)| < tol`` with at least ``min_points`` points
    in the window (fewer: not converged, the curve is too short to tell)."""

    window: float = 0.2
    """the last fraction of training whose flatness is judged"""
    tol: float = 0.005
    """largest change over the window still called flat, in the metric's units"""
    min_points: int = 5
    """evaluation points the window must hold"""

    def __post_init__(self) -> None:
        if not 0 < self.window <= 1:
            raise ValueError(f"window={self.window} must lie in (0, 1] (a fraction of training, e.g. 0.2)")
        if not self.tol > 0:
            raise ValueError(f"tol={self.tol} must be > 0 (e.g. 0.005 loss recovered)")
        if self.min_points < 2:
            raise ValueError(f"min_points={self.min_points} must be >= 2: a line needs two points")

    def change(self, steps: Tensor | list[float], values: Tensor | list[float]) -> float:
        return window_change(steps, values, self.window, self.min_points)

    def converged(self, steps: Tensor | list[float], values: Tensor | list[float]) -> bool:
        change = self.change(steps, values)
        return not math.isnan(change) and abs(change) < self.tol
