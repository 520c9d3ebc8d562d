"""What every decomposition method's config shares: optimisation, schedule, seed, bookkeeping.

A method's config (``apd.APDConfig``, ``apd.SPDConfig``) subclasses :class:`MethodConfig` and adds
its own fields. Every config is validated on construction: a value of the wrong type or out of
range raises :class:`ConfigError` naming the field and the fix. Plain strings are accepted for the
Enum fields.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "MethodConfig",
    "Attribution",
    "GradientMode",
    "LRSchedule",
    "OutputLoss",
    "Precision",
    "FaithfulnessNorm",
    "check_types",
    "need",
    "OPTIMIZERS",
    "check_optimizer_name",
    "TORCH_OPTIMIZER_NAMES",
]


class ConfigError(ValueError):
    """A config value has the wrong type, is out of range or unknown; the message names the field and the fix."""


class Attribution(str, Enum):
    """How the importance A_c(x) of component c on input x is computed (SPEC §1.2)."""

    gradient = "gradient"
    ablation = "ablation"
    activation = "activation"


class GradientMode(str, Enum):
    """How the gradient attribution is computed (``apd.attributions.gradient_attributions``);
    every mode gives the same numbers to rounding, their speed differs by target."""

    auto = "auto"
    per_sample = "per_sample"
    hidden = "hidden"
    jacfwd = "jacfwd"
    jacrev = "jacrev"


class LRSchedule(str, Enum):
    """Learning-rate shape after the linear warm-up.

    ``cosine`` is the half cosine 0.5·(1 + cos(π·progress)); ``quarter_cosine`` is the reference
    APD code's (ApolloResearch/apd ``get_lr_schedule_fn``): cos(π/2 · s / (S − 1)) over the S
    steps after the warm-up, which stays higher for longer and reaches 0 at the last step."""

    constant = "constant"
    cosine = "cosine"
    quarter_cosine = "quarter_cosine"
    linear = "linear"


class OutputLoss(str, Enum):
    """Distance between the target's outputs and the decomposed model's (SPEC §1.4, §5.3)."""

    mse = "mse"
    kl = "kl"  # outputs are logits over the last dimension


class FaithfulnessNorm(str, Enum):
    """What the faithfulness loss divides each matrix's ‖W − Σ_c P_c‖² by (``SPDConfig.faithfulness_norm``)."""

    entries = "entries"  # N, the decomposed weights' entries, summed over matrices (the papers' loss; APD's always)
    relative = "relative"  # ‖W_l‖² per matrix, averaged over matrices: a scale-free coefficient


class Precision(str, Enum):
    """The number format of a training step's matrix products (``MethodConfig.precision``)."""

    fp32 = "fp32"
    bf16 = "bf16"  # bfloat16 matmuls via torch.autocast; parameters, optimiser state and evaluation stay float32


# The optimisers offered by name (``MethodConfig.optimizer``; ``apd.optim.make_optimizer`` builds them).
# torch-optimizer classes whose state survives torch.save + torch.load(weights_only=True) +
# load_state_dict on torch 2.x (checked by tests/test_config.py::test_every_offered_optimizer_
# steps_and_checkpoints). Left out: Lookahead (cannot save its state on modern torch) and
# Adahessian (needs create_graph=True backward passes).
TORCH_OPTIMIZER_NAMES = (
    "A2GradExp", "A2GradInc", "A2GradUni", "AccSGD", "AdaBelief", "AdaBound", "AdaMod",
    "Adafactor", "AdamP", "AggMo", "Apollo", "DiffGrad", "LARS", "Lamb", "MADGRAD", "NovoGrad",
    "PID", "QHAdam", "QHM", "RAdam", "Ranger", "RangerQH", "RangerVA", "SGDP", "SGDW", "SWATS",
    "Shampoo", "Yogi",
)  # fmt: skip
_UNSUPPORTED = {"lookahead": "its state cannot be saved on modern torch", "adahessian": "it needs second-order backward passes"}
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw") + tuple(n.lower() for n in TORCH_OPTIMIZER_NAMES)


def check_optimizer_name(name: str) -> str:
    """Normalise an optimiser name (case-insensitive) or raise naming the choices."""
    key = str(name).lower()
    if key in _UNSUPPORTED:
        raise ConfigError(f"optimizer={name!r} is not offered: {_UNSUPPORTED[key]}; use 'adam' or 'adamw'")
    if key not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    return key


