"""Optimisers by name and the warm-up + decay learning-rate schedule."""

import math
import warnings
from collections.abc import Iterable

import torch

from apd.config import ConfigError, LRSchedule

__all__ = ["OPTIMIZERS", "check_optimizer_name", "make_optimizer", "lr_at_step"]

# torch-optimizer classes whose state survives torch.save + torch.load(weights_only=True) +
# load_state_dict on torch 2.x (checked by tests/test_config.py::test_every_offered_optimizer_
# steps_and_checkpoints). Left out: Lookahead (cannot save its state on modern torch) and
# Adahessian (needs create_graph=True backward passes).
_TORCH_OPTIMIZER_NAMES = (
    "A2GradExp", "A2GradInc", "A2GradUni", "AccSGD", "AdaBelief", "AdaBound", "AdaMod",
    "Adafactor", "AdamP", "AggMo", "Apollo", "DiffGrad", "LARS", "Lamb", "MADGRAD", "NovoGrad",
    "PID", "QHAdam", "QHM", "RAdam", "Ranger", "RangerQH", "RangerVA", "SGDP", "SGDW", "SWATS",
    "Shampoo", "Yogi",
)  # fmt: skip
_UNSUPPORTED = {"lookahead": "its state cannot be saved on modern torch", "adahessian": "it needs second-order backward passes"}
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw") + tuple(n.lower() for n in _TORCH_OPTIMIZER_NAMES)


def check_optimizer_name(name: str) -> str:
    """Normalise an optimiser name (case-insensitive) or raise naming the choices."""
    key = str(name).lower()
    if key in _UNSUPPORTED:
        raise ConfigError(f"optimizer={name!r} is not offered: {_UNSUPPORTED[key]}; use 'adam' or 'adamw'")
    if key not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    return key


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam/AdamW (no weight decay: components are not decayed) or a torch-optimizer class."""
    key = check_optimizer_name(name)
    params = list(params)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch_optimizer

    cls = getattr(torch_optimizer, next(n for n in _TORCH_OPTIMIZER_NAMES if n.lower() == key))
    return cls(params, lr=lr)


def lr_at_step(step: int, steps: int, lr: float, schedule: LRSchedule, warmup_frac: float) -> float:
    """Linear warm-up from 0 over ``warmup_frac·steps`` steps, then constant, cosine, the reference
    code's quarter cosine (``LRSchedule`` explains the two) or linear decay to 0."""
    warmup = int(warmup_frac * steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule is LRSchedule.constant:
        return lr
    if schedule is LRSchedule.quarter_cosine:
        decay_steps = steps - warmup
        return lr if decay_steps <= 1 else lr * math.cos(0.5 * math.pi * (step - warmup) / (decay_steps - 1))
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule is LRSchedule.cosine:
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)
