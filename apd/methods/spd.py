"""Stochastic Parameter Decomposition (SPEC §5; Bushnaq, Braun, Sharkey, arXiv 2506.20790).

Each decomposed matrix W_l gets C rank-one subcomponents U_c V_cᵀ of its own (``B = U``, ``A = Vᵀ``
in the toolkit's factors), with frozen bias and Kaiming-style initialisation. Learned
causal-importance functions (``apd.ci_functions``) give every subcomponent a g_{l,c}(x) ∈ [0, 1] per
input (per position for sequences): how much it cannot be ablated there. One step:

1. a target pass records every layer's input; the inner activations V_cᵀ a feed the CI functions;
2. the lower-leaky hard sigmoid gives g (the masks' importances), the upper-leaky one g⁺ (the
   minimality loss's);
3. the registered SPD losses read the step context: faithfulness (on by default, relative form at
   1e3: the optional Δ-component W − Σ_c U_c V_cᵀ, under its own random mask, keeps the unmasked model
   exactly the target, so without it the sum drifts off the weights), stochastic reconstruction with masks
   m = g + (1 − g)·r, r ~ U(0, 1) (every layer masked, then one layer at a time), importance
   minimality Σ_l Σ_c mean_x (g⁺)^p, and the optional CI-masked reconstruction.

Before step 0 a short faithfulness warm-up (goodfire-ai/spd's: AdamW on the factors alone) fits
Σ_c U_c V_cᵀ to W. Evaluation masks are the causal importances g; L0 counts g > ``ci_threshold``.

Choosing the one coefficient that matters, ``importance_minimality_coeff``: every logged step
shows ``l0`` (active subcomponents per input, summed over layers) and the reconstruction losses.
Too high: reconstruction stays high (g falls below 1 where a subcomponent is needed) and L0 sinks
below the number of mechanisms an input uses; too low: L0 stays near C per layer (every gate open,
a run warning says "saturated"). Start at the default, then move by factors of 3 until the
reconstruction loss is small (e.g. < 1e-3 of the output's variance) at the smallest L0.
"""

import contextlib
import dataclasses
import fnmatch
import warnings
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.ci_functions import CIFn, make_ci_fn
from apd.component_model import CallRecord, ComponentModel, Masks, resolve_modules
from apd.components import ComponentInit, EmbeddingComponents
from apd.config import ConfigError, FaithfulnessNorm, LRSchedule, MethodConfig, OutputLoss, need
from apd.distributed import rand_rows
from apd.global_ci import GlobalMLPCI
from apd.losses.faithfulness import faithfulness_loss
from apd.methods.base import Factors, Method, MLPUnits, StepContext, Units
from apd.model_io import masked_mean, valid_rows
from apd.pgd import AdversarialForm, persistent_sources
from apd.precision import at_least_float32, full_precision
from apd.sigmoids import leaky_hard_sigmoids, lower_leaky_hard_sigmoid, stochastic_mask, upper_leaky_hard_sigmoid

__all__ = ["SPDConfig", "SPD", "SPDStep", "Sampling", "CompileCI", "LayerRouting", "subset_routes", "CIFunctions", "ci_functions", "CI_FNS",
           "lower_leaky_hard_sigmoid", "upper_leaky_hard_sigmoid", "leaky_hard_sigmoids",
           "stochastic_mask", "annealed_p", "minimality_scale"]


class Sampling(str, Enum):
    """How the random part r of a stochastic mask m = g + (1 − g)·r is drawn."""

    continuous = "continuous"  # r ~ U(0, 1)
    binomial = "binomial"  # r ∈ {0, 1} with probability 1/2 each


class CompileCI(str, Enum):
    """Whether the causal-importance functions run through ``torch.compile`` (``SPDConfig.compile_ci``).
    ``true``/``false`` of older configs and checkpoints read as on/off."""

    off = "off"
    on = "on"
    auto = "auto"  # on where the run is long enough to pay for the compiling (SPDConfig.compile_ci)

    @classmethod
    def _missing_(cls, value: object) -> "CompileCI | None":
        if isinstance(value, bool):
            return cls.on if value else cls.off
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return cls.on if value.lower() == "true" else cls.off
        return None


AUTO_COMPILE_ACTIVATION_STEPS = 6e9
"""``compile_ci=auto`` compiles when steps × (hidden CI activations per step) reaches this: a cold
compile costs about what this many activations' eager work saves (see ``SPDConfig.compile_ci``)"""


class LayerRouting(str, Enum):
    """Which layers the stochastic reconstruction masks in its passes."""

    all_and_layerwise = "all_and_layerwise"
    """every layer masked at once (stochastic_recon), then each layer alone (stochastic_recon_layerwise):
    1 + L masked forward passes per mask sample (the paper's)"""
    uniform_k_subset = "uniform_k_subset"
    """one masked pass per mask sample, on a random subset of the layers drawn for every input (every
    position of a sequence): k uniform in 1..L, then k of the L layer uses uniformly; the others run at
    their target weights (the subset routing of VPD, "Interpreting Language Model Parameters", Goodfire 2026). Its loss is logged as stochastic_recon and
    weighted by stochastic_recon_coeff; stochastic_recon_layerwise is off. A different objective: see
    the measured comparison in conf/method/spd.yaml before a preset uses it"""


