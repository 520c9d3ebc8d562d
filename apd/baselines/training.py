"""Training loop for the SAE baselines: data -> init -> step -> dead-latent tracking -> TrainResult.

Usual practice (Bricken et al. 2023, Gao et al. 2024, SAELens): b_dec starts at the geometric median
(or mean) of a data sample of the reconstruction target, W_dec rows start small with W_enc = W_dec.T,
Adam with a linear learning-rate warm-up, an optional warm-up of the sparsity coefficient, the
gradient norm of all SAE parameters together clipped to 1.0 every step (SAELens's trainer does), and
per-latent "tokens since last fired" counters that mark dead latents for the AuxK loss, and
optionally Bricken et al.'s resampling of dead latents at given steps (``apd.baselines.resampling``).

Data is either a tensor ``[N, d_in]`` (autoencoder), a pair ``(inputs [N, d_in], targets
[N, d_out])`` (transcoder), or a callable ``(batch_size, generator) -> tensor | pair`` that draws a
fresh batch. Everything random draws from generators seeded by ``seed``, so a run is reproducible.

Convergence (``eval_every`` > 0): every ``eval_every`` steps a metric is recorded on one fixed
held-out batch (by default FVU and L0 on ``eval_sample_size`` rows drawn once; a caller's
``evaluate`` function, e.g. the language model's loss recovered, instead), the curve is kept in
:attr:`TrainResult.curve`, and :class:`apd.baselines.convergence.ConvergenceRule` says whether its
last ``converge_window`` of training is flat; with ``until_converged`` training stops there, ``steps``
being the cap (a warning names it when it is hit first).
"""

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apd.config import LRSchedule  # the same schedule choices as APD runs

from .base import SAE, TrainStepInput
from .convergence import ConvergenceRule
from .resampling import resample_dead_latents

__all__ = [
    "BDecInit",
    "SAETrainConfig",
    "SAEData",
    "SAEEvaluate",
    "DeadLatentTracker",
    "TrainResult",
    "geometric_median",
    "sae_lr_at_step",
    "train_sae",
]

Batch: TypeAlias = Tensor | tuple[Tensor, Tensor]
SAEData: TypeAlias = Tensor | tuple[Tensor, Tensor] | Callable[[int, torch.Generator], Batch]
SAEEvaluate: TypeAlias = Callable[[SAE], dict[str, float]]
"""a held-out evaluation of the SAE (called in eval mode, without gradients): metric name -> value"""


class BDecInit(str, Enum):
    """How b_dec is initialised before training."""

    geometric_median = "geometric_median"
    mean = "mean"
    zeros = "zeros"