def need(ok: bool, msg: str) -> None:
    """Raise ``ConfigError(msg)`` unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _conforms(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``, and the value converted (enum strings, ints as floats)."""
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _conforms(value, arg)
            if ok:
                return True, v
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_conforms(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, tp):
            return True, value
        try:
            return True, tp(value)
        except ValueError:
            return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def check_types(cfg: Any) -> None:
    """Check every dataclass field of ``cfg`` against its annotation, converting enum strings to
    their Enum and ints to floats where a float is expected; raise one ``ConfigError`` naming the
    field, the value and the expected type otherwise."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        value = getattr(cfg, f.name)
        ok, converted = _conforms(value, tp)
        if not ok:
            raise ConfigError(f"{type(cfg).__name__}.{f.name}={value!r}: expected {_describe(tp)}")
        object.__setattr__(cfg, f.name, converted)


@dataclass(kw_only=True)
class MethodConfig:
    """Optimisation, schedule and bookkeeping fields shared by every decomposition method.

    Subclasses set ``method`` (the registry name: ``apd.methods.METHODS``) and extend
    ``_check_ranges``.
    """

    method: ClassVar[str] = "base"

    steps: int = 10_000
    lr: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_frac: float = 0.0
    optimizer: str = "adam"
    """'adam', 'adamw' or a torch-optimizer name whose state can be saved (see ``apd.OPTIMIZERS``)"""
    grad_clip_norm: float | None = None
    """clip the gradient of every trainable tensor together to this norm (per seed when several are trained at once)"""
    compile: bool = False
    """run each step's loss computation through ``torch.compile`` (single-seed runs). On the 2-core
    CPU of benchmarks/README.md it did not pay for APD: 0.9-1.1x the eager step, after 8-48 s of compiling"""
    seed: int = 0
    device: str = "cpu"
    precision: Precision = Precision.fp32
    """``bf16``: the matrix products of each training step's forward and backward run in bfloat16
    (``torch.autocast`` on ``device``'s type, cpu or cuda; ``apd.precision``), everything else as in
    fp32: parameters, optimiser state, checkpoints, the losses' last sums, SPD's target pass, its
    faithfulness warm-up and all evaluation stay float32. It pays where the step is matmul-bound: one
    thread of an AMD EPYC with avx512_bf16, ``python -m benchmarks.bf16_step time ...`` (2026-12-05):
    residual MLP 1/3 layers 1.30x/1.36x, LM 1.57x faster, TMS 5-2 0.86x (its step is elementwise work). Quality and
    one-step accuracy: docs/guide/precision.md"""
    log_every: int = 100
    checkpoint_every: int | None = None
    """steps between checkpoints when a checkpoint directory is given (None = only at the end)"""

    def __post_init__(self) -> None:
        check_types(self)
        self._check_ranges()
        self.optimizer = check_optimizer_name(self.optimizer)

    def _check_ranges(self) -> None:
        name = type(self).__name__
        need(self.steps > 0, f"{name}.steps={self.steps}: must be a positive whole number")
        need(math.isfinite(self.lr) and self.lr > 0, f"{name}.lr={self.lr}: must be > 0")
        need(0 <= self.warmup_frac < 1, f"{name}.warmup_frac={self.warmup_frac}: must lie in [0, 1)")
        need(self.log_every > 0, f"{name}.log_every={self.log_every}: must be > 0")
        need(self.checkpoint_every is None or self.checkpoint_every > 0,
             f"{name}.checkpoint_every={self.checkpoint_every}: must be > 0, or None for only at the end")  # fmt: skip
        if self.precision is Precision.bf16:
            kind = self.device.split(":")[0]
            need(kind in ("cpu", "cuda"), f"{name}.precision=bf16 with device={self.device!r}: bfloat16 autocast is offered "
                                          "on cpu and cuda devices only; use precision=fp32 on this device")  # fmt: skip
        for f in dataclasses.fields(self):
            if f.name.endswith("_coeff") or f.name == "grad_clip_norm":
                v = getattr(self, f.name)
                need(v is None or (math.isfinite(v) and v >= 0), f"{name}.{f.name}={v}: must be a finite number >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (Enums as their string values)."""
        d = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def coefficient(self, loss: str) -> float:
        """The coefficient of the registered loss ``loss`` (its ``<loss>_coeff`` field; 0 when None)."""
        v = getattr(self, f"{loss}_coeff", None)
        return 0.0 if v is None else float(v)
