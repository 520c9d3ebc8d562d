"""The method interface: what a decomposition method supplies to the one training loop.

A method (APD, SPD) owns a config dataclass (a ``MethodConfig``), builds the component model it
trains (components and, for SPD, learned causal-importance functions), runs one step's forward
computation into a step context from which its registered losses are read (``apd.losses``), says
which masks it evaluates with, and may adjust parameters around the optimiser step (APD's unit-norm
A, its merge at the fine-tune start). ``apd.train`` runs any method, for one seed or many vmapped
seeds, with one checkpoint format; what a method saves is its component model's trainable tensors
(``ComponentModel.trainable_parameters``) and its config.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.component_model import ComponentModel, Masks
from apd.config import MethodConfig
from apd.losses import Loss, losses_for
from apd.optim import lr_at_step

__all__ = ["Method", "StepContext", "Factors", "InstanceView"]


@dataclass
class StepContext:
    """What every method's step context holds; a method's own subclass adds its forward passes."""

    cm: ComponentModel
    x: Tensor
    config: MethodConfig
    step: int

    def metrics(self) -> dict[str, Tensor]:
        """Logged numbers that are not loss terms (e.g. L0)."""
        return {}


@dataclass
class Factors:
    """The component factors being trained, per decomposed matrix: A [C, m, d_in] and B [C, d_out, m],
    with a leading instance dimension when several seeds are trained at once (vmapped)."""

    A: dict[str, Tensor]
    B: dict[str, Tensor]


@dataclass
class InstanceView:
    """One trained instance's factors (views into the stacked ones when seeds are vmapped), and
    each trained tensor of it paired with its optimiser state (``opt.state[p]``, views likewise)."""

    A: dict[str, Tensor]
    B: dict[str, Tensor]
    optimizer_states: list[tuple[Tensor, dict[str, Any]]]


class Method(ABC):
    """A decomposition method; see the module docstring. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    eval_mask_name: ClassVar[str] = "eval"
    """what the evaluation masks are called in metrics (``<name>_recon_mse``)"""

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.losses: list[Loss] = losses_for(self.name, config)
        self._compiled = None

    # ----------------------------------------------------------------- building
    @abstractmethod
    def build(self, target: nn.Module, modules: Sequence[str], *, tied: Mapping[str, str] | None = None,
              seed: int | None = None) -> ComponentModel:  # fmt: skip
        """The component model of ``target`` (initialised from ``seed``, default ``config.seed``)."""

    def prepare(self, cm: ComponentModel) -> None:
        """Adjust a freshly built component model before training (default: nothing)."""

    def warmup(self, factors: Factors, target_weights: Mapping[str, Tensor]) -> None:
        """Train the factors before step 0 of a fresh run (default: nothing; SPD's faithfulness
        warm-up). Runs again if a run is killed before its first checkpoint: it must be deterministic."""

    def capture_names(self, cm: ComponentModel) -> list[str]:
        """Modules whose outputs the active losses read (their ``captures`` patterns, resolved)."""
        import fnmatch

        from apd.component_model import ModuleSelectionError

        names = [n for n, _ in cm.model.named_modules() if n]
        chosen: list[str] = []
        for loss in self.losses:
            for pattern in loss.captures(self.config) if loss.captures is not None else ():
                hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise ModuleSelectionError(f"{loss.name}: module pattern {pattern!r} matches no module; modules are {names}")
                chosen += [h for h in hits if h not in chosen]
        return chosen

    # ----------------------------------------------------------------- one step
    @abstractmethod
    def step_context(self, cm: ComponentModel, x: Tensor, step: int, capture: Sequence[str] = ()) -> StepContext:
        """The step's forward computation (what the losses read)."""

    def loss_terms(self, cm: ComponentModel, x: Tensor, step: int, capture: Sequence[str] = ()) -> dict[str, Tensor]:
        """``{"total": Σ coefficient·term, <loss name>: term, ..., <metric>: value}`` for one step."""
        ctx = self.step_context(cm, x, step, capture)
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        for loss in self.losses:
            value = loss.fn(ctx)
            if value is None:
                continue
            terms[loss.name] = value
            weighted = self.config.coefficient(loss.name) * value
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"every loss of {self.name} is switched off at step {step} (coefficients 0 or None); "
                             "give at least one a positive coefficient")  # fmt: skip
        return {"total": total, **terms, **ctx.metrics()}

    def compiled_loss_terms(self):  # noqa: ANN201
        """``loss_terms`` through ``torch.compile`` (compiled once per method object)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.loss_terms)
        return self._compiled

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (warm-up then the configured schedule)."""
        c = self.config
        return lr_at_step(step, c.steps, c.lr, c.lr_schedule, c.warmup_frac)

    def on_step_start(self, step: int, instances: Callable[[], list[InstanceView]]) -> None:
        """Called before a step's forward pass; ``instances()`` gives every instance's tensors (built
        only when called: most steps need none). Default: nothing."""

    def after_backward(self, factors: Factors) -> None:
        """Adjust gradients before clipping and the update (default: nothing)."""

    def after_step(self, factors: Factors) -> None:
        """Adjust parameters after the update (default: nothing)."""

    # ----------------------------------------------------------------- evaluation
    @abstractmethod
    def eval_masks(self, cm: ComponentModel, x: Tensor) -> Masks:
        """The masks the method evaluates with on ``x`` (APD: top-k; SPD: causal importances)."""

    def active_threshold(self) -> float:
        """A component counts as active on an input where its evaluation mask exceeds this (binary masks: 0.5)."""
        return 0.5

    def mask_l0(self, masks: Masks) -> dict[str, float]:
        """L0 of evaluation masks: mean number of active components per row (sample or position);
        per module too when the masks are per module (``l0/<module>``), and their sum as ``l0``."""
        if isinstance(masks, Tensor):
            return {"l0": (masks > 0).float().sum(-1).mean().item()}
        per = {f"l0/{n}": (m > 0).float().sum(-1).mean().item() for n, m in masks.items()}
        return {"l0": sum(per.values()), **per}

    def eval_metrics(self, cm: ComponentModel, x: Tensor, masks: Masks, target_out: Tensor) -> dict[str, Any]:
        """Method-specific numbers of a finished run on evaluation inputs (default: none)."""
        return {}

    def run_warnings(self, metrics: Mapping[str, Any]) -> list[str]:
        """Warnings about a finished run, from its metrics (default: none)."""
        return []

    # ----------------------------------------------------------------- units (for tools that list them: the browser)
    units_span_matrices: ClassVar[bool] = False
    """True when one unit spans every decomposed matrix (APD's component c: P_c in each), False when
    each matrix has its own units (SPD's subcomponents); the eval masks are then one tensor, or one per matrix."""
    unit_noun: ClassVar[str] = "component"
    """what one unit is called ("component", "subcomponent")"""
    unit_score_noun: ClassVar[str] = "score"
    """what ``unit_scores`` are called ("attribution", "causal importance")"""

    def unit_scores(self, cm: ComponentModel, x: Tensor) -> Masks:
        """What the evaluation masks select units by on ``x``, shaped like ``eval_masks`` (default: the
        masks themselves, e.g. SPD's causal importances)."""
        return self.eval_masks(cm, x)

    def unit_selection(self) -> str:
        """How the evaluation masks select units, in words (for the browser's family descriptions)."""
        return f"evaluation mask above {self.active_threshold():g}"