@dataclass(kw_only=True)
class SAETrainConfig:
    """Hyperparameters of :func:`train_sae`. Plain strings are accepted for the Enum fields."""

    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 0
    """linear learning-rate warm-up from lr/warmup_steps to lr"""
    lr_schedule: LRSchedule = LRSchedule.constant
    sparsity_warmup_steps: int = 0
    """linear warm-up of the l1 / l0 coefficient from 0 (0 = full strength from the start)"""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip_norm: float | None = 1.0
    """clip the norm of all SAE parameters' gradients together to this every step, after
    ``before_optimizer_step`` and before the optimiser step, as SAELens's trainer does (at 1.0);
    None = no clipping. On TMS 40-10 a JumpReLU SAE (width 80, l0_coeff 0.1) recovered every feature
    in 0 of 3 seeds without it and 2 of 3 with it, as SAELens's does"""
    seed: int = 0
    reinitialize: bool = True
    """redraw the weights from ``seed`` and set b_dec from data; False continues from the given weights"""
    b_dec_init: BDecInit = BDecInit.geometric_median
    init_sample_size: int = 4096
    """rows of data used to initialise b_dec"""
    dead_tokens_threshold: int = 10_000
    """a latent is dead once it has not fired on this many consecutive training samples"""
    resample_steps: list[int] = field(default_factory=list)
    """before each of these (0-based) steps, re-initialise the latents that have not fired on the last
    ``resample_window`` training samples (Bricken et al. 2023; ``apd.baselines.resampling``); empty =
    never. Bricken et al. resampled at 25k, 50k, 75k and 100k of their steps"""
    resample_window: int = 100_000
    """a latent is resampled when it has not fired on this many consecutive training samples (a
    resampled latent's count restarts at 0, so it gets a full window before it can be resampled again)"""
    resample_sample_size: int = 16_384
    """fresh samples whose reconstruction losses pick the new directions"""
    resample_encoder_scale: float = 0.2
    """a resampled encoder column's norm, as a fraction of the live latents' mean encoder norm"""
    eval_every: int = 0
    """record the held-out metrics every this many steps (and after the last); 0 = no curve"""
    eval_sample_size: int = 4096
    """rows of the fixed held-out batch of the default evaluation (FVU, L0); drawn once from the data
    with a generator of its own, so the training batches are those of a run without a curve"""
    converge_metric: str = "fvu"
    """the curve judged by the convergence rule (a key of the evaluation; the language-model
    comparison: loss_recovered)"""
    converge_window: float = 0.2
    """the last fraction of training that must be flat"""
    converge_tol: float = 0.005
    """flat: the fitted change of ``converge_metric`` over the window is below this (absolute)"""
    until_converged: bool = False
    """stop at the first evaluation where the curve is flat (needs ``eval_every``); ``steps`` is then
    the cap, and a warning names it when it is reached unconverged"""

    def __post_init__(self) -> None:
        self.resample_steps = sorted({int(s) for s in self.resample_steps})
        if not isinstance(self.b_dec_init, BDecInit):
            self.b_dec_init = _enum(BDecInit, "b_dec_init", self.b_dec_init)
        if not isinstance(self.lr_schedule, LRSchedule):
            self.lr_schedule = _enum(LRSchedule, "lr_schedule", self.lr_schedule)
        for name in ("steps", "batch_size", "init_sample_size", "dead_tokens_threshold", "resample_window",
                     "resample_sample_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = no warm-up)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.grad_clip_norm is not None and not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise ValueError(f"grad_clip_norm={self.grad_clip_norm} must be a finite number > 0, or None to switch clipping off")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        bad = [s for s in self.resample_steps if not 0 < s < self.steps]
        if bad:
            raise ValueError(f"resample_steps {bad} must lie in [1, steps={self.steps}): resampling happens before "
                             "those steps, after at least one")  # fmt: skip
        if not self.resample_encoder_scale > 0:
            raise ValueError(f"resample_encoder_scale={self.resample_encoder_scale} must be > 0 (Bricken et al.: 0.2)")
        if self.eval_every < 0 or self.eval_sample_size <= 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0 (0 = no curve) and eval_sample_size="
                             f"{self.eval_sample_size} > 0")  # fmt: skip
        if not 0 < self.converge_window <= 1 or not self.converge_tol > 0:
            raise ValueError(f"converge_window={self.converge_window} must lie in (0, 1] (e.g. 0.2, the last 20% of "
                             f"training) and converge_tol={self.converge_tol} be > 0 (e.g. 0.005)")  # fmt: skip
        if self.until_converged and not self.eval_every:
            raise ValueError("until_converged needs a curve to judge: set eval_every > 0 (e.g. steps // 50)")
        if self.until_converged and self.lr_schedule is not LRSchedule.constant:
            raise ValueError(f"until_converged with lr_schedule={self.lr_schedule.value}: a learning rate decaying "
                             "towards the step cap flattens the curve by itself; use lr_schedule=constant, or "
                             "until_converged=false to only report whether the curve is flat")  # fmt: skip

    @property
    def convergence_rule(self) -> ConvergenceRule:
        return ConvergenceRule(window=self.converge_window, tol=self.converge_tol)

    @property
    def last_schedule_step(self) -> int:
        """The step after which nothing scheduled changes the training any more (the learning-rate and
        sparsity warm-ups, the last resampling): the convergence window must start after it."""
        return max([self.warmup_steps, self.sparsity_warmup_steps, *[s + 1 for s in self.resample_steps]])

    def window_clear(self, steps_done: int) -> bool:
        """Whether the last ``converge_window`` of ``steps_done`` steps starts after :attr:`last_schedule_step`."""
        return (1 - self.converge_window) * steps_done >= self.last_schedule_step


def _enum(cls: type[Enum], name: str, value: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name}={value!r} is not known; choose one of {choices}") from None


def sae_lr_at_step(cfg: SAETrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then the configured schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule is LRSchedule.constant:
        return cfg.lr
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_schedule is LRSchedule.cosine:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "n d"], max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8
) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to ``points``."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (median.norm() + eps):
            break
    return median.float()


