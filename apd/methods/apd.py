"""Attribution-based Parameter Decomposition (SPEC §1): the config and the method.

One step: a target pass → attributions of every component (per position for sequences) → (batch)
top-k selects the active components → a masked pass with Σ_c s_c P_c in every decomposed matrix →
the registered APD losses read the step context: faithfulness, minimality, simplicity (not during
the unpenalised fine-tune), activation reconstruction, L_p sparsity.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from apd.attributions import compute_attributions, gradient_attributions
from apd.component_model import ComponentModel, Masks
from apd.components import ComponentInit
from apd.config import Attribution, ConfigError, GradientMode, MethodConfig, OutputLoss, need
from apd.distributed import gather_rows, local_rows
from apd.losses.lp_sparsity import lp_sparsity_per_component
from apd.merge import merge_parallel_
from apd.methods.base import Factors, InstanceView, Method, MLPUnits, StepContext, Units
from apd.optim import lr_at_step
from apd.topk import topk_mask, with_best_samples

__all__ = ["APDConfig", "APD", "APDStep", "topk_at_step", "in_finetune", "lr_for_step"]


@dataclass(kw_only=True)
class APDConfig(MethodConfig):
    """Hyperparameters of one APD run (SPEC §1). Plain strings are accepted for the Enum fields."""

    method: ClassVar[str] = "apd"

    # components
    C: int = 8
    """number of parameter components (each spans every decomposed matrix)"""
    rank: int | None = None
    """rank budget m per component and matrix; None = full rank min(d_in, d_out)"""
    init_scale: float = 1.0
    """scale of the random initialisation relative to a norm-matched start"""

    # selection
    topk: float | None = 1.0
    """k active components per sample, or per position of a sequence (may be fractional with
    batch_topk); None = no top-k (then lp_sparsity_coeff must be set)"""
    batch_topk: bool = True
    """keep the ⌊k·N⌋ largest attributions of the batch's N rows (samples or positions) together"""
    topk_start: float | None = None
    """k at step 0 of a batch top-k schedule: k moves linearly from topk_start to topk over the
    first topk_anneal_frac of the steps, then stays at topk; None = topk throughout"""
    topk_anneal_frac: float = 0.5
    """fraction of the steps over which k moves from topk_start to topk"""
    min_active: int = 0
    """during training, each component is also selected on the min_active rows of the batch
    where its attribution is largest (0 = off; evaluation always uses plain top-k)"""
    attribution: Attribution = Attribution.gradient
    gradient_mode: GradientMode | None = None
    """computation of the gradient attribution during training; None = 'auto', which takes 'hidden'
    (one batched Jacobian) on small problems such as TMS 5-2 and 'per_sample' above them;
    benchmarks/ times the modes against each other"""

    # losses (each <name>_coeff switches the registered loss <name> on; see apd.losses)
    faithfulness_coeff: float | None = 1.0
    minimality_coeff: float | None = 1.0
    simplicity_coeff: float | None = 1.0
    schatten_p: float = 1.0
    schatten_eps: float = 1e-12
    """added inside the Schatten power: the gradient of x^(p/2) blows up at 0"""
    output_loss: OutputLoss | None = None
    """D of the minimality loss: mse, or kl to the target's logits; None (unset): the target's
    (``DecomposeRun``: kl for the language model, ``target.loss`` for your own module, else mse),
    mse where no target config is given (``decompose``)"""
    act_recon_coeff: float | None = None
    """coefficient of the hidden-activation reconstruction loss; None = off"""
    act_recon_modules: list[str] = field(default_factory=list)
    """module-name patterns whose outputs are reconstructed (e.g. post-ReLU modules)"""
    lp_sparsity_coeff: float | None = None
    """coefficient of the L_p penalty Σ_c |A_c(x)|^p on attributions (the paper's alternative to
    top-k; A_c = sqrt of the toolkit's sum-of-squares attribution). With topk=None the simplicity
    term weights each component by the same |A_c(x)|^p instead of a {0, 1} mask"""
    lp_sparsity_p: float = 1.0

    # optimisation beyond MethodConfig's
    unit_norm_A: bool = False
    """renormalise each rank-1 row of A to unit norm every step and remove the gradient component
    parallel to it (SPEC §1.5)"""
    finetune_frac: float = 0.0
    """final fraction of the steps trained with the simplicity penalty off (faithfulness + minimality
    (+ act recon, L_p) only, top-k unchanged): undoes the shrinkage the Schatten penalty causes"""
    finetune_lr: float | None = None
    """constant learning rate during the fine-tune; None = the main schedule continues"""
    merge_threshold: float | None = None
    """at the start of the fine-tune, merge components whose weights are parallel (cosine over all
    matrices >= this) into one and zero the rest (``apd.merge``); None = never merge"""

    def _check_ranges(self) -> None:
        super()._check_ranges()
        need(self.C > 0, f"APDConfig.C={self.C}: the number of components must be a positive whole number")
        need(self.rank is None or self.rank > 0, f"APDConfig.rank={self.rank}: use a positive whole number, or None for full rank")
        need(
            self.gradient_mode is None or self.attribution is Attribution.gradient,
            f"APDConfig.gradient_mode={self.gradient_mode} applies to attribution='gradient' only "
            f"(attribution={self.attribution.value!r}): set gradient_mode=None",
        )
        need(self.init_scale > 0, f"APDConfig.init_scale={self.init_scale}: must be > 0")
        if self.topk is not None:
            need(self.topk > 0, f"APDConfig.topk={self.topk}: must be > 0 (or None to switch top-k off)")
            need(self.topk <= self.C, f"APDConfig.topk={self.topk} > C={self.C}: k cannot exceed the number of components")
            need(
                self.batch_topk or float(self.topk).is_integer(),
                f"APDConfig.topk={self.topk}: per-sample top-k needs a whole number; set batch_topk=True for fractional k",
            )
        if self.topk_start is not None:
            need(self.topk is not None, "APDConfig.topk_start is set but topk=None: a k schedule needs top-k on")
            need(0 < self.topk_start <= self.C, f"APDConfig.topk_start={self.topk_start}: must lie in (0, C={self.C}]")
            need(self.batch_topk, "APDConfig.topk_start: a k schedule passes fractional k; set batch_topk=True")
            need(0 < self.topk_anneal_frac <= 1, f"APDConfig.topk_anneal_frac={self.topk_anneal_frac}: must lie in (0, 1]")
        need(self.min_active >= 0, f"APDConfig.min_active={self.min_active}: must be >= 0 (0 = off)")
        need(self.min_active == 0 or self.topk is not None, "APDConfig.min_active needs top-k on (topk is None)")
        if self.topk is None:
            need(
                self.lp_sparsity_coeff is not None,
                "APDConfig.topk=None switches top-k off: set lp_sparsity_coeff so something makes the decomposition sparse",
            )
        need(0 < self.schatten_p <= 2, f"APDConfig.schatten_p={self.schatten_p}: must lie in (0, 2] (the paper uses 0.9 or 1)")
        need(0 < self.lp_sparsity_p <= 2, f"APDConfig.lp_sparsity_p={self.lp_sparsity_p}: must lie in (0, 2]")
        need(self.schatten_eps >= 0, f"APDConfig.schatten_eps={self.schatten_eps}: must be >= 0")
        need(
            self.act_recon_coeff is None or len(self.act_recon_modules) > 0,
            "APDConfig.act_recon_coeff is set but act_recon_modules is empty: name the modules whose outputs to reconstruct",
        )
        need(0 <= self.finetune_frac < 1, f"APDConfig.finetune_frac={self.finetune_frac}: must lie in [0, 1) (0 = no fine-tune)")
        need(
            self.finetune_lr is None or self.finetune_lr > 0,
            f"APDConfig.finetune_lr={self.finetune_lr}: must be > 0, or None to continue the main schedule",
        )
        if self.merge_threshold is not None:
            need(
                0 < self.merge_threshold <= 1,
                f"APDConfig.merge_threshold={self.merge_threshold}: a cosine threshold must lie in (0, 1] (e.g. 0.99), or None",
            )
            need(
                self.finetune_frac > 0,
                f"APDConfig.merge_threshold={self.merge_threshold} merges at the start of the fine-tune, but finetune_frac=0: "
                "set finetune_frac > 0 (e.g. 0.1) so the merged components are re-fitted",
            )

    @property
    def finetune_start(self) -> int:
        """First step of the unpenalised fine-tune (= steps when there is none)."""
        return self.steps - round(self.finetune_frac * self.steps)


