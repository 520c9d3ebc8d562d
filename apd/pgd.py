"""Adversarial masks by projected gradient ascent (VPD: "Interpreting Language Model Parameters", Goodfire 2026).

SPD's stochastic masks m = g + (1 − g)·r draw the sources r ∈ [0, 1] at random; VPD's adversary
chooses them to make the output distance D (KL to the target's logits, or MSE) as large as it can:
projected sign-gradient *ascent*, r ← clip(r + step_size · sign(∂D/∂r), 0, 1), with the causal
importances g held fixed. A subcomponent with g = 1 cannot be touched (m = 1 whatever r is); one
with g = 0 can be set anywhere in [0, 1], so a decomposition whose g understates what is needed is
found out by the adversary where a random r would only sometimes find it.

- :func:`ascend`: the ascent itself on given sources (training and evaluation share it).
- :class:`PersistentSources`: the training form's state (VPD's persistent PGD): sources per
  (batch row, position) of each layer use, kept from one step to the next so that a few ascent
  steps per training step accumulate into a strong adversary (``apd.losses.adversarial_recon``).
- :func:`attack_kl`: the evaluation attack: a fresh random start, ``n_steps`` steps of
  ``step_size`` (VPD: 20 of 0.1), one source per position shared across the batch's rows (the
  adversary must find a systematic defect, not per-sample noise); :func:`attack_ladder` runs it at
  20, 40, 80 and 160 steps.

When the decomposition has Δ-components (``delta_component``), each layer's Δ gets a source of its
own too (its importance is 0: m_Δ = r_Δ), as in the stochastic losses.
"""

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from apd.component_model import ComponentModel
from apd.config import OutputLoss
from apd.distributed import rand_rows
from apd.losses.distance import output_distance
from apd.sigmoids import stochastic_mask

if TYPE_CHECKING:
    from apd.decomposition import Decomposition

__all__ = ["AdversarialForm", "Sources", "adversarial_distance", "ascend", "PersistentSources", "attack_kl", "attack_ladder",
           "LADDER"]  # fmt: skip

LADDER = (20, 40, 80, 160)
"""VPD's attack ladder: the attack's steps (of 0.1 each)"""

Sources = dict[str, Tensor]
"""per layer use: the component sources [*lead, C] (or broadcastable to it), or the Δ sources [*lead]"""


class AdversarialForm(str, Enum):
    """Which layers one adversarial pass masks (``SPDConfig.adversarial_recon_form``)."""

    all_layers = "all_layers"  # every layer use masked at once, their sources ascended together
    layerwise = "layerwise"  # one layer use at a time (the others at their target weights), the mean over layers


def adversarial_distance(
    cm: ComponentModel, x: Tensor, target_out: Tensor, ci: Mapping[str, Float[Tensor, "*lead C"]], sources: Sources,
    delta_sources: Sources | None, kind: OutputLoss, inner_acts: Mapping[str, Tensor] | None = None,
) -> Float[Tensor, ""]:  # fmt: skip
    """D(target_out, f(x | the layers in ``sources`` masked with m = g + (1 − g)·r)): the layers not
    in ``sources`` run at their target weights; ``delta_sources`` the Δ-components' masks (None: no Δ)."""
    masks = {n: stochastic_mask(ci[n], r.expand_as(ci[n])) for n, r in sources.items()}
    deltas = None if delta_sources is None else {n: delta_sources[n].expand(ci[n].shape[:-1]) for n in sources}
    out = cm(x, masks=masks, weight_delta_masks=deltas, inner_acts=inner_acts)
    return output_distance(target_out, out, kind)


