"""The toy model of superposition as a target (``target=tms_5_2`` etc.; SPEC §2.1)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from apd.evaluation import EvalContext
from apd.metrics.tms import tms_metrics
from apd.targets.base import TargetConfig, register_target_kind
from apd.toy_models.tms import TMS, TMSConfig, tms_batch, train_tms

__all__ = ["TMSTargetConfig"]


@register_target_kind
@dataclass(kw_only=True)
class TMSTargetConfig(TargetConfig):
    """Toy model of superposition n-m (SPEC §2.1), optionally with the hidden identity (+ID)."""

    n_features: int = 5
    n_hidden: int = 2
    identity: bool = False
    feature_probability: float = 0.05

    kind: ClassVar[str] = "tms"

    def build(self) -> TMS:
        torch.manual_seed(self.train_seed)
        return TMS(TMSConfig(n_features=self.n_features, n_hidden=self.n_hidden, identity=self.identity,
                             feature_probability=self.feature_probability))  # fmt: skip

    def train(self, model: nn.Module) -> float:
        assert isinstance(model, TMS)
        return train_tms(model, self.train_steps, self.train_batch_size, self.train_lr, self.train_weight_decay, self.train_seed)

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return tms_batch(self.n_features, batch_size, self.feature_probability, generator, device)

    def modules(self) -> list[str]:
        return ["enc", "dec"] + (["hidden"] if self.identity else [])

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Recovery of the ground-truth columns of W (``apd.metrics.tms``)."""
        return tms_metrics(ctx.target, ctx.dec, ctx)  # type: ignore[arg-type]