def in_finetune(step: int, config: APDConfig) -> bool:
    """Whether ``step`` lies in the final unpenalised fine-tune (``config.finetune_frac``)."""
    return step >= config.finetune_start


def topk_at_step(step: int, config: APDConfig) -> float | None:
    """k of the top-k selection at ``step``: linear from ``topk_start`` to ``topk`` over the first
    ``topk_anneal_frac`` of the steps, then ``topk`` (``topk`` throughout without a schedule)."""
    if config.topk_start is None or config.topk is None:
        return config.topk
    progress = min(1.0, step / max(1, round(config.topk_anneal_frac * config.steps)))
    return config.topk_start + progress * (config.topk - config.topk_start)


def lr_for_step(step: int, config: APDConfig) -> float:
    """The main warm-up + decay schedule, or ``finetune_lr`` (when set) during the fine-tune."""
    if in_finetune(step, config) and config.finetune_lr is not None:
        return config.finetune_lr
    return lr_at_step(step, config.steps, config.lr, config.lr_schedule, config.warmup_frac)


def attributions_for(cm: ComponentModel, x: Tensor, config: APDConfig) -> Tensor:
    """The configured attribution of every component on ``x`` ([B, C] or [B, *pos, C])."""
    if config.attribution is Attribution.gradient and config.gradient_mode is not None:
        return gradient_attributions(cm, x, config.gradient_mode.value)
    return compute_attributions(cm, x, config.attribution)