def ascend(
    cm: ComponentModel, x: Tensor, target_out: Tensor, ci: Mapping[str, Tensor], sources: Sources,
    delta_sources: Sources | None, *, n_steps: int, step_size: float, kind: OutputLoss,
    inner_acts: Mapping[str, Tensor] | None = None,
) -> tuple[Sources, Sources | None]:  # fmt: skip
    """``n_steps`` of projected sign-gradient ascent on D over ``sources`` (and ``delta_sources``):
    r ← clip(r + step_size·sign(∂D/∂r), 0, 1). Only the layers in ``sources`` are masked; the
    causal importances and ``inner_acts`` are held fixed (detached), and no gradient reaches the
    components or the CI functions. Returns new detached sources (the inputs are not changed)."""
    ci = {n: ci[n].detach() for n in sources}
    inner = None if inner_acts is None else {n: v.detach() for n, v in inner_acts.items()}
    r = {n: s.detach().clone() for n, s in sources.items()}
    rd = None if delta_sources is None else {n: delta_sources[n].detach().clone() for n in sources}
    with torch.enable_grad():
        for _ in range(n_steps):
            leaves = [*r.values(), *(rd.values() if rd is not None else ())]
            for t in leaves:
                t.requires_grad_(True)
            d = adversarial_distance(cm, x, target_out, ci, r, rd, kind, inner)
            grads = torch.autograd.grad(d, leaves)
            with torch.no_grad():
                stepped = [(t + step_size * g.sign()).clamp_(0.0, 1.0) for t, g in zip(leaves, grads)]
            r = dict(zip(r, stepped[: len(r)]))
            if rd is not None:
                rd = dict(zip(rd, stepped[len(r):]))
    return r, rd


class PersistentSources:
    """Persistent PGD's state: each layer use's sources per (batch row, position), [*lead, C], and its
    Δ-component's [*lead], kept across training steps (row b's sources meet whatever sample is in
    row b next step: what persists is the adversary's direction, as in VPD's per-batch-per-position
    scope). A layer whose batch shape changes (a short last batch) starts again from U(0, 1)."""

    def __init__(self) -> None:
        self.sources: Sources = {}
        self.delta_sources: Sources = {}

    def get(self, ci: Mapping[str, Tensor], delta: bool) -> tuple[Sources, Sources | None]:
        """The current sources for the layer uses of ``ci`` (new U(0, 1) draws where missing or mis-shaped)."""
        for n, g in ci.items():
            if n not in self.sources or self.sources[n].shape != g.shape:
                self.sources[n] = rand_rows(g.detach())
            if delta and (n not in self.delta_sources or self.delta_sources[n].shape != g.shape[:-1]):
                self.delta_sources[n] = rand_rows(g.detach()[..., 0])
        r = {n: self.sources[n] for n in ci}
        return r, ({n: self.delta_sources[n] for n in ci} if delta else None)

    def update(self, sources: Sources, delta_sources: Sources | None) -> None:
        self.sources.update({n: s.detach() for n, s in sources.items()})
        if delta_sources is not None:
            self.delta_sources.update({n: s.detach() for n, s in delta_sources.items()})

    def state_dict(self) -> dict[str, Tensor]:
        """The sources as ``sources.<layer>`` / ``delta_sources.<layer>`` tensors (on the CPU)."""
        return {f"sources.{n}": s.cpu() for n, s in self.sources.items()} | {
            f"delta_sources.{n}": s.cpu() for n, s in self.delta_sources.items()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Tensor], device: torch.device | str = "cpu") -> None:
        self.sources = {k.removeprefix("sources."): v.to(device) for k, v in state.items() if k.startswith("sources.")}
        self.delta_sources = {k.removeprefix("delta_sources."): v.to(device) for k, v in state.items()
                              if k.startswith("delta_sources.")}  # fmt: skip


_STATE_ATTR = "_persistent_pgd_sources"


def persistent_sources(cm: ComponentModel) -> PersistentSources:
    """The persistent PGD state of a training run's component model (made on first use; it lives
    and dies with the component model, and travels in training checkpoints)."""
    state = cm.__dict__.get(_STATE_ATTR)
    if state is None:
        state = PersistentSources()
        cm.__dict__[_STATE_ATTR] = state
    return state