class DeadLatentTracker:
    """Per-latent counters of training samples (tokens) and steps since the latent last fired.

    A latent that fires on sample i of a batch of B has B − 1 − i tokens since it fired after the
    batch. ``dead`` marks latents silent for at least ``dead_tokens_threshold`` tokens; before that
    many tokens have been seen nothing is dead.
    """

    def __init__(self, d_sae: int, dead_tokens_threshold: int, device: torch.device | str = "cpu") -> None:
        self.dead_tokens_threshold = dead_tokens_threshold
        self.tokens_since_fired: Int[Tensor, " d_sae"] = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.steps_since_fired: Int[Tensor, " d_sae"] = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fire_count: Int[Tensor, " d_sae"] = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, feature_acts: Float[Tensor, "... d_sae"]) -> None:
        fired = feature_acts.detach().reshape(-1, feature_acts.shape[-1]) != 0  # (B, d_sae)
        B = fired.shape[0]
        positions = torch.arange(B, device=fired.device)[:, None].expand_as(fired)
        last = torch.where(fired, positions, torch.full_like(positions, -1)).max(dim=0).values
        any_fired = last >= 0
        self.tokens_since_fired = torch.where(any_fired, B - 1 - last, self.tokens_since_fired + B)
        self.steps_since_fired = torch.where(any_fired, 0, self.steps_since_fired + 1)
        self.fire_count += fired.sum(dim=0)
        self.n_tokens += B

    @property
    def dead(self) -> Bool[Tensor, " d_sae"]:
        return self.tokens_since_fired >= self.dead_tokens_threshold

    def silent_for(self, n_tokens: int) -> Bool[Tensor, " d_sae"]:
        """Latents that have not fired on the last ``n_tokens`` samples (none before that many are seen)."""
        return self.tokens_since_fired >= n_tokens

    @torch.no_grad()
    def restart(self, latents: Int[Tensor, " n"]) -> None:
        """Count ``latents`` as having just fired (after they were re-initialised)."""
        latents = latents.to(self.tokens_since_fired.device)
        self.tokens_since_fired[latents] = 0
        self.steps_since_fired[latents] = 0

    @property
    def firing_frequency(self) -> Float[Tensor, " d_sae"]:
        """Fraction of the samples seen so far on which each latent fired."""
        return self.fire_count.float() / max(1, self.n_tokens)


@dataclass
class TrainResult:
    """What :func:`train_sae` returns; the SAE is trained in place and also returned here."""

    sae: SAE
    cfg: SAETrainConfig
    losses: dict[str, Float[Tensor, " steps"]]
    """per-step named losses ("loss" is the total; "mse" plus "l1" / "aux" / "l0")"""
    metrics: dict[str, Float[Tensor, " steps"]]
    """per-step metrics: "l0" (mean active latents), "n_dead", "lr", "n_resampled" (latents
    re-initialised before the step)"""
    tracker: DeadLatentTracker
    seconds: float
    curve: dict[str, Float[Tensor, " n_evals"]] = field(default_factory=dict)
    """held-out metrics every ``cfg.eval_every`` steps: "step" (steps done) and each metric; empty
    without ``eval_every``"""
    converged: bool | None = None
    """the convergence rule on ``curve[cfg.converge_metric]`` (and its window after every warm-up and
    resampling); None without a curve"""
    curve_change: float = math.nan
    """the fitted change of ``cfg.converge_metric`` over the last ``cfg.converge_window`` of training"""
    dead_latents: Bool[Tensor, " d_sae"] = field(init=False)
    firing_frequency: Float[Tensor, " d_sae"] = field(init=False)

    def __post_init__(self) -> None:
        self.dead_latents = self.tracker.dead.cpu()
        self.firing_frequency = self.tracker.firing_frequency.cpu()

    @property
    def final_losses(self) -> dict[str, float]:
        return {name: float(v[-1]) for name, v in self.losses.items()}

    @property
    def steps(self) -> int:
        """Steps trained (fewer than ``cfg.steps`` when ``until_converged`` stopped early)."""
        return int(self.metrics["lr"].numel())

    def curve_record(self) -> dict[str, Any]:
        """The curve and the verdict as plain JSON-able values (for a run's metrics)."""
        return {"steps_trained": self.steps, "converged": self.converged,
                "curve_change": None if math.isnan(self.curve_change) else self.curve_change,
                "converge_metric": self.cfg.converge_metric, "converge_window": self.cfg.converge_window,
                "converge_tol": self.cfg.converge_tol, "curve": {k: v.tolist() for k, v in self.curve.items()}}  # fmt: skip