@dataclass
class APDStep(StepContext):
    """One APD step's forward computation (what the APD losses read)."""

    config: APDConfig
    k: float | None
    finetune: bool
    target_out: Tensor
    masked_out: Tensor
    mask: Tensor
    """the selected components, [*rows, C]"""
    attributions: Tensor | None
    """differentiable when the L_p loss is on (it trains through them), else detached or None"""
    simplicity_weights: Tensor
    """the mask, or |A_c|^p per row and component without top-k (L_p mode)"""
    target_acts: dict[str, Tensor]
    masked_acts: dict[str, Tensor]

    def metrics(self) -> dict[str, Tensor]:
        return {"l0": self.mask.sum(-1).mean()}


class APD(Method):
    """Attribution-based Parameter Decomposition (see the module docstring)."""

    name = "apd"
    config_class = APDConfig
    loss_names = ("faithfulness", "minimality", "simplicity", "act_recon", "lp_sparsity")
    eval_mask_name = "topk"
    units = Units.shared
    unit_noun = "component"
    sparsity_knob = "topk"
    key_settings = ("C", "rank", "topk", "attribution", "faithfulness_coeff", "minimality_coeff", "simplicity_coeff", "lr")
    config: APDConfig

    def vectorised(self) -> "APD":
        """The default rules; the gradient attribution runs in ``hidden`` mode inside the seeds' vmap
        (``per_sample`` cannot; None / auto become ``hidden``)."""
        method = super().vectorised()
        c = self.config
        if c.attribution is Attribution.gradient:
            if c.gradient_mode is GradientMode.per_sample:
                raise ConfigError("gradient_mode='per_sample' cannot run inside the seeds' vmap; use 'hidden', 'jacfwd' or "
                                  "'jacrev' (None picks 'hidden')")  # fmt: skip
            if c.gradient_mode in (None, GradientMode.auto):
                return self._with(gradient_mode=GradientMode.hidden)  # type: ignore[return-value]
        return method  # type: ignore[return-value]

    def build(self, target: nn.Module, modules: Sequence[str], *, tied: Mapping[str, str] | None = None,
              seed: int | None = None) -> ComponentModel:  # fmt: skip
        c = self.config
        return ComponentModel(target, modules, c.C, c.rank, tied=tied, init_scale=c.init_scale,
                              seed=c.seed if seed is None else seed, init=ComponentInit.norm_matched)  # fmt: skip

    def prepare(self, cm: ComponentModel) -> None:
        if self.config.unit_norm_A:
            with torch.no_grad():
                for n in cm.matrix_names:
                    A = cm.layers[n].A
                    A.div_(A.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def step_context(self, cm: ComponentModel, x: Tensor, step: int, capture: Sequence[str] = ()) -> APDStep:
        c = self.config
        k, finetune = topk_at_step(step, c), in_finetune(step, c)
        with torch.no_grad(), cm.capture(capture) as target_acts:
            target_out = cm(x)
        attr = None
        if c.lp_sparsity_coeff is not None:
            attr = attributions_for(cm, x, c)  # differentiable: L_p trains through it
        elif k is not None:
            with torch.no_grad():
                attr = attributions_for(cm, x, c)
        if k is not None:
            assert attr is not None
            every = gather_rows(attr)  # data-parallel: select over the global batch, keep this rank's rows
            mask = local_rows(with_best_samples(topk_mask(every, k, c.batch_topk), every, c.min_active))
            weights = mask
        else:
            assert attr is not None
            mask = torch.ones_like(attr, dtype=target_out.dtype).detach()
            weights = lp_sparsity_per_component(attr, c.lp_sparsity_p)
        with cm.capture(capture) as masked_acts:
            masked_out = cm(x, masks=mask)
        return APDStep(cm=cm, x=x, config=c, step=step, k=k, finetune=finetune, target_out=target_out,
                       masked_out=masked_out, mask=mask, attributions=attr, simplicity_weights=weights,
                       target_acts=dict(target_acts), masked_acts=dict(masked_acts))  # fmt: skip

    def lr_at(self, step: int) -> float:
        return lr_for_step(step, self.config)

    def on_step_start(self, step: int, instances: Callable[[], list[InstanceView]]) -> None:
        c = self.config
        if c.merge_threshold is not None and step == c.finetune_start:
            for view in instances():
                merge_parallel_(view.A, view.B, c.merge_threshold, view.optimizer_states)

    def after_backward(self, factors: Factors) -> None:
        if self.config.unit_norm_A:  # remove from each A row's gradient its component along that unit row
            for A in factors.A.values():
                if A.grad is not None:
                    a = A.detach()
                    A.grad -= (A.grad * a).sum(-1, keepdim=True) * a

    def after_step(self, factors: Factors) -> None:
        if self.config.unit_norm_A:
            with torch.no_grad():
                for A in factors.A.values():
                    A.div_(A.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def unit_scores(self, cm: ComponentModel, x: Tensor) -> Tensor:
        """The run's attribution of every component on ``x`` (what top-k ranks)."""
        return compute_attributions(cm, x, self.config.attribution)

    def mlp_units(self, W_E: Tensor, component_weights: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]]) -> MLPUnits:
        """The components, each spanning every W_in and W_out (its NC summed over the layers' neurons)."""
        from apd.metrics.resid_mlp import component_neuron_contributions

        weights = dict(component_weights)
        return MLPUnits(nc=component_neuron_contributions(W_E, weights, pairs), layer=None,
                        out_maps={w_in: weights[w_out] for w_in, w_out in pairs})  # fmt: skip

    def settings_note(self, C_per_module: Mapping[str, int]) -> str:
        m = self.config
        return (f"C={m.C}, rank={m.rank if m.rank is not None else 'full'}, batch top-k={m.topk}, {m.steps} steps, "
                f"coefficients faithfulness/minimality/simplicity {m.faithfulness_coeff:g}/{m.minimality_coeff:g}/"
                f"{m.simplicity_coeff:g}")  # fmt: skip

    def preset_note(self, steps: int, batch_size: int) -> str:
        m = self.config
        return (f"C={m.C}, rank={m.rank if m.rank is not None else 'full'}, batch top-k={m.topk}, coefficients faithfulness/minimality/"
                f"simplicity {m.faithfulness_coeff:g}/{m.minimality_coeff:g}/{m.simplicity_coeff:g}, p={m.schatten_p:g}, lr "
                f"{m.lr:g} ({m.lr_schedule.value}), {steps} steps, batch {batch_size}"
                + (f", final {m.finetune_frac:g} of the steps without the simplicity term" if m.finetune_frac else ""))  # fmt: skip

    unit_score_noun = "attribution"

    def unit_selection(self) -> str:
        c = self.config
        how = "every component (no top-k)" if c.topk is None else f"{'batch ' if c.batch_topk else ''}top-k, k = {c.topk:g}"
        return f"its attribution ({c.attribution.value}) where selected ({how})"

    def eval_masks(self, cm: ComponentModel, x: Tensor) -> Masks:
        """Plain top-k (no ``min_active``, no k schedule) on the run's attribution; without top-k, every component."""
        c = self.config
        with torch.no_grad():
            attr = compute_attributions(cm, x, c.attribution)
        if c.topk is None:
            return torch.ones_like(attr)
        return topk_mask(attr, c.topk, c.batch_topk)
