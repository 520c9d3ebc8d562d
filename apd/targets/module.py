"""Your own model and data as a target (``target=module``): factories imported by dotted path."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.config import ConfigError, OutputLoss
from apd.targets.base import TargetConfig, register_target_kind

__all__ = ["ModuleTargetConfig"]


def _import(path: str, what: str) -> Callable[..., Any]:
    """The object at ``path`` ('package.module:name' or 'package.module.name')."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{what}={path!r}: give an importable path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what}={path!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH (run from its "
                          "project root) and spelt right?") from None  # fmt: skip
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ConfigError(f"{what}={path!r}: {module_name} has no {attr!r}; it has {public}")
    return getattr(module, attr)


@register_target_kind
@dataclass(kw_only=True)
class ModuleTargetConfig(TargetConfig):
    """Your own model (``target=module``): a factory that returns the trained ``nn.Module`` and a
    data factory ``data(batch_size, generator) -> inputs`` (a tensor with the batch first; integer
    token ids are fine), both imported by dotted path, e.g.
    ``target.factory=mypkg.models:load_trained target.data=mypkg.data:batch 'target.decompose=[fc1,fc2]'``.
    Generic metrics only (faithfulness, reconstruction, L0): the toolkit knows no ground truth for it."""

    name: str = "module"
    factory: str = ""
    """'package.module:function' returning the trained model (called with ``factory_kwargs``)"""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    """'package.module:function' called as ``data(batch_size, generator, **data_kwargs)`` for a batch of inputs"""
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    decompose: list[str] = field(default_factory=list)
    """module-name patterns to decompose (fnmatch over ``named_modules``)"""
    tie: dict[str, str] = field(default_factory=dict)
    """declared ties {second use: matrix} between plain nn.Linear layers"""
    loss: OutputLoss = OutputLoss.mse
    """how outputs are compared: mse, or kl when the model returns logits"""

    kind: ClassVar[str] = "module"

    def __post_init__(self) -> None:
        if not self.factory or not self.data:
            raise ConfigError("target=module needs target.factory and target.data: importable paths 'package.module:function' "
                              "of your model factory and of your batch function")  # fmt: skip
        if not self.decompose:
            raise ConfigError("target=module needs target.decompose: the module names to decompose, e.g. 'target.decompose=[fc1,fc2]'")
        self.loss = OutputLoss(self.loss)

    def build(self) -> nn.Module:
        model = _import(self.factory, "target.factory")(**self.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"target.factory={self.factory!r} returned a {type(model).__name__}, not an nn.Module")
        return model

    def train(self, model: nn.Module) -> float:
        raise ConfigError("target=module decomposes a trained model its factory returns; train it in your own code")

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        x = _import(self.data, "target.data")(batch_size, generator, **self.data_kwargs)
        if not isinstance(x, Tensor):
            raise ConfigError(f"target.data={self.data!r} returned a {type(x).__name__}, not a tensor of inputs")
        return x.to(device)

    def modules(self) -> list[str]:
        return list(self.decompose)

    def tied(self) -> dict[str, str]:
        return dict(self.tie)

    def ready_made(self) -> tuple[nn.Module, dict[str, Any]]:
        """What the factory returns: no shipped file, no training."""
        return self.build(), {"source": self.factory, "train_loss": float("nan")}

    def output_loss(self) -> OutputLoss:
        return self.loss

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"loss": self.loss.value}