def _split(batch: Batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError(f"a batch must be a tensor or an (inputs, targets) pair, got a tuple of {len(batch)}")
        return batch[0], batch[1]
    return batch, None


def _batches(data: SAEData, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless batches: shuffled epochs over stored tensors, or fresh draws from a callable."""
    if callable(data) and not isinstance(data, Tensor):
        while True:
            yield data(batch_size, generator)
    inputs, targets = _split(data)  # type: ignore[arg-type]
    n = inputs.shape[0]
    if targets is not None and targets.shape[0] != n:
        raise ValueError(f"inputs have {n} rows but targets have {targets.shape[0]}")
    if n < batch_size:
        raise ValueError(f"the dataset has {n} rows, fewer than batch_size={batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            yield inputs[idx] if targets is None else (inputs[idx], targets[idx])


def _init_sample(data: SAEData, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    if callable(data) and not isinstance(data, Tensor):
        return _split(data(size, generator))
    inputs, targets = _split(data)  # type: ignore[arg-type]
    idx = torch.randperm(inputs.shape[0], generator=generator)[:size]
    return inputs[idx], None if targets is None else targets[idx]


def _check_batch(sae: SAE, inputs: Tensor, targets: Tensor | None) -> None:
    cfg = sae.cfg
    if inputs.shape[-1] != cfg.d_in:
        raise ValueError(f"inputs have width {inputs.shape[-1]} but the SAE has d_in={cfg.d_in}")
    if cfg.is_transcoder and targets is None:
        raise ValueError("the SAE is a transcoder (d_out is set): pass data as (inputs, targets)")
    if not cfg.is_transcoder and targets is not None:
        raise ValueError("the SAE reconstructs its input: pass only inputs, or set d_out to train a transcoder")
    if targets is not None and targets.shape[-1] != cfg.d_target:
        raise ValueError(f"targets have width {targets.shape[-1]} but the SAE has d_out={cfg.d_target}")


@torch.no_grad()
def _initialize_from_data(sae: SAE, cfg: SAETrainConfig, data: SAEData, generator: torch.Generator) -> None:
    sae.initialize_weights(torch.Generator().manual_seed(cfg.seed))
    if cfg.b_dec_init is BDecInit.zeros:
        return
    inputs, targets = _init_sample(data, cfg.init_sample_size, generator)
    _check_batch(sae, inputs, targets)
    sample = (inputs if targets is None else targets).detach().float().reshape(-1, sae.cfg.d_target)
    center = geometric_median(sample) if cfg.b_dec_init is BDecInit.geometric_median else sample.mean(dim=0)
    sae.b_dec.copy_(center.to(sae.b_dec))


def _resample(sae: SAE, cfg: SAETrainConfig, data: SAEData, optimizer: torch.optim.Optimizer,
              tracker: DeadLatentTracker, generator: torch.Generator) -> int:  # fmt: skip
    """Resample the latents silent for ``cfg.resample_window`` samples; returns how many."""
    silent = tracker.silent_for(cfg.resample_window)
    if not bool(silent.any()):
        return 0
    inputs, targets = _init_sample(data, cfg.resample_sample_size, generator)
    _check_batch(sae, inputs, targets)
    idx = resample_dead_latents(sae, optimizer, silent, inputs, targets, generator, cfg.resample_encoder_scale)
    tracker.restart(idx)
    return int(idx.numel())


def _default_evaluate(sae: SAE, cfg: SAETrainConfig, data: SAEData) -> SAEEvaluate:
    """FVU and L0 on one fixed batch of ``cfg.eval_sample_size`` rows, drawn with a generator of its own."""
    inputs, targets = _init_sample(data, cfg.eval_sample_size, torch.Generator().manual_seed(cfg.seed + 7919))
    _check_batch(sae, inputs, targets)
    inputs = inputs.to(device=sae.device, dtype=sae.dtype)
    targets = inputs if targets is None else targets.to(device=sae.device, dtype=sae.dtype)
    centred = (targets - targets.mean(dim=0)).pow(2).sum()

    def evaluate(model: SAE) -> dict[str, float]:
        f = model.encode(inputs)
        fvu = float((model.decode(f) - targets).pow(2).sum() / centred.clamp_min(1e-30))
        return {"fvu": fvu, "l0": float((f != 0).sum(dim=-1).float().mean())}

    return evaluate


@torch.no_grad()
def _evaluate(sae: SAE, evaluate: SAEEvaluate) -> dict[str, float]:
    sae.eval()
    try:
        return {k: float(v) for k, v in evaluate(sae).items()}
    finally:
        sae.train()


def train_sae(
    sae: SAE, data: SAEData, cfg: SAETrainConfig | None = None, /, evaluate: SAEEvaluate | None = None, **overrides: Any
) -> TrainResult:
    """Train ``sae`` in place with Adam and return the per-step history.

    ``cfg`` holds the hyperparameters (defaults when None); keyword ``overrides`` replace single
    fields, e.g. ``train_sae(sae, acts, steps=2000, batch_size=256, lr=3e-3, seed=1)``. With
    ``cfg.eval_every`` the held-out curve is recorded (``evaluate``: the caller's evaluation, else
    FVU and L0 on a fixed batch of the data) and judged (module docstring).
    """
    cfg = dataclasses.replace(cfg or SAETrainConfig(), **overrides)
    device = sae.device
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.reinitialize:
        _initialize_from_data(sae, cfg, data, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    tracker = DeadLatentTracker(sae.cfg.d_sae, cfg.dead_tokens_threshold, device=device)
    history: dict[str, list[Tensor]] = {}
    metrics: dict[str, list[float]] = {"l0": [], "n_dead": [], "lr": [], "n_resampled": []}
    batches = _batches(data, cfg.batch_size, generator)
    if cfg.eval_every and evaluate is None:
        evaluate = _default_evaluate(sae, cfg, data)
    curve: dict[str, list[float]] = {}
    rule = cfg.convergence_rule
    sae.train()
    start = time.perf_counter()
    resample_at = set(cfg.resample_steps)
    stopped = False
    for step_idx in range(cfg.steps):
        n_resampled = 0
        if step_idx in resample_at:
            n_resampled = _resample(sae, cfg, data, optimizer, tracker, generator)
        inputs, targets = _split(next(batches))
        if step_idx == 0:
            _check_batch(sae, inputs, targets)
        lr = sae_lr_at_step(cfg, step_idx)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scale = min(1.0, (step_idx + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        step_input = TrainStepInput(
            sae_in=inputs.to(device=device, dtype=sae.dtype),
            target=None if targets is None else targets.to(device=device, dtype=sae.dtype),
            dead_latents=tracker.dead,
            sparsity_coeff_scale=scale,
        )
        out = sae.training_forward_pass(step_input)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm)
        optimizer.step()
        sae.after_optimizer_step(out)
        tracker.update(out.feature_acts)
        for name, value in {"loss": out.loss, **out.losses}.items():
            history.setdefault(name, []).append(value.detach())
        metrics["l0"].append(float((out.feature_acts != 0).sum(dim=-1).float().mean()))
        metrics["n_dead"].append(float(tracker.dead.sum()))
        metrics["lr"].append(lr)
        metrics["n_resampled"].append(float(n_resampled))
        done = step_idx + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            assert evaluate is not None
            values = _evaluate(sae, evaluate)
            if cfg.converge_metric not in values:
                raise ValueError(f"converge_metric={cfg.converge_metric!r} is not among the evaluation's metrics "
                                 f"{sorted(values)}; set converge_metric to one of them")  # fmt: skip
            for name, value in {"step": float(done), **values}.items():
                curve.setdefault(name, []).append(value)
            if cfg.until_converged and cfg.window_clear(done) and rule.converged(curve["step"], curve[cfg.converge_metric]):
                stopped = True
                break
    seconds = time.perf_counter() - start
    sae.eval()
    converged, change = None, math.nan
    if curve:
        change = rule.change(curve["step"], curve[cfg.converge_metric])
        converged = cfg.window_clear(int(curve["step"][-1])) and rule.converged(curve["step"], curve[cfg.converge_metric])
        if cfg.until_converged and not stopped:
            warnings.warn(f"the SAE did not converge within the step cap steps={cfg.steps}: {cfg.converge_metric} moved by "
                          f"{change:+.4f} over the last {cfg.converge_window:.0%} of training (tolerance "
                          f"{cfg.converge_tol}); raise steps to train on", stacklevel=2)  # fmt: skip
    return TrainResult(
        sae=sae,
        cfg=cfg,
        losses={name: torch.stack(values).cpu() for name, values in history.items()},
        metrics={name: torch.tensor(values) for name, values in metrics.items()},
        tracker=tracker,
        seconds=seconds,
        curve={name: torch.tensor(values) for name, values in curve.items()},
        converged=converged,
        curve_change=change,
    )
