"""The loss registry: a loss term is one file that registers itself here.

A loss is a function of one training step's context (the method's ``StepContext``: the component
model, the batch, the masks and the forward passes the method ran) that returns a scalar, or None
when it does not apply at that step (APD's simplicity term during the unpenalised fine-tune). It is
registered under a name; a method lists the names of the losses it sums (``Method.loss_names``),
so a loss names no method. Its coefficient is the ``<name>_coeff`` field of the method's config (0
or None switches it off), and it is logged under its name. Adding a loss therefore takes one file
in ``apd/losses/`` (every module there is imported by the package), its name in the method's
``loss_names``, one config field and one test.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Loss", "LOSSES", "register_loss", "losses_for"]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[Any], Tensor | None]
    """step context -> the unweighted term (a scalar), or None when inactive at this step"""
    order: int
    """position in the total (ascending): fixes the summation order, so totals are reproducible"""
    captures: Callable[[Any], Sequence[str]] | None
    """config -> module-name patterns whose outputs the loss reads in the target and masked passes"""


LOSSES: dict[str, Loss] = {}


def register_loss(
    name: str, *, order: int = 100, captures: Callable[[Any], Sequence[str]] | None = None
) -> Callable[[Callable[[Any], Tensor | None]], Callable[[Any], Tensor | None]]:
    """Decorator: register ``fn(ctx) -> Tensor | None`` as the loss ``name`` (a duplicate name raises)."""

    def wrap(fn: Callable[[Any], Tensor | None]) -> Callable[[Any], Tensor | None]:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered (by {LOSSES[name].fn.__module__}); pick another name")
        LOSSES[name] = Loss(name, fn, order, captures)
        return fn

    return wrap


def losses_for(names: Sequence[str], config: Any) -> list[Loss]:
    """The registered losses ``names`` (a method's ``loss_names``) whose coefficient in ``config`` is
    non-zero, in summation order.

    Raises for a name no loss is registered under, and for a loss without a ``<name>_coeff`` field
    in the method's config."""
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"no loss is registered under {unknown}; registered losses are {sorted(LOSSES)}")
    out = []
    for loss in sorted((LOSSES[n] for n in dict.fromkeys(names)), key=lambda l: (l.order, l.name)):
        if not hasattr(config, f"{loss.name}_coeff"):
            raise TypeError(f"the loss {loss.name!r} is summed by {type(config).__name__}'s method but the config has no "
                            f"field {loss.name}_coeff; add one (float | None) to the config")  # fmt: skip
        if config.coefficient(loss.name) > 0:
            out.append(loss)
    return out
