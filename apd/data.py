"""Batches from whatever a user has: an iterable (re-iterated when exhausted) or a callable."""

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchSource", "DataError", "pack_batch"]


class DataError(ValueError):
    """The data source yields nothing, or something that is not a batch of the expected shape."""


def pack_batch(batch: Mapping[str, Any]) -> tuple[Tensor, tuple[str, ...]]:
    """A dict batch of equal-shape [B, T] integer tensors as one [B, K, T] tensor, with its keys.

    Raises ``DataError`` naming the entry for one that is not such a tensor."""
    keys = tuple(batch)
    if not keys:
        raise DataError("the data source gave an empty dict; give {'input_ids': ..., 'attention_mask': ...}")
    first = batch[keys[0]]
    for k in keys:
        v = batch[k]
        if not isinstance(v, Tensor) or v.dim() != 2 or v.shape != first.shape or v.is_floating_point():
            got = f"a {type(v).__name__}" if not isinstance(v, Tensor) else f"shape {tuple(v.shape)}, {v.dtype}"
            raise DataError(
                f"dict batch entry {k!r} is {got}; every entry must be an integer tensor [batch, positions] of one shape "
                f"(a tokenizer's output with return_tensors='pt', padded): drop other entries such as labels"
            )
    return torch.stack([batch[k].long() for k in keys], dim=1), keys


class BatchSource:
    """Yields input batches from an iterable of tensors or ``(input, label, ...)`` tuples, or from a
    zero-argument callable returning a batch.

    An iterable is re-iterated when exhausted. ``consumed`` counts the batches drawn in the current
    pass, so a resumed run can skip them and see the same sequence (exact for iterables that repeat
    themselves, such as lists and unshuffled data loaders).
    """

    def __init__(self, data: Iterable | Callable[[], object]):
        if callable(data) and not isinstance(data, Iterable):
            self._fn: Callable[[], object] | None = data
            self._iterable = None
        elif isinstance(data, Iterable):
            self._fn = None
            self._iterable = data
        else:
            raise DataError(
                f"data must be an iterable of batches or a zero-argument callable returning one; got {type(data).__name__}"
            )
        self._it: Iterator | None = None
        self.consumed = 0
        self._shape: tuple[int, ...] | None = None
        self.keys: tuple[str, ...] | None = None
        """the entries of dict batches (packed by ``pack_batch``), in order; None for tensor batches"""

    def skip(self, n: int) -> None:
        """Fast-forward an iterable by n batches. A callable is not called: its next batch is
        reproduced by restoring the RNG state it draws from."""
        if self._fn is not None:
            self.consumed = n
            return
        for _ in range(n):
            self._raw()

    def _raw(self) -> object:
        if self._fn is not None:
            self.consumed += 1
            return self._fn()
        if self._it is None:
            self._it = iter(self._iterable)  # type: ignore[arg-type]
            self.consumed = 0
        try:
            item = next(self._it)
        except StopIteration:
            if self.consumed == 0:
                raise DataError("the data source yielded no batch; give it at least one input tensor") from None
            self._it, self.consumed = iter(self._iterable), 0  # type: ignore[arg-type]
            try:
                item = next(self._it)
            except StopIteration:
                raise DataError("the data source yielded nothing when iterated again; pass a re-iterable "
                                "(a list or DataLoader), not a one-shot generator, or a callable") from None
        self.consumed += 1
        return item

    def next(self) -> Tensor:
        item = self._raw()
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        if isinstance(item, Mapping):  # a tokenizer's output: {'input_ids', 'attention_mask', ...}
            item, keys = pack_batch(item)
            if self.keys is not None and keys != self.keys:
                raise DataError(f"a dict batch with entries {list(keys)} after batches with {list(self.keys)}; "
                                "give every batch the same entries")  # fmt: skip
            self.keys = keys
        elif self.keys is not None:
            raise DataError(f"a {type(item).__name__} batch after dict batches; give every batch as a dict")
        if not isinstance(item, Tensor):
            raise DataError(f"the data source gave a {type(item).__name__}, not a tensor (or an (input, label) tuple, or a "
                            "dict of token tensors such as a tokenizer's output)")
        if item.dim() < 1 or item.shape[0] == 0:
            raise DataError(f"a batch needs a non-empty leading batch dimension; got shape {tuple(item.shape)}")
        if self._shape is None:
            self._shape = tuple(item.shape[1:])
        elif tuple(item.shape[1:]) != self._shape:
            raise DataError(
                f"batch of shape {tuple(item.shape)} after batches of shape (B, {', '.join(map(str, self._shape))}); "
                "every batch must have the same per-sample shape"
            )
        return item
