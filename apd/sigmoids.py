"""The squashing functions of SPD's causal importances (SPEC §5.2), and its stochastic masks.

A leaf module (torch only): ``apd.methods.spd`` re-exports every name here.

* :func:`lower_leaky_hard_sigmoid`: the masks' g; forward clamp(x, 0, 1), backward the identity on
  (0, 1], zero above 1, and α·grad at x <= 0 only where gradient descent would push x up (so a gate
  that closed can reopen).
* :func:`upper_leaky_hard_sigmoid`: the minimality loss's g⁺; clamp at 0 below, slope α above 1 (so
  values above 1 are still pushed down); its gradient on [0, 1] (both ends included) is the identity.
* :func:`leaky_hard_sigmoids`: both of one pre-activation from one autograd node (what an SPD step
  computes for every g), with exactly the values and gradients of the two separate functions.
* :func:`stochastic_mask`: m = g + (1 − g)·r.
"""

from typing import Any

import torch
from torch import Tensor

__all__ = ["lower_leaky_hard_sigmoid", "upper_leaky_hard_sigmoid", "leaky_hard_sigmoids", "stochastic_mask"]


def _lower_grad(x: Tensor, grad: Tensor, alpha: float) -> Tensor:
    """The lower-leaky hard sigmoid's backward: α·min(grad, 0) at x <= 0, grad on (0, 1], 0 above 1 (and at NaN)."""
    return torch.where(x <= 0, grad.clamp_max(0) * alpha, grad * (x <= 1))


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    """clamp(x, 0, 1); at x <= 0 the gradient passes (times α) only when it would raise the value."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        return x.clamp(0, 1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        x, alpha = inputs
        ctx.save_for_backward(x)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _lower_grad(x, grad, ctx.alpha), None


class _LeakyHardSigmoids(torch.autograd.Function):
    """(lower-leaky, upper-leaky) hard sigmoids of one pre-activation in one autograd node: the SPD
    step needs both of every g, and one fused backward makes fewer passes over the [tokens, C]
    tensors than the two separate ones. Values and gradients are exactly theirs everywhere, the
    region boundaries (x = 0, x = 1) and NaN included."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        lower = x.clamp(0, 1)
        return lower, torch.add(lower, (x - 1).clamp_min_(0), alpha=alpha)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: tuple[Tensor, Tensor]) -> None:
        x, alpha = inputs
        ctx.save_for_backward(x)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx: Any, grad_lower: Tensor, grad_upper: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # an unused output's gradient arrives as zeros (materialised)
        alpha = ctx.alpha
        # the sum of the two separate backwards: the lower one's (α·min(gl, 0) at x <= 0, gl on (0, 1],
        # 0 above 1 and at NaN) plus the upper one's (0 below 0 and at NaN, gu on [0, 1] with both ends
        # included, α·gu above 1); x = 0 thus gets the lower one's upward leak plus the whole gu.
        # Written with 0/1 masks in x's dtype, not torch.where or float·bool products (each of those
        # took ~3.6 ms on [2048, 512] floats against ~0.1-0.2 ms for a float product, one thread): the
        # same numbers exactly for finite gradients (a product with 1 or an added ±0 changes nothing)
        le0, le1, ge0, gt1 = ((x <= 0).to(x.dtype), (x <= 1).to(x.dtype), (x >= 0).to(x.dtype), (x > 1).to(x.dtype))
        lower = grad_lower * (le1 - le0) + grad_lower.clamp_max(0).mul_(alpha) * le0
        return lower.add_(grad_upper * ((ge0 - gt1) + alpha * gt1)), None


def lower_leaky_hard_sigmoid(x: Tensor, alpha: float = 0.01) -> Tensor:
    """The masks' squashing (SPEC §5.2): forward clamp(x, 0, 1); backward the identity inside
    (0, 1], zero above 1, and α·grad at x <= 0 only where gradient descent would push x up (so a
    gate that closed can reopen)."""
    return _LowerLeakyHardSigmoid.apply(x, alpha)  # type: ignore[no-any-return]


def upper_leaky_hard_sigmoid(x: Tensor, alpha: float = 0.01) -> Tensor:
    """The minimality loss's squashing: clamp at 0 below, slope α above 1 (so values above 1 are
    still pushed down)."""
    return torch.where(x > 1, 1 + alpha * (x - 1), x.clamp(0, 1))


def leaky_hard_sigmoids(x: Tensor, alpha: float = 0.01) -> tuple[Tensor, Tensor]:
    """(:func:`lower_leaky_hard_sigmoid`, :func:`upper_leaky_hard_sigmoid`) of ``x`` with one fused
    backward (what an SPD step computes for every layer): the same values and gradients, exactly."""
    return _LeakyHardSigmoids.apply(x, alpha)  # type: ignore[no-any-return]


def stochastic_mask(g: Tensor, r: Tensor) -> Tensor:
    """m = g + (1 − g)·r, computed as r + g·(1 − r) in one pass (and a two-pass backward)."""
    return torch.lerp(r, g.new_ones(()), g)
