"""The number format of a training step (``MethodConfig.precision``, :class:`apd.config.Precision`).

``bf16`` runs the step's forward under ``torch.autocast(<device type>, dtype=torch.bfloat16)``: the
matrix products (``mm``, ``bmm``, ``linear``, ``matmul``, ``einsum``'s contractions) take bfloat16
inputs and give bfloat16 outputs, their backward follows them; every other operation runs in the
dtype of its inputs (a bfloat16 tensor meeting a float32 one gives float32). Parameters, gradients,
optimiser state, checkpoints and evaluation stay float32: only the training step is wrapped
(``apd.train``), and its backward and optimiser step run outside the autocast region.

Where bfloat16 would spoil the numbers, the code that knows asks for float32 back: SPD runs its
target pass (the outputs every reconstruction loss compares with) under :func:`full_precision`, and
squashes its causal-importance functions' pre-activations in float32 (:func:`at_least_float32`; the
masks, their random draws and the minimality loss are then float32), and the losses' distances cast
both outputs to float32 before subtracting. The toy language models run their attention core in
float32 under CPU autocast (``apd.toy_models.lm.CausalSelfAttention``: torch's bfloat16 CPU attention
is slower than its float32 one; docs/guide/precision.md).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from apd.config import ConfigError, MethodConfig, Precision

__all__ = ["step_autocast", "full_precision", "check_precision", "at_least_float32"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def check_precision(config: MethodConfig) -> None:
    """Raise :class:`ConfigError` naming the fix where ``config.precision`` cannot run on its device
    (bfloat16 on a GPU without it)."""
    if config.precision is not Precision.bf16:
        return
    kind = torch.device(config.device).type
    if kind not in _AUTOCAST_DEVICES:
        raise ConfigError(f"precision=bf16 with device={config.device!r}: bfloat16 autocast is offered on "
                          f"{' and '.join(_AUTOCAST_DEVICES)} devices only; use precision=fp32 on this device")  # fmt: skip
    if kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision=bf16: the GPU of device={config.device!r} ({torch.cuda.get_device_name(config.device)}) "
                          "has no bfloat16 arithmetic; use precision=fp32")  # fmt: skip


def step_autocast(config: MethodConfig) -> contextlib.AbstractContextManager:
    """The context a training step's forward (its loss terms) runs in: bfloat16 autocast on the
    config's device type for ``precision=bf16``, nothing for ``fp32``."""
    if config.precision is not Precision.bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is in a narrower floating format (bfloat16, float16), else as it is."""
    return t.float() if t.is_floating_point() and t.dtype.itemsize < 4 else t


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Float32 inside, whatever autocast region it is called in (a no-op outside one)."""
    on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
    with contextlib.ExitStack() as stack:
        for d in on:
            stack.enter_context(torch.autocast(d, enabled=False))
        yield