def _check_attack(n_steps: int, step_size: float) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps={n_steps!r}: the attack's ascent steps must be a whole number >= 0 (0: the random start)")
    if not step_size > 0:
        raise ValueError(f"step_size={step_size!r}: must be > 0 (VPD's attack: 0.1)")


def attack_kl(
    decomposition: "Decomposition | ComponentModel", x: Tensor, *, model: torch.nn.Module | None = None,
    ci: Mapping[str, Tensor] | None = None, n_steps: int = 20, step_size: float = 0.1, shared_over_batch: bool = True,
    seed: int = 0, output_loss: OutputLoss | str | None = None, delta: bool | None = None,
    form: AdversarialForm | str = AdversarialForm.all_layers,
) -> float:  # fmt: skip
    """The output distance (KL for a language model, else MSE) under a fresh PGD attack on the
    masks m = g + (1 − g)·r: sources r from U(0, 1) (``seed``), then ``n_steps`` sign-gradient steps
    of ``step_size`` (``n_steps=0``: the value at random sources). ``shared_over_batch``: one source
    per position shared by the batch's rows (VPD's evaluation), else one per (row, position).

    ``decomposition``: a ``Decomposition`` (a loaded one needs its target ``model``; its causal
    importances come from its method), or a ``ComponentModel`` with the causal importances ``ci``.
    ``output_loss``: None takes the decomposition's config's (MSE when unset or for a bare
    component model). ``delta``: give the Δ-components sources too (None: the config's
    ``delta_component``; False for a bare component model). ``form``: every layer masked at once,
    or each layer alone (the mean over layers)."""
    _check_attack(n_steps, step_size)
    config = getattr(decomposition, "config", None)
    if isinstance(decomposition, ComponentModel):
        if ci is None:
            raise ValueError("attack_kl on a ComponentModel needs its causal importances: attack_kl(cm, x, ci=...) "
                             "(or pass the Decomposition, whose method computes them)")  # fmt: skip
        cm = decomposition
    else:
        cm = decomposition.component_model
        if cm is None:
            if model is None:
                raise ValueError("this decomposition was loaded, not trained here: pass its target, attack_kl(dec, x, model=...)")
            cm = decomposition.attach(model)
        if ci is None:
            ci = decomposition.causal_importances(x, model)
    kind = OutputLoss(output_loss) if output_loss is not None else (getattr(config, "output_loss", None) or OutputLoss.mse)
    delta = bool(getattr(config, "delta_component", False)) if delta is None else delta
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ci = {n: g.detach() for n, g in ci.items()}
        target_out = cm(x)
        sources, deltas = {}, {} if delta else None
        for n, g in ci.items():
            lead = (1, *g.shape[1:-1]) if shared_over_batch else tuple(g.shape[:-1])
            sources[n] = torch.rand((*lead, g.shape[-1]), generator=gen).to(g)
            if deltas is not None:
                deltas[n] = torch.rand(lead, generator=gen).to(g)
    groups = [list(ci)] if AdversarialForm(form) is AdversarialForm.all_layers else [[n] for n in ci]
    values = []
    for names in groups:
        r = {n: sources[n] for n in names}
        rd = None if deltas is None else {n: deltas[n] for n in names}
        r, rd = ascend(cm, x, target_out, ci, r, rd, n_steps=n_steps, step_size=step_size, kind=kind)
        with torch.no_grad():
            values.append(float(adversarial_distance(cm, x, target_out, ci, r, rd, kind)))
    return sum(values) / len(values)


def attack_ladder(decomposition: "Decomposition | ComponentModel", x: Tensor, steps: Sequence[int] = LADDER,
                  **kwargs: Any) -> dict[int, float]:  # fmt: skip
    """:func:`attack_kl` at each number of ``steps`` (VPD's 20, 40, 80, 160), from the same start."""
    return {n: attack_kl(decomposition, x, n_steps=n, **kwargs) for n in steps}