@dataclass(kw_only=True)
class SPDConfig(MethodConfig):
    """Hyperparameters of one SPD run (SPEC §5). Plain strings are accepted for the Enum fields.

    Loss terms are registered losses (``apd.losses``): each ``<name>_coeff`` switches its loss on."""

    method: ClassVar[str] = "spd"

    lr_schedule: LRSchedule = LRSchedule.cosine

    # subcomponents and causal importances
    C: int = 20
    """rank-one subcomponents per decomposed matrix (more than the matrix's rank is fine: unused ones die)"""
    C_per_module: dict[str, int] = field(default_factory=dict)
    """C for the matrices whose module name matches a key (a name, its last dotted parts such as
    ``mlp_out`` for every ``layers.*.mlp_out``, or an fnmatch pattern; the first matching key wins);
    the others get ``C``; a tied second use has its matrix's (a key that matches only such a use, or
    that earlier keys shadow everywhere, is refused: it would do nothing). On the command line:
    ``'+method.C_per_module={mlp_in:120,mlp_out:40}'``. Fewer subcomponents where few live makes a
    step cheaper (3-layer residual MLP, 40 per W_out instead of 200: 1.5x, benchmarks/README.md), but
    it can cost quality: there it left 96 instead of 99 features with a dedicated W_in subcomponent
    (conf/experiment/spd_resid_mlp_3.yaml)"""
    ci_fn: CIFn = CIFn.mlp
    """causal-importance function: mlp (per subcomponent, on its inner activation: the paper's),
    vector_mlp (per subcomponent, on the layer's input), shared_mlp (one per layer, input to C outputs),
    global_mlp (VPD's: one network reading every decomposed layer's RMS-normalised input, to every layer's
    C outputs, per position: ``apd.global_ci``)"""
    ci_hidden: list[int] = field(default_factory=lambda: [16])
    """hidden widths of the CI functions' MLPs (16 for the toys, 128 for the 3-layer residual MLP)"""
    init_scale: float = 1.0
    """scale of the Kaiming-style initialisation of U and V"""
    leaky_alpha: float = 0.01
    """slope of the leaky parts of the hard sigmoids"""
    compile_ci: CompileCI = CompileCI.off
    """run the causal-importance functions through ``torch.compile``: off, on, or auto (single-seed
    runs; off for seeds trained at once; true/false read as on/off). auto compiles the ``mlp`` CI
    functions when the run is long enough to pay for it: when steps × N·Σ_l C_l·H (the hidden CI
    activations of a step: N rows, C_l subcomponents of layer use l, hidden width H) reaches
    ``AUTO_COMPILE_ACTIVATION_STEPS`` = 6e9, decided at the first training step (N known then).
    Measured with ``python -m benchmarks.compile_ci_cost CASE`` (one thread, the 2-core CPU shared
    with other jobs, 2026-12-05): TMS 5-2 (C 20, batch 1024: 0.66 M activations a step) compiled in
    60 s with a cold inductor cache (5.6 s warm) and then saved 5.5-6 ms a step, so it pays after
    ~10,000 steps (its preset runs 3000: eager); the 3-layer residual MLP (C 200: 19.7 M a step)
    compiled in 10 s (4.6 s warm) and saved 13-67 ms of a 0.9-1 s step (its 10,000 steps: compiled).
    The threshold is 60 s / (6 ms / 0.66 M activations) ≈ 6.5e9, rounded down; a resumed run decides
    again from ``steps``"""

    # losses
    faithfulness_coeff: float | None = 1e3
    """The faithfulness loss's coefficient (its normalisation: ``faithfulness_norm``). On by default:
    with the Δ-component the stochastic losses see W − Σ_c U_c V_cᵀ as well, so nothing else holds the
    sum to the weights, and training drifts it away (tiny GPT-2 / Llama / plain transformers, 150 steps:
    the worst matrix 70-97% off with None; the 1-layer LM's MLP at C 512, 300 steps: 17.9%). 1e3 keeps
    them within 1% (the LM's: 0.35%). A small network whose reconstruction loss is tiny (an MSE of
    1e-3) needs less: there 1e3 raised L0 from 1.9 to 5.7, 10 kept it at 2.3 (docs/method.md). None:
    off (the toy presets pin it, as their numbers were measured; the warm-up fits the sum first)"""
    faithfulness_norm: FaithfulnessNorm = FaithfulnessNorm.relative
    """``relative``: mean over matrices of ‖W_l − Σ_c U_c V_cᵀ‖² / ‖W_l‖², so one coefficient means the
    same at any weight scale; ``entries``: Σ_l ‖W_l − Σ_c U_c V_cᵀ‖² / N, N the weights' entries (the
    papers' loss and goodfire-ai/spd's, whose LM configs pair it with 1e6-1e7: per unit of relative
    error that is ~1/mean(W²) times stronger on small-init weights, and a stiff penalty slows Adam along
    the faithful directions, which raised L0 in every short run measured)"""
    stochastic_recon_coeff: float | None = 1.0
    stochastic_recon_layerwise_coeff: float | None = 1.0
    ci_masked_recon_coeff: float | None = None
    """reconstruction with the masks set to the causal importances themselves (None: off)"""
    importance_minimality_coeff: float | None = 1e-3
    """β3, the coefficient that matters: see the module docstring for how to pick it"""
    pnorm: float = 1.0
    """p of the importance-minimality loss Σ_l Σ_c mean_x (g⁺)^p"""
    pnorm_final: float | None = None
    """anneal p linearly to this value (None: no annealing) between the two fractions below"""
    pnorm_anneal_start_frac: float = 0.0
    pnorm_anneal_end_frac: float = 1.0
    importance_minimality_decay_start_frac: float = 1.0
    """from this fraction of the run on, the importance-minimality coefficient falls linearly to 0 at the
    last step (1: never). Lets the needed subcomponents' CIs reach 1 at the end, so that they are not
    lengthened to make up for the stochastic masks' mean (1 + g)/2 < 1"""
    importance_minimality_eps: float = 1e-12
    """added to g⁺ inside the power (the gradient of x^p blows up at 0 for p < 1)"""
    importance_minimality_beta: float = 0.0
    """goodfire-ai/spd's frequency term: each subcomponent's mean (g⁺)^p is also weighted by
    β·log₂(1 + its sum over the batch) (0: off)"""
    n_mask_samples: int = 1
    """S, stochastic masks per batch (S = 1 suffices)"""
    sampling: Sampling = Sampling.continuous
    layer_routing: LayerRouting = LayerRouting.all_and_layerwise
    """which layers the stochastic reconstruction's passes mask (see ``LayerRouting``)"""
    delta_component: bool = True
    """add Δ = W − Σ_c U_c V_cᵀ under its own random mask in the stochastic losses"""
    output_loss: OutputLoss | None = None
    """D of the reconstruction losses: mse, or kl to the target's logits (language models); None
    (unset): the target's (``DecomposeRun``: kl for the language model, ``target.loss`` for your own
    module, else mse), mse where no target config is given (``decompose``)"""
    adversarial_recon_coeff: float | None = None
    """VPD's persistent-PGD reconstruction (``apd.losses.adversarial_recon``; None: off; VPD's LM run: 0.5
    beside stochastic 0.5): masks m = g + (1 − g)·r with sources r per batch row and position chosen
    by projected gradient ascent on D and kept from step to step (and in checkpoints)"""
    adversarial_form: AdversarialForm = AdversarialForm.all_layers
    """all_layers: every layer use masked at once; layerwise: each alone, the mean over layer uses (costs
    L times the passes)"""
    adversarial_steps: int = 4
    """n_adv: ascent steps on the persistent sources per training step (each one forward and backward pass
    per layer group)"""
    adversarial_step_size: float = 0.5
    """lr_adv: the size of each sign-gradient ascent step on r ∈ [0, 1] (VPD: n_adv·lr_adv ≈ 2)"""

    # before the main steps
    faithfulness_warmup_steps: int = 200
    """AdamW steps on the faithfulness loss alone before step 0 (0: none; goodfire-ai/spd's toy settings).
    They fit Σ_c U_c V_cᵀ to W to 0.05-0.3% on every shipped target, but not where the weights are small
    next to the Kaiming-initialised factors or C is close to the rank: tiny GPT-2 / Llama from their
    configs (weights of std 0.02) stay 26-42% off, a 16-wide plain-torch transformer 27%
    (``faithfulness_warmup_tol`` then finishes the fit)"""
    faithfulness_warmup_lr: float = 1e-2
    faithfulness_warmup_weight_decay: float = 0.1
    faithfulness_warmup_tol: float | None = 5e-3
    """after the AdamW steps, every matrix still off by more than this relative error ‖W − Σ_c U_c V_cᵀ‖_F /
    ‖W‖_F is fitted by damped alternating least squares on U and V (the smallest change to the factors that
    removes the difference, a few to 100 rounds) until it is within it; a matrix that cannot be (C below
    its rank) gets a warning naming C, the rank and the best error possible. None: the AdamW steps alone
    (the behaviour before 2026-12-05). 5e-3 leaves every shipped preset's warm-up as it was (they reach
    0.05-0.27% in the AdamW steps)"""

    # evaluation
    ci_threshold: float = 0.1
    """τ: a subcomponent is active on an input when g > τ (L0, alive subcomponents, mechanisms)"""

    def _check_ranges(self) -> None:
        super()._check_ranges()
        need(self.C >= 1, f"SPDConfig.C={self.C}: every matrix needs at least one subcomponent (C >= 1)")
        for key, n in self.C_per_module.items():
            need(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                 f"SPDConfig.C_per_module[{key!r}]={n!r}: every matrix needs a whole number of subcomponents >= 1")  # fmt: skip
        need(all(h >= 1 for h in self.ci_hidden), f"SPDConfig.ci_hidden={self.ci_hidden}: hidden widths must be >= 1")
        need(self.init_scale > 0, f"SPDConfig.init_scale={self.init_scale}: must be > 0")
        need(0 <= self.leaky_alpha < 1, f"SPDConfig.leaky_alpha={self.leaky_alpha}: must lie in [0, 1)")
        need(0 < self.pnorm <= 2, f"SPDConfig.pnorm={self.pnorm}: p must lie in (0, 2] (the paper uses 1 or 2; LMs anneal 2 -> 0.4)")
        need(self.pnorm_final is None or 0 < self.pnorm_final <= 2,
             f"SPDConfig.pnorm_final={self.pnorm_final}: must lie in (0, 2], or None for no annealing")  # fmt: skip
        need(0 <= self.pnorm_anneal_start_frac <= self.pnorm_anneal_end_frac <= 1,
             f"SPDConfig.pnorm_anneal_start_frac={self.pnorm_anneal_start_frac}, pnorm_anneal_end_frac={self.pnorm_anneal_end_frac}: "
             "need 0 <= start <= end <= 1")  # fmt: skip
        need(0 <= self.importance_minimality_decay_start_frac <= 1,
             f"SPDConfig.importance_minimality_decay_start_frac={self.importance_minimality_decay_start_frac}: "
             "must lie in [0, 1] (1: no decay)")  # fmt: skip
        need(self.importance_minimality_eps >= 0, f"SPDConfig.importance_minimality_eps={self.importance_minimality_eps}: must be >= 0")
        need(self.importance_minimality_beta >= 0, f"SPDConfig.importance_minimality_beta={self.importance_minimality_beta}: must be >= 0")
        need(self.n_mask_samples >= 1, f"SPDConfig.n_mask_samples={self.n_mask_samples}: must be >= 1")
        need(self.faithfulness_warmup_steps >= 0, f"SPDConfig.faithfulness_warmup_steps={self.faithfulness_warmup_steps}: must be >= 0")
        need(self.faithfulness_warmup_lr > 0, f"SPDConfig.faithfulness_warmup_lr={self.faithfulness_warmup_lr}: must be > 0")
        need(self.faithfulness_warmup_weight_decay >= 0,
             f"SPDConfig.faithfulness_warmup_weight_decay={self.faithfulness_warmup_weight_decay}: must be >= 0")  # fmt: skip
        need(self.faithfulness_warmup_tol is None or 0 < self.faithfulness_warmup_tol < 1,
             f"SPDConfig.faithfulness_warmup_tol={self.faithfulness_warmup_tol}: a relative error in (0, 1) (e.g. 5e-3), "
             "or None for the AdamW warm-up steps alone")  # fmt: skip
        need(isinstance(self.adversarial_steps, int) and not isinstance(self.adversarial_steps, bool) and self.adversarial_steps >= 1,
             f"SPDConfig.adversarial_steps={self.adversarial_steps!r}: the adversary needs a whole number of ascent steps >= 1 "
             "per training step (VPD: a few, with adversarial_steps * adversarial_step_size about 2)")  # fmt: skip
        need(0 < self.adversarial_step_size <= 1,
             f"SPDConfig.adversarial_step_size={self.adversarial_step_size}: must lie in (0, 1] (the sources live in [0, 1]; "
             "e.g. 0.5 with adversarial_steps=4)")  # fmt: skip
        need(0 <= self.ci_threshold < 1, f"SPDConfig.ci_threshold={self.ci_threshold}: τ must lie in [0, 1)")
        need(self.layer_routing is LayerRouting.all_and_layerwise or self.coefficient("stochastic_recon") > 0,
             f"SPDConfig.layer_routing={self.layer_routing.value} routes the stochastic_recon loss, which is off "
             "(stochastic_recon_coeff); set stochastic_recon_coeff (e.g. 1.0) or layer_routing=all_and_layerwise")  # fmt: skip
        recon = [f.name for f in dataclasses.fields(self) if f.name.endswith("recon_coeff") or "_recon_" in f.name]
        need(sum(self.coefficient(n.removesuffix("_coeff")) for n in recon) > 0,
             f"SPDConfig: every reconstruction loss is off ({', '.join(recon)}); without one nothing ties the "
             "subcomponents to the target's outputs")  # fmt: skip
        need(self.delta_component or self.coefficient("faithfulness") > 0,
             "SPDConfig: delta_component=False and faithfulness_coeff off: nothing keeps Σ_c U_c V_cᵀ equal to the weights; "
             "set faithfulness_coeff (e.g. 1.0) or delta_component=True")  # fmt: skip


