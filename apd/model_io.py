"""How the toolkit calls a target and reads its output: models as they come (Hugging Face included).

A target is called with one batch and must give one tensor back, batch first. Two adaptations make
models as they come fit that contract without a wrapper:

- **Outputs**: a tensor is used as is; anything else is read by ``output_fn`` when one is given
  (``decompose(..., output_fn=lambda out: out.hidden_states[-1])``), else by its ``logits``: the
  ``.logits`` attribute (a Hugging Face ``ModelOutput`` or any dataclass), the ``"logits"`` key of a
  dict, or the first element of a tuple or list.
- **Dict batches**: a batch ``{"input_ids": [B, T], "attention_mask": [B, T], ...}`` (a tokenizer's
  output) is packed into one integer tensor [B, K, T] (its K entries stacked, in key order) so that
  it travels through the toolkit (devices, data-parallel shards, stacked seeds, checkpoints) as a
  tensor; the target is called as ``model(**batch)``. ``attention_mask`` gives the *valid*
  positions: every loss and metric averages over them only (``valid_positions``).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ModelIO", "OutputFn", "as_output_tensor", "masked_mean", "valid_rows"]

OutputFn = Callable[[Any], Tensor]

MASK_KEY = "attention_mask"


def as_output_tensor(out: Any, output_fn: OutputFn | None = None) -> Any:
    """The tensor the toolkit compares: ``output_fn(out)`` when given, ``out`` when it is a tensor, else
    its logits (attribute, dict key or first tuple element). Anything else is returned unchanged, for
    the caller's error message."""
    if output_fn is not None:
        return output_fn(out)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out


def valid_rows(masks: Any, valid: Tensor | None) -> Any:
    """Masks (a tensor [*lead, C] or {name: [*lead, C]}) at the positions ``valid`` [*lead] (0/1) keeps,
    flattened to [N_valid, C]; unchanged when ``valid`` is None."""
    if valid is None:
        return masks
    keep = valid.bool()
    if isinstance(masks, Mapping):
        return {n: m[keep] for n, m in masks.items()}
    return masks[keep]


def masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """The mean of ``values`` [*lead] over its entries, counting only those where ``valid`` [*lead]
    (0/1) is 1; the plain mean when ``valid`` is None. ``values`` may have more leading dimensions
    than ``valid`` has (they are the positions' own entries, averaged first)."""
    if valid is None:
        return values.mean()
    per_position = values.reshape(*valid.shape, -1).mean(-1)
    w = valid.to(per_position.dtype)
    return (per_position * w).sum() / w.sum().clamp_min(1)


@dataclass
class ModelIO:
    """How a ``ComponentModel`` calls its model: the keys of a packed dict batch (None: the batch is
    the model's one positional input) and the output reader."""

    keys: tuple[str, ...] | None = None
    output_fn: OutputFn | None = None

    def args(self, x: Tensor) -> tuple[tuple, dict[str, Tensor]]:
        """Positional and keyword arguments of the model for the batch ``x`` (a dict batch given as is
        is passed as keywords too)."""
        if isinstance(x, Mapping):
            return (), dict(x)
        if self.keys is None:
            return (x,), {}
        if x.dim() != 3 or x.shape[1] != len(self.keys):
            raise ValueError(f"a packed dict batch has shape [B, {len(self.keys)}, T] (entries {list(self.keys)}); "
                             f"got {tuple(x.shape)}")  # fmt: skip
        return (), {k: x[:, i] for i, k in enumerate(self.keys)}

    def valid_positions(self, x: Tensor) -> Tensor | None:
        """[B, T] 0/1: the positions of a packed batch its ``attention_mask`` keeps; None when every
        position counts."""
        if isinstance(x, Mapping):
            return x.get(MASK_KEY)
        if self.keys is None or MASK_KEY not in self.keys:
            return None
        return x[:, self.keys.index(MASK_KEY)]

    def describe(self, x: Tensor) -> str:
        if self.keys is None:
            return f"shape {tuple(x.shape)} and dtype {x.dtype}"
        return f"entries {list(self.keys)} of shape {tuple(x[:, 0].shape)}"


def check_output_fn(output_fn: Any) -> OutputFn | None:
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be a callable (model output -> tensor), got {type(output_fn).__name__}")
    return output_fn
