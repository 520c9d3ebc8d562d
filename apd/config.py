"""APDConfig: every knob of a decomposition, validated on construction (SPEC §1)."""

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["APDConfig", "Attribution", "GradientMode", "LRSchedule", "OutputLoss", "ConfigError"]


class ConfigError(ValueError):
    """A config value is out of range or unknown; the message names the field and the fix."""


class Attribution(str, Enum):
    """How the importance A_c(x) of component c on input x is computed (SPEC §1.2)."""

    gradient = "gradient"
    ablation = "ablation"
    activation = "activation"


class GradientMode(str, Enum):
    """How the gradient attribution is computed (``apd.attributions.gradient_attributions``);
    every mode gives the same numbers to rounding, their speed differs by target."""

    per_sample = "per_sample"
    hidden = "hidden"
    jacfwd = "jacfwd"
    jacrev = "jacrev"


class LRSchedule(str, Enum):
    """Learning-rate shape after the linear warm-up."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class OutputLoss(str, Enum):
    """Distance between target and decomposed outputs in the minimality loss (SPEC §1.4)."""

    mse = "mse"
    kl = "kl"  # outputs are logits over the last dimension


def _enum(cls: type[Enum], name: str, value: Any) -> Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{name}={value!r} is not known; choose one of {choices}") from None


@dataclass(kw_only=True)
class APDConfig:
    """Hyperparameters of one APD run. Plain strings are accepted for the Enum fields."""

    # components
    C: int = 8
    """number of parameter components"""
    rank: int | None = None
    """rank budget m per component and matrix; None = full rank min(d_in, d_out)"""
    init_scale: float = 1.0
    """scale of the random initialisation relative to a norm-matched start"""

    # selection
    topk: float | None = 1.0
    """k active components per sample (may be fractional with batch_topk); None = no top-k"""
    batch_topk: bool = True
    topk_start: float | None = None
    """k at step 0 of a batch top-k schedule: k moves linearly from topk_start to topk over the
    first topk_anneal_frac of the steps, then stays at topk; None = topk throughout"""
    topk_anneal_frac: float = 0.5
    """fraction of the steps over which k moves from topk_start to topk"""
    min_active: int = 0
    """during training, each component is also selected on the min_active samples of the batch
    where its attribution is largest (0 = off; evaluation always uses plain top-k)"""
    attribution: Attribution = Attribution.gradient
    gradient_mode: GradientMode | None = None
    """computation of the gradient attribution during training; None = the library's default.
    The default ('auto') takes 'hidden' (one batched Jacobian) on small problems such as TMS 5-2 and
    'per_sample' above them; benchmarks/ times the modes against each other"""

    # losses
    faithfulness_coeff: float = 1.0
    minimality_coeff: float = 1.0
    simplicity_coeff: float = 1.0
    schatten_p: float = 1.0
    schatten_eps: float = 1e-12
    """added inside the Schatten power: the gradient of x^(p/2) blows up at 0"""
    output_loss: OutputLoss = OutputLoss.mse
    act_recon_coeff: float | None = None
    """coefficient of the hidden-activation reconstruction loss; None = off"""
    act_recon_modules: list[str] = field(default_factory=list)
    """module-name patterns whose outputs are reconstructed (e.g. post-ReLU modules)"""
    lp_sparsity_coeff: float | None = None
    """coefficient of the L_p penalty on attributions (the paper's alternative to top-k)"""
    lp_sparsity_p: float = 1.0

    # optimisation
    steps: int = 10_000
    lr: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_frac: float = 0.0
    optimizer: str = "adam"
    """'adam', 'adamw' or a torch-optimizer name whose state can be saved (see OPTIMIZERS)"""
    grad_clip_norm: float | None = None
    unit_norm_A: bool = False
    """renormalise each rank-1 row of A to unit norm every step (SPEC §1.5)"""
    finetune_frac: float = 0.0
    """final fraction of the steps trained with the simplicity penalty off (faithfulness + minimality
    (+ act recon, L_p) only, top-k unchanged): undoes the shrinkage the Schatten penalty causes"""
    finetune_lr: float | None = None
    """constant learning rate during the fine-tune; None = the main schedule continues"""
    merge_threshold: float | None = None
    """at the start of the fine-tune, merge components whose weights are parallel (cosine over all
    matrices >= this) into one and zero the rest (``apd.merge``); None = never merge"""
    compile: bool = False
    """run each step's loss computation through ``torch.compile`` (``decompose`` only). On the 2-core
    CPU of benchmarks/README.md it did not pay: 0.9-1.1x the eager step, after 8-48 s of compiling"""
    seed: int = 0
    device: str = "cpu"

    # bookkeeping
    log_every: int = 100
    checkpoint_every: int | None = None
    """steps between checkpoints when a checkpoint directory is given (None = only at the end)"""

    def __post_init__(self) -> None:
        self.attribution = _enum(Attribution, "attribution", self.attribution)
        if self.gradient_mode is not None:
            self.gradient_mode = _enum(GradientMode, "gradient_mode", self.gradient_mode)
        self.lr_schedule = _enum(LRSchedule, "lr_schedule", self.lr_schedule)
        self.output_loss = _enum(OutputLoss, "output_loss", self.output_loss)
        self.act_recon_modules = list(self.act_recon_modules)
        self._check_ranges()
        from apd.optim import check_optimizer_name  # late: optim imports torch_optimizer

        self.optimizer = check_optimizer_name(self.optimizer)

    def _check_ranges(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(isinstance(self.C, int) and self.C > 0, f"C={self.C!r}: the number of components must be a positive int")
        need(
            self.rank is None or (isinstance(self.rank, int) and self.rank > 0),
            f"rank={self.rank!r}: use a positive int, or None for full rank",
        )
        need(
            self.gradient_mode is None or self.attribution is Attribution.gradient,
            f"gradient_mode={self.gradient_mode} applies to attribution='gradient' only "
            f"(attribution={self.attribution.value!r}): set gradient_mode=None",
        )
        need(self.init_scale > 0, f"init_scale={self.init_scale}: must be > 0")
        if self.topk is not None:
            need(self.topk > 0, f"topk={self.topk}: must be > 0 (or None to switch top-k off)")
            need(self.topk <= self.C, f"topk={self.topk} > C={self.C}: k cannot exceed the number of components")
            need(
                self.batch_topk or float(self.topk).is_integer(),
                f"topk={self.topk}: per-sample top-k needs a whole number; set batch_topk=True for fractional k",
            )
        if self.topk_start is not None:
            need(self.topk is not None, "topk_start is set but topk=None: a k schedule needs top-k on")
            need(
                0 < self.topk_start <= self.C,
                f"topk_start={self.topk_start}: must lie in (0, C={self.C}]",
            )
            need(self.batch_topk, "topk_start: a k schedule passes fractional k; set batch_topk=True")
            need(0 < self.topk_anneal_frac <= 1, f"topk_anneal_frac={self.topk_anneal_frac}: must lie in (0, 1]")
        need(self.min_active >= 0, f"min_active={self.min_active}: must be >= 0 (0 = off)")
        need(self.min_active == 0 or self.topk is not None, "min_active needs top-k on (topk is None)")
        if self.topk is None:
            need(
                self.lp_sparsity_coeff is not None,
                "topk=None switches top-k off: set lp_sparsity_coeff so something makes the decomposition sparse",
            )
        for name in (
            "faithfulness_coeff",
            "minimality_coeff",
            "simplicity_coeff",
            "act_recon_coeff",
            "lp_sparsity_coeff",
            "grad_clip_norm",
        ):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v >= 0), f"{name}={v}: must be a finite number >= 0")
        need(0 < self.schatten_p <= 2, f"schatten_p={self.schatten_p}: must lie in (0, 2] (the paper uses 0.9 or 1)")
        need(0 < self.lp_sparsity_p <= 2, f"lp_sparsity_p={self.lp_sparsity_p}: must lie in (0, 2]")
        need(self.schatten_eps >= 0, f"schatten_eps={self.schatten_eps}: must be >= 0")
        need(
            self.act_recon_coeff is None or len(self.act_recon_modules) > 0,
            "act_recon_coeff is set but act_recon_modules is empty: name the modules whose outputs to reconstruct",
        )
        need(isinstance(self.steps, int) and self.steps > 0, f"steps={self.steps!r}: must be a positive int")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr}: must be > 0")
        need(0 <= self.warmup_frac < 1, f"warmup_frac={self.warmup_frac}: must lie in [0, 1)")
        need(0 <= self.finetune_frac < 1, f"finetune_frac={self.finetune_frac}: must lie in [0, 1) (0 = no fine-tune)")
        need(
            self.finetune_lr is None or (math.isfinite(self.finetune_lr) and self.finetune_lr > 0),
            f"finetune_lr={self.finetune_lr}: must be > 0, or None to continue the main schedule",
        )
        if self.merge_threshold is not None:
            need(
                0 < self.merge_threshold <= 1,
                f"merge_threshold={self.merge_threshold}: a cosine threshold must lie in (0, 1] (e.g. 0.99), or None",
            )
            need(
                self.finetune_frac > 0,
                f"merge_threshold={self.merge_threshold} merges at the start of the fine-tune, but finetune_frac=0: "
                "set finetune_frac > 0 (e.g. 0.1) so the merged components are re-fitted",
            )
        need(self.log_every > 0, f"log_every={self.log_every}: must be > 0")
        need(
            self.checkpoint_every is None or self.checkpoint_every > 0,
            f"checkpoint_every={self.checkpoint_every}: must be > 0 or None",
        )

    @property
    def finetune_start(self) -> int:
        """First step of the unpenalised fine-tune (= steps when there is none)."""
        return self.steps - round(self.finetune_frac * self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (Enums as their string values)."""
        d = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "APDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown APDConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)