def _linear_ramp(frac: float, start: float, end: float, a: float, b: float) -> float:
    """``a`` up to the run fraction ``start``, ``b`` from ``end`` on, linear in between."""
    if frac <= start:
        return a
    if frac >= end or end == start:
        return b
    return a + (b - a) * (frac - start) / (end - start)


def minimality_scale(config: SPDConfig, step: int) -> float:
    """The factor on the importance-minimality coefficient at ``step``: 1, then linear to 0 at the last
    step from ``importance_minimality_decay_start_frac`` of the run on."""
    frac = step / max(config.steps - 1, 1)
    return _linear_ramp(frac, config.importance_minimality_decay_start_frac, 1.0, 1.0, 0.0)


def annealed_p(config: SPDConfig, step: int) -> float:
    """The minimality exponent p at ``step`` (linear from ``pnorm`` to ``pnorm_final`` between the
    start and end fractions of the run)."""
    if config.pnorm_final is None:
        return config.pnorm
    return _linear_ramp(step / config.steps, config.pnorm_anneal_start_frac, config.pnorm_anneal_end_frac,
                        config.pnorm, config.pnorm_final)  # fmt: skip


@dataclass
class SPDStep(StepContext):
    """One SPD step's forward computation (what the SPD losses read)."""

    config: SPDConfig
    target_out: Tensor
    ci: dict[str, Tensor]
    """g per layer use, [*lead, C] (lower-leaky: in [0, 1])"""
    ci_upper: dict[str, Tensor]
    """g⁺ per layer use (upper-leaky) for the minimality loss"""
    inner: dict[str, Tensor] = field(default_factory=dict)
    """each layer use's inner activations V_cᵀ a on the target's input a (what the CI functions read)"""
    call_order: tuple[str, ...] = ()
    """the layer uses in the order of their first call in the target pass"""
    called_once: frozenset[str] = frozenset()
    """the layer uses that the target pass calls exactly once"""
    record: CallRecord | None = None
    """the target pass's submodule calls and outputs (None: not recorded; every masked pass runs in full)"""

    def masked_out(self, masks: Mapping[str, Tensor], deltas: Mapping[str, Tensor] | None = None) -> Tensor:
        """The model's output with ``masks`` on their layer uses (Δ-components under ``deltas``), the
        others at their target weights: ``cm(x, masks=masks, weight_delta_masks=deltas)``, taking from
        the target pass what it already has. The modules that return before the first masked layer use's
        call ran at the target's weights on the same input (``CallRecord.reusable``): their recorded
        outputs stand in for them; that layer use's inner activations V_cᵀ a (``inner_acts``), and its
        W a where it has no bias (the Δ-component's), are the target pass's."""
        first = next((n for n in self.call_order if n in masks), None)
        reuse, wx = None, None
        if self.record is not None and first is not None and first in self.called_once:
            reuse = self.record.reusable(first)
            layer = self.cm.layers[first]
            if deltas is not None and first in deltas and layer.bias is None and first in self.record.outputs \
                    and self.record.unchanged(first):  # fmt: skip
                wx = {first: self.record.outputs[first][0]}
        return self.cm(self.x, masks=masks, weight_delta_masks=deltas, inner_acts=self.inner_acts(masks),
                       target_wx=wx, reuse=reuse)  # fmt: skip

    def inner_acts(self, masked: Collection[str]) -> dict[str, Tensor]:
        """The inner activations a masked forward can take from the target pass instead of recomputing
        them: those of the first masked layer use in call order, if it is called once (every layer
        before it runs at its target weights, so it receives the target's input). With one layer
        masked (the layerwise loss) that is the layer itself; with all masked, the first one."""
        for n in self.call_order:
            if n in masked:
                return {n: self.inner[n]} if n in self.called_once and n in self.inner else {}
        return {}

    def stochastic_masks(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """One draw of m = g + (1 − g)·r per layer, and the Δ-components' masks r_Δ [*lead] (or None)."""
        c = self.config
        masks, deltas = {}, {} if c.delta_component else None
        for n, g in self.ci.items():
            masks[n] = stochastic_mask(g, rand_rows(g, binary=c.sampling is Sampling.binomial))
            if deltas is not None:
                deltas[n] = rand_rows(g[..., 0])
        return masks, deltas

    def routed_masks(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One draw of stochastic masks with a random subset of the layer uses routed through them per
        input (``subset_routes``): a routed use gets (m, r_Δ) as ``stochastic_masks`` draws them; one not
        routed gets m = 1 and Δ-mask 1, which is exactly its target weight (Σ_c P_c x + (W − Σ_c P_c) x
        computed as 0·(V_cᵀ a) U + W a), with no gradient to its components or causal importances."""
        masks, deltas = self.stochastic_masks()
        routes = subset_routes({n: g[..., 0] for n, g in self.ci.items()})
        out_m, out_d = {}, {}
        for n, m in masks.items():
            on = routes[n]
            out_m[n] = torch.where(on.unsqueeze(-1), m, torch.ones_like(m))
            routed_delta = deltas[n] if deltas is not None else torch.zeros_like(on, dtype=m.dtype)
            out_d[n] = torch.where(on, routed_delta, torch.ones_like(routed_delta))
        return out_m, out_d

    def metrics(self) -> dict[str, Tensor]:
        tau = self.config.ci_threshold
        return {"l0": sum(masked_mean((g > tau).float().sum(-1), self.valid) for g in self.ci.values())}  # type: ignore[dict-item]


def subset_routes(like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Uniform-k subset routing: for every input position (the entries of each ``like[n]``, [*lead]; the
    layer uses must share one lead shape), k uniform in 1..L and then k of the L layer uses uniformly;
    {use: bool [*lead], True where routed}. Drawn with ``rand_rows`` (data-parallel ranks draw the
    global batch's)."""
    names = list(like)
    leads = {tuple(t.shape) for t in like.values()}
    if len(leads) != 1:
        raise ValueError(f"subset routing draws one subset per input position, but the layer uses' inputs have different "
                         f"leading shapes {sorted(leads)}; use layer_routing=all_and_layerwise for this model")  # fmt: skip
    first = like[names[0]]
    L = len(names)
    k = (rand_rows(first) * L).long().clamp_max(L - 1) + 1  # [*lead], uniform in 1..L
    ranks = rand_rows(first.unsqueeze(-1).expand(*first.shape, L)).argsort(-1).argsort(-1)  # a random order of the uses
    return {n: ranks[..., i] < k for i, n in enumerate(names)}


def _key_matches(name: str, key: str) -> bool:
    """A ``C_per_module`` key matches the whole name, or its last dotted parts ('mlp_out')."""
    return fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, "*." + key)


def components_per_module(config: SPDConfig, names: Sequence[str]) -> int | dict[str, int]:
    """``config.C``, or {module: C} when ``C_per_module`` sets some (``names``: the decomposed
    modules). A key that matches none of them is a ConfigError naming the modules."""
    if not config.C_per_module:
        return config.C
    for key in config.C_per_module:
        need(any(_key_matches(n, key) for n in names),
             f"SPDConfig.C_per_module key {key!r} matches no decomposed module; the modules are {list(names)}")  # fmt: skip
    return {n: next((c for k, c in config.C_per_module.items() if _key_matches(n, k)), config.C) for n in names}


def _check_C_per_module_keys(config: SPDConfig, matrices: Sequence[str], tied: Mapping[str, str]) -> None:
    """Refuse a ``C_per_module`` key that would do nothing: one that matches only tied second uses
    (``tied``: {second use: its matrix}; such a use has its matrix's subcomponents), or one that an
    earlier key shadows on every matrix it matches (the first matching key wins)."""
    for key in config.C_per_module:
        uses = [n for n in tied if _key_matches(n, key)]
        if uses and not any(_key_matches(n, key) for n in matrices):
            raise ConfigError(
                f"SPDConfig.C_per_module key {key!r} matches only {', '.join(repr(u) for u in uses)}, the tied second use "
                f"of {', '.join(repr(tied[u]) for u in uses)} (one matrix, its subcomponents shared), so it would do nothing; "
                f"set the key for the source matrix instead: C_per_module={{{tied[uses[0]]!r}: {config.C_per_module[key]}}}"
            )
    winners = {next(k for k in config.C_per_module if _key_matches(n, k)) for n in matrices
               if any(_key_matches(n, k) for k in config.C_per_module)}  # fmt: skip
    for key in config.C_per_module:
        hit = [n for n in matrices if _key_matches(n, key)]
        if hit and key not in winners:
            raise ConfigError(f"SPDConfig.C_per_module key {key!r} is shadowed by earlier keys on every matrix it matches "
                              f"({hit}): the first matching key wins, so it would do nothing; put it before the broader key")  # fmt: skip


CI_FNS = "ci_fns"
"""the name under which SPD's causal-importance functions live in its component model (their tensors
are ``ci_fns.<i>.…`` in every checkpoint and decomposition file)"""


class CIFunctions(nn.ModuleList):
    """SPD's causal-importance functions, one per layer use in ``cm.layer_names`` order: ``fn(name)``
    maps that layer's inner activations [*lead, C, 1] and its input to pre-activations [*lead, C]."""

    def __init__(self, fns: Mapping[str, nn.Module], layer_names: Sequence[str]):
        missing = [n for n in layer_names if n not in fns]
        if missing:
            raise ValueError(f"no causal-importance function for {missing}")
        super().__init__([fns[n] for n in layer_names])
        self.position = {n: i for i, n in enumerate(layer_names)}

    def fn(self, name: str) -> nn.Module:
        return self[self.position[name]]


def ci_functions(cm: ComponentModel) -> "CIFunctions | GlobalMLPCI":
    """The causal-importance functions of an SPD component model (a clear error for any other)."""
    fns = cm.method_module(CI_FNS)
    if not isinstance(fns, (CIFunctions, GlobalMLPCI)):
        raise ValueError("this decomposition has no causal-importance functions (an APD decomposition ranks its "
                         "components by attributions: apd.compute_attributions); causal importances come from SPD")  # fmt: skip
    return fns


def _auto_compile(fns: CIFunctions, acts: Mapping[str, Tensor], config: SPDConfig) -> None:
    """``compile_ci=auto`` at the first training step: compile the CI functions when the run's
    steps × hidden CI activations per step reach ``AUTO_COMPILE_ACTIVATION_STEPS``."""
    steps, fns.auto_compile_steps = fns.auto_compile_steps, None  # type: ignore[assignment]
    per_step = sum(a.shape[:-1].numel() * config.ci_hidden[0] for a in acts.values())  # rows·C·H per layer use
    if steps * per_step >= AUTO_COMPILE_ACTIVATION_STEPS:
        for fn in fns:
            fn.forward = torch.compile(fn.forward)  # type: ignore[method-assign]


def _d_in(cm: ComponentModel, name: str) -> int:
    layer = cm.layers[name]
    if name in cm.tied_names:  # the second use reads in the source's output space
        return layer.source.B.shape[1]  # type: ignore[union-attr]
    return layer.A.shape[-1]  # type: ignore[union-attr]


def relative_error(A: Tensor, B: Tensor, W: Tensor) -> Tensor:
    """‖W − Σ_c B_c A_c‖_F / ‖W‖_F per instance (A [*I, C, m, d_in], B [*I, C, d_out, m], W [d_out, d_in]): [*I]."""
    return _relative_norm(W - torch.einsum("...com,...cmi->...oi", B, A), W)


def _relative_norm(R: Tensor, W: Tensor) -> Tensor:
    """‖R‖_F / ‖W‖_F per instance of R [*I, d_out, d_in]."""
    return R.flatten(-2).norm(dim=-1) / W.norm().clamp_min(torch.finfo(W.dtype).tiny)


LEAST_SQUARES_DAMPING = 1e-3
"""δ of ``least_squares_fit``: each solve is ridge-damped by δ times the largest eigenvalue of its Gram
matrix (undamped, C equal to the rank gave subcomponents 30-140 times W's spectral norm that cancel;
δ = 1e-3: 1.4-5 times, as after the AdamW steps; measured on 16- and 128-wide transformers)"""


def least_squares_fit(A: Tensor, B: Tensor, W: Tensor, tol: float, max_rounds: int = 100) -> Tensor:
    """Fit Σ_c B_c A_c to W in place where it is off by more than ``tol`` (relative Frobenius error), by
    damped alternating least squares: B += R Aᵀ(AAᵀ + λI)⁻¹, then A += (BᵀB + λI)⁻¹BᵀR, R = W − BA, with
    A and B flattened to [C·m, d_in] and [d_out, C·m], up to ``max_rounds`` rounds. Each solve is the
    smallest (ridge-damped) change to one factor that removes the residual, so the subcomponents move as
    little as the fit needs. Instances (a leading dimension) within ``tol`` are left unchanged. Returns
    the relative error per instance after the fit."""
    err = relative_error(A, B, W)
    if not (err > tol).any():
        return err
    lead, (C, m, d_in), d_out = A.shape[:-3], A.shape[-3:], B.shape[-2]
    Am = A.reshape(*lead, C * m, d_in).clone()
    Bm = B.movedim(-3, -2).reshape(*lead, d_out, C * m).clone()  # [*I, d_out, C·m]
    eye = torch.eye(C * m, dtype=A.dtype, device=A.device)
    for _ in range(max_rounds):
        todo = (err > tol).to(A.dtype)[..., None, None]
        if not todo.any():
            break
        for side in ("B", "A"):
            R = W - Bm @ Am
            if side == "B":
                G = Am @ Am.mT
                lam = LEAST_SQUARES_DAMPING * torch.linalg.eigvalsh(G)[..., -1:, None]
                Bm = Bm + todo * torch.linalg.solve(G + lam * eye, Am @ R.mT).mT
            else:
                G = Bm.mT @ Bm
                lam = LEAST_SQUARES_DAMPING * torch.linalg.eigvalsh(G)[..., -1:, None]
                Am = Am + todo * torch.linalg.solve(G + lam * eye, Bm.mT @ R)
        err = _relative_norm(W - Bm @ Am, W)
    A.copy_(Am.reshape(A.shape))
    B.copy_(Bm.reshape(*lead, d_out, C, m).movedim(-2, -3))
    return err


def _warn_rank_above_C(factors: Factors, target_weights: Mapping[str, Tensor]) -> None:
    """Warn for every matrix whose rank exceeds its number of rank-one subcomponents C (its rank is only
    computed when C < min(d_out, d_in)), with the smallest relative error C pieces can reach (the SVD's)."""
    short = []
    for n, A in factors.A.items():
        W, C = target_weights[n], A.shape[-3] * A.shape[-2]
        if C >= min(W.shape):
            continue
        s = torch.linalg.svdvals(W.detach().float())
        rank = int((s > s[0] * max(W.shape) * torch.finfo(s.dtype).eps).sum())
        if rank > C:
            short.append(f"{n!r} (C={C}, rank {rank}: at best {(s[C:].norm() / s.norm()).item():.1%} off)")
    if short:
        warnings.warn(f"C is below the rank of {', '.join(short)}: no C rank-one subcomponents sum to such a matrix, so "
                      "Σ_c U_c V_cᵀ stays off the weight and the Δ-component carries the rest; set C (or C_per_module) "
                      "to at least the rank for a faithful decomposition", stacklevel=4)  # fmt: skip


class SPD(Method):
    """Stochastic Parameter Decomposition (see the module docstring)."""

    name = "spd"
    config_class = SPDConfig
    loss_names = ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "ci_masked_recon", "importance_minimality",
                  "adversarial_recon")
    eval_mask_name = "ci"
    units = Units.per_matrix
    unit_noun = "subcomponent"
    sparsity_knob = "importance_minimality_coeff"
    key_settings = ("C", "ci_fn", "ci_hidden", "importance_minimality_coeff", "pnorm", "pnorm_final", "faithfulness_coeff", "lr")
    config: SPDConfig

    def vectorised(self) -> "SPD":
        """The default rules; the CI functions run eagerly inside the seeds' vmap (``compile_ci`` off).
        ``adversarial_recon`` is refused: its persistent sources belong to one run, which the seeds'
        instances (vmapped or one after another on the same component model) would share."""
        if self.config.coefficient("adversarial_recon") > 0:
            raise ConfigError("adversarial_recon keeps per-run adversarial sources, which seeds trained at once "
                              "(decompose_seeds / a seeds sweep in one process) cannot share; train each seed on its own")  # fmt: skip
        method = super().vectorised()
        return self._with(compile_ci=CompileCI.off) if self.config.compile_ci is not CompileCI.off else method  # type: ignore[return-value]

    def vmap_seeds(self, device: torch.device) -> bool:
        """Whether seeds trained at once (``decompose_seeds``) vmap their instances in each step: yes.
        One instance after another was faster per seed-step on the CPU (0.94x / 1.00x / 0.99x of a
        one-seed step against 1.21x / 1.51x / 1.25x vmapped: TMS 5-2, TMS 40-10, residual MLP 1 layer;
        one thread, shared machine, 2026-12-05), but a five-seed TMS 5-2 + ID run that way gave seed 4
        ML2R 0.931 against 1.006 vmapped and 0.9998 alone (seeds 0-3 alike either way); until that is
        understood the seeds stay vmapped, the path their results in docs/results were measured on."""
        return True

    def unit_scores(self, cm: ComponentModel, x: Tensor) -> dict[str, Tensor]:
        """The causal importances g (what the evaluation masks are)."""
        return self.causal_importances(cm, x)

    def mlp_units(self, W_E: Tensor, component_weights: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]]) -> MLPUnits:
        """The W_in subcomponents, each through its layer's decomposed W_out (SPEC §5.5)."""
        from apd.metrics.resid_mlp import spd_neuron_contributions, spd_unit_layers

        weights = dict(component_weights)
        nc, units = spd_neuron_contributions(W_E, weights, pairs)
        out_maps = {w_in: weights[w_out].sum(0, keepdim=True).expand(weights[w_in].shape[0], -1, -1) for w_in, w_out in pairs}
        return MLPUnits(nc=nc, layer=spd_unit_layers(units, pairs), out_maps=out_maps)

    def preset_note(self, steps: int, batch_size: int) -> str:
        m = self.config
        return (f"C={m.C} per matrix, CI function {m.ci_fn.value} {m.ci_hidden}, importance minimality "
                f"{m.importance_minimality_coeff:g} at p={m.pnorm:g}, {steps} steps, batch {batch_size}; "
                "evaluated with its causal importances as masks (L0: subcomponents with g > τ per input, summed over matrices)")  # fmt: skip

    def build(self, target: nn.Module, modules: Sequence[str], *, tied: Mapping[str, str] | None = None,
              seed: int | None = None) -> ComponentModel:  # fmt: skip
        c = self.config
        seed = c.seed if seed is None else seed
        C = components_per_module(c, resolve_modules(target, modules))
        cm = ComponentModel(target, modules, C, rank=1, tied=tied, init_scale=c.init_scale, seed=seed,
                            init=ComponentInit.kaiming)  # fmt: skip
        _check_C_per_module_keys(c, cm.matrix_names, cm.tied_names)
        generator = torch.Generator().manual_seed(seed + 1_000_003)  # the CI functions' own stream
        if c.ci_fn is CIFn.global_mlp:  # ---- VPD's global CI function: one network for every layer use
            widths = {n: (cm.layers[n].C, cm.layers[n].C if isinstance(cm.layers[n], EmbeddingComponents) else _d_in(cm, n),
                          isinstance(cm.layers[n], EmbeddingComponents)) for n in cm.layer_names}  # fmt: skip
            cm.set_method_module(CI_FNS, GlobalMLPCI(widths, list(c.ci_hidden), generator))
            if c.compile_ci is CompileCI.on:  # (auto decides for the mlp functions only)
                cm.method_module(CI_FNS).forward = torch.compile(cm.method_module(CI_FNS).forward)  # type: ignore[union-attr,method-assign]
            return cm.to(next(iter(cm.target_weights().values())).device)
        fns = {}
        for n in cm.layer_names:
            layer = cm.layers[n]
            reads_inner = isinstance(layer, EmbeddingComponents)
            fns[n] = make_ci_fn(c.ci_fn, layer.C, _d_in(cm, n), list(c.ci_hidden), generator, reads_inner)
            if c.compile_ci is CompileCI.on:
                fns[n].forward = torch.compile(fns[n].forward)  # type: ignore[method-assign]
        ci_fns = CIFunctions(fns, cm.layer_names)
        if c.compile_ci is CompileCI.auto and c.ci_fn is CIFn.mlp:
            ci_fns.auto_compile_steps = c.steps  # decided at the first training step (_auto_compile)
        cm.set_method_module(CI_FNS, ci_fns)
        return cm.to(next(iter(cm.target_weights().values())).device)

    def importances_from_inputs(self, cm: ComponentModel, a_in: Mapping[str, Tensor],
                                inner: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
        """(g, g⁺) per layer use from the layers' inputs ``a_in`` (and their inner activations, when
        already computed): the one causal-importance path (training, evaluation, users), squashed
        with this config's ``leaky_alpha``."""
        alpha, fns = self.config.leaky_alpha, ci_functions(cm)
        acts = {n: inner[n] if inner is not None else cm.layers[n].component_acts(a_in[n]) for n in cm.layer_names}
        if inner is not None and getattr(fns, "auto_compile_steps", None) is not None and torch.is_grad_enabled():  # a training step
            _auto_compile(fns, acts, self.config)
        lower, upper = {}, {}
        if isinstance(fns, GlobalMLPCI):  # ---- VPD's global CI function (apd.global_ci)
            emb = {n: acts[n] for n in cm.layer_names if fns.reads_inner[n]}
            for n, pre in fns(a_in, emb).items():
                lower[n], upper[n] = leaky_hard_sigmoids(at_least_float32(pre), alpha)
            return lower, upper
        for n in cm.layer_names:
            lower[n], upper[n] = leaky_hard_sigmoids(at_least_float32(fns.fn(n)(acts[n], a_in[n])), alpha)  # (bf16 steps: g in fp32)
        return lower, upper

    def causal_importances(self, cm: ComponentModel, x: Tensor, *, upper_leaky: bool = False) -> dict[str, Tensor]:
        """g_{l,c}(x) per layer use and position [*lead, C] from one target pass: the lower-leaky hard
        sigmoid of the CI functions (in [0, 1]; ``cm(x, masks=g)`` runs the model with them), or with
        ``upper_leaky=True`` the minimality loss's upper-leaky g⁺ (which may exceed 1)."""
        with cm.capture(cm.layer_names, inputs=True) as a_in:
            cm(x)
        lower, upper = self.importances_from_inputs(cm, a_in)
        return upper if upper_leaky else lower

    def step_context(self, cm: ComponentModel, x: Tensor, step: int, capture: Sequence[str] = ()) -> SPDStep:
        calls: list[str] = []  # the layer uses in call order (decomposed layers are leaf modules)
        # no call record under compile=True: the masked passes' reuse swaps module forwards, which a
        # compiled frame resumed after a graph break cannot undo (is_compiling() is False in the eager part)
        compiled = self.config.compile or torch.compiler.is_compiling()
        record = contextlib.nullcontext() if compiled else cm.record_calls()
        # (in float32 under precision=bf16: the outputs every reconstruction loss compares with, and the
        # activations the masked passes reuse)
        with torch.no_grad(), full_precision(), cm.capture(cm.layer_names, inputs=True, calls=calls) as a_in, record as rec:
            target_out = cm(x)
        # computed once with their graph: the CI functions read them, and the masked forwards reuse them
        # where a layer receives the target's input (SPDStep.inner_acts)
        inner = {n: cm.layers[n].component_acts(a_in[n]) for n in cm.layer_names}
        ci, ci_upper = self.importances_from_inputs(cm, a_in, inner)
        counts = Counter(calls)
        return SPDStep(cm=cm, x=x, config=self.config, step=step, target_out=target_out, ci=ci, ci_upper=ci_upper,
                       inner=inner, call_order=tuple(counts), called_once=frozenset(n for n, k in counts.items() if k == 1),
                       record=rec)  # fmt: skip

    def warmup(self, factors: Factors, target_weights: Mapping[str, Tensor]) -> None:
        """The faithfulness warm-up: ``faithfulness_warmup_steps`` AdamW steps on ‖W − Σ_c B_c A_c‖²/N
        alone, then the least-squares fit of every matrix still off by more than ``faithfulness_warmup_tol``
        (factors may carry a leading instance dimension; instances stay independent). A matrix whose rank
        exceeds its C gets a warning (no C rank-one pieces sum to it)."""
        c = self.config
        _warn_rank_above_C(factors, target_weights)
        if c.faithfulness_warmup_steps > 0:
            params = [*factors.A.values(), *factors.B.values()]
            opt = torch.optim.AdamW(params, lr=c.faithfulness_warmup_lr, weight_decay=c.faithfulness_warmup_weight_decay)
            for _ in range(c.faithfulness_warmup_steps):
                summed = {n: torch.einsum("...com,...cmi->...oi", factors.B[n], A) for n, A in factors.A.items()}
                loss = faithfulness_loss(target_weights, summed)  # /N (instances summed: each its own run)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                opt.step()
            for p in params:
                p.grad = None
        if c.faithfulness_warmup_tol is not None:
            off = {}
            with torch.no_grad():
                for n, A in factors.A.items():
                    err = least_squares_fit(A, factors.B[n], target_weights[n], c.faithfulness_warmup_tol)
                    if err.max() > c.faithfulness_warmup_tol:
                        off[n] = err.max().item()
            if off:
                warnings.warn(f"the faithfulness warm-up left {', '.join(f'{n!r} {e:.1%}' for n, e in off.items())} off its "
                              f"weight (relative Frobenius error; faithfulness_warmup_tol={c.faithfulness_warmup_tol:g}): "
                              "Σ_c U_c V_cᵀ differs from W there and the Δ-component carries the rest; raise C for them",
                              stacklevel=3)  # fmt: skip

    def training_state(self, cm: ComponentModel) -> dict[str, Tensor]:
        """The persistent adversarial sources of ``adversarial_recon`` (none when it is off)."""
        return persistent_sources(cm).state_dict() if self.config.coefficient("adversarial_recon") > 0 else {}

    def load_training_state(self, cm: ComponentModel, state: Mapping[str, Tensor]) -> None:
        persistent_sources(cm).load_state_dict(state, self.config.device)

    def eval_masks(self, cm: ComponentModel, x: Tensor) -> Masks:
        """The causal importances g per layer use (lower-leaky, in [0, 1])."""
        with torch.no_grad():
            return self.causal_importances(cm, x)

    def active_threshold(self) -> float:
        return self.config.ci_threshold

    unit_score_noun = "causal importance"

    def unit_selection(self) -> str:
        return f"causal importance g_c > \u03c4 = {self.config.ci_threshold:g}"

    def mask_l0(self, masks: Masks) -> dict[str, float]:
        tau = self.config.ci_threshold
        assert isinstance(masks, Mapping)
        per = {f"l0/{n}": (g > tau).float().sum(-1).mean().item() for n, g in masks.items()}
        return {"l0": sum(per.values()), **per}

    def eval_metrics(self, cm: ComponentModel, x: Tensor, masks: Masks, target_out: Tensor, *,
                     valid: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
        """Thresholded-CI reconstruction, per-layer mean CI, alive subcomponents (g > τ somewhere),
        and the layers whose gates saturate (g > τ on > 90% of (input, subcomponent) pairs) or all die;
        over the positions ``valid`` keeps (all when None)."""
        assert isinstance(masks, Mapping)
        tau = self.config.ci_threshold
        with torch.no_grad():
            hard = {n: (g > tau).to(g.dtype) for n, g in masks.items()}
            out: dict[str, Any] = {"ci_thresholded_recon_mse": masked_mean((cm(x, masks=hard) - target_out).pow(2), valid).item()}
            saturated, dead = [], []
            for n, g in valid_rows(masks, valid).items():
                on = g > tau
                rows = on.reshape(-1, on.shape[-1])
                out[f"ci_mean/{n}"] = g.mean().item()
                out[f"n_alive/{n}"] = float(rows.any(0).sum())
                if rows.float().mean() > 0.9:
                    saturated.append(n)
                if not rows.any():
                    dead.append(n)
            out["ci_saturated_layers"] = saturated
            out["ci_dead_layers"] = dead
        return out

    def run_warnings(self, metrics: Mapping[str, Any]) -> list[str]:
        out = []
        if metrics.get("ci_saturated_layers"):
            out.append(f"the causal importances of {metrics['ci_saturated_layers']} saturate (g > τ on over 90% of inputs and "
                       "subcomponents): importance_minimality_coeff is too low for them, or C too small; raise the "
                       "coefficient (x3) or C")  # fmt: skip
        if metrics.get("ci_dead_layers"):
            out.append(f"every subcomponent of {metrics['ci_dead_layers']} is inactive on every input (g <= τ): "
                       "importance_minimality_coeff is too high; lower it (/3)")  # fmt: skip
        return out

