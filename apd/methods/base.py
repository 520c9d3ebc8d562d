"""The method interface: what a decomposition method supplies to the one training loop.

A method (APD, SPD) owns a config dataclass (a ``MethodConfig``), builds the component model it
trains (components and, for SPD, learned causal-importance functions), runs one step's forward
computation into a step context from which its registered losses are read (``apd.losses``), says
which masks it evaluates with, and may adjust parameters around the optimiser step (APD's unit-norm
A, its merge at the fine-tune start). ``apd.train`` runs any method, for one seed or many vmapped
seeds, with one checkpoint format; what a method saves is its component model's trainable tensors
(``ComponentModel.trainable_parameters``) and its config.

A method also owns everything outside training that depends on what its decomposition is: the
losses it sums (``loss_names``), its evaluation masks (``eval_masks``, ``unit_scores``,
``causal_importances``), its units for metrics, figures, comparisons and the browser (``units``,
``unit_noun``, ``mlp_units``), its sparsity knob and the one-line descriptions of its settings in
reports (``sparsity_knob``, ``settings_note``, ``preset_note``), and the rule for training several
seeds at once (``vectorised``). Code outside ``apd.methods`` asks the method (``method_for(config)``,
or the class in ``METHODS`` for a results row's ``method``) instead of branching on its name.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.component_model import ComponentModel, Masks
from apd.config import ConfigError, MethodConfig, OutputLoss
from apd.losses import Loss, losses_for
from apd.optim import lr_at_step

__all__ = ["Method", "StepContext", "Factors", "InstanceView", "Units", "MLPUnits", "VECTORISABLE_OPTIMIZERS"]

VECTORISABLE_OPTIMIZERS = ("adam", "adamw")
"""element-wise optimisers: stacking instances along a new dimension leaves them independent"""


class Units(str, Enum):
    """What a method's decomposition is made of: the units that metrics, figures, comparisons and
    the browser count, match and draw."""

    shared = "shared"
    """each component c spans every decomposed matrix (APD): one unit per c with a part P_{c,l} in
    every matrix, one mask for all of them (a component may carry a whole mechanism, e.g. the
    identity of TMS + ID)"""
    per_matrix = "per_matrix"
    """each matrix has its own rank-one subcomponents (SPD): one unit per (matrix, c), masks per
    matrix (a mechanism is a group of co-active subcomponents across matrices)"""


@dataclass
class MLPUnits:
    """A decomposition's units in the MLPs of a residual MLP (SPEC §3.2, §5.5), as the metrics,
    figures and the comparison score them."""

    nc: Tensor
    """[U, n_features, d_mlp]: each unit's neuron contributions NC_u(i) on the neurons of every
    layer side by side (zero outside the unit's layer)"""
    layer: Tensor | None
    """[U]: the MLP (index into the pairs) each unit lies in; None when every unit spans all layers"""
    out_maps: dict[str, Tensor]
    """per W_in module: the W_out map [U_l, d_embed, d_mlp] through which each of its W_in parts
    (``component_weights[w_in]``, same order) writes (APD: the component's own W_out part; SPD: the
    whole decomposed W_out, Σ_c of its subcomponents)"""


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

    @property
    def valid(self) -> Tensor | None:
        """[B, T] 0/1: the positions every loss and metric averages over (a dict batch's
        ``attention_mask``, ``apd.model_io``); None when every position counts."""
        return self.cm.valid_positions(self.x)


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
    """A decomposition method; see the module docstring. Subclasses set ``name``, ``config_class``,
    ``loss_names``, ``units`` and ``sparsity_knob`` (and may override the other class attributes)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    loss_names: ClassVar[tuple[str, ...]]
    """the registered losses (``apd.losses``) this method sums, each weighted by its ``<name>_coeff``"""
    eval_mask_name: ClassVar[str] = "eval"
    """what the evaluation masks are called in metrics (``<name>_recon_mse``)"""
    units: ClassVar[Units]
    """what its decomposition is made of (:class:`Units`)"""
    unit_noun: ClassVar[str] = "component"
    """what one unit is called in reports and the browser ("component", "subcomponent")"""
    sparsity_knob: ClassVar[str]
    """the config field that sets how sparse its decompositions are (comparison rows' ``sparsity_knob``)"""
    key_settings: ClassVar[tuple[str, ...]] = ("C", "lr")
    """the config fields a report lists for a run (:meth:`key_settings_text`)"""

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if getattr(config, "output_loss", OutputLoss.mse) is None:  # unset, and no target config decided it
            config = replace(config, output_loss=OutputLoss.mse)  # type: ignore[call-arg]
        self.config = config
        self.losses: list[Loss] = losses_for(self.loss_names, config)
        self._compiled = None

    # ----------------------------------------------------------------- several seeds at once
    def vectorised(self) -> "Method":
        """The method to train several seeds with at once (stacked and vmapped), or a ConfigError
        naming what cannot be vmapped and the fix. The default refuses ``compile`` and optimisers
        that are not element-wise; a method adds its own rules (and may return a copy with a
        setting changed for vmap)."""
        config = self.config
        if config.compile:
            raise ConfigError("compile=True applies to single-seed runs; decompose_seeds vmaps the seeds instead: set compile=False")
        if config.optimizer not in VECTORISABLE_OPTIMIZERS:
            raise ConfigError(
                f"optimizer={config.optimizer!r} cannot train seeds side by side (it may couple the stacked instances "
                f"through norms or trust ratios); use one of {VECTORISABLE_OPTIMIZERS}, or train the seeds one at a "
                "time with decompose"
            )
        return self

    def _with(self, **changes: Any) -> "Method":
        """This method with ``changes`` to its config."""
        return type(self)(replace(self.config, **changes))  # type: ignore[call-arg]

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

    def training_state(self, cm: ComponentModel) -> dict[str, Tensor]:
        """State besides the trained tensors that a resumed run needs, saved in training checkpoints
        (default: none; SPD: the persistent adversarial sources of ``adversarial_recon``)."""
        return {}

    def load_training_state(self, cm: ComponentModel, state: Mapping[str, Tensor]) -> None:
        """Restore what ``training_state`` saved, on resuming (default: nothing)."""

    # ----------------------------------------------------------------- evaluation
    @abstractmethod
    def eval_masks(self, cm: ComponentModel, x: Tensor) -> Masks:
        """The masks the method evaluates with on ``x`` (APD: top-k; SPD: causal importances)."""

    def causal_importances(self, cm: ComponentModel, x: Tensor, *, upper_leaky: bool = False) -> dict[str, Tensor]:
        """Causal importances per layer use on ``x``, for a method that learns them (SPD); others raise."""
        raise ValueError(f"{self.name.upper()} learns no causal importances (they come from SPD); its evaluation masks "
                         f"are {type(self).__name__}.eval_masks(cm, x)")  # fmt: skip

    @property
    def units_span_matrices(self) -> bool:
        """Whether one unit spans every decomposed matrix (``units is Units.shared``: APD)."""
        return self.units is Units.shared

    def unit_scores(self, cm: ComponentModel, x: Tensor) -> Masks:
        """The graded per-unit scores on ``x`` that the evaluation masks select from (APD: the
        attributions top-k ranks; SPD: the causal importances), e.g. to pick each input's top unit;
        shaped like ``eval_masks`` (default: the masks themselves)."""
        return self.eval_masks(cm, x)

    def mlp_units(self, W_E: Tensor, component_weights: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]]) -> MLPUnits:
        """Its units in a residual MLP's (W_in, W_out) ``pairs`` from the component weights
        (:class:`MLPUnits`), with W_E [d_embed, n_features] the embedding."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its units of a residual MLP are")

    # ----------------------------------------------------------------- reports
    def key_settings_text(self) -> str:
        """``field=value, ...`` of its ``key_settings`` (an Enum by its value)."""
        c = self.config
        return ", ".join(f"{k}={getattr(getattr(c, k), 'value', getattr(c, k))}" for k in self.key_settings)

    def settings_note(self, C_per_module: Mapping[str, int]) -> str:
        """Its settings in a few words, for reports on a finished run (``C_per_module``: the run's)."""
        return f"components per matrix {dict(C_per_module)}, {self.config.steps} steps"

    def preset_note(self, steps: int, batch_size: int) -> str:
        """Its preset's settings for a report on runs trained with it (``steps`` of ``batch_size``)."""
        return f"{steps} steps, batch {batch_size}"

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

    def eval_metrics(self, cm: ComponentModel, x: Tensor, masks: Masks, target_out: Tensor, *,
                     valid: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
        """Method-specific numbers of a finished run on evaluation inputs (default: none); ``valid``
        [*lead] (0/1, a dict batch's attention mask) marks the positions that count."""
        return {}

    def run_warnings(self, metrics: Mapping[str, Any]) -> list[str]:
        """Warnings about a finished run, from its metrics (default: none)."""
        return []

    # ----------------------------------------------------------------- units (for tools that list them: the browser)
    unit_score_noun: ClassVar[str] = "score"
    """what ``unit_scores`` are called ("attribution", "causal importance")"""

    def unit_selection(self) -> str:
        """How the evaluation masks select units, in words (for the browser's family descriptions)."""
        return f"evaluation mask above {self.active_threshold():g}"
