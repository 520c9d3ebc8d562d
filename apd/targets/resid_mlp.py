"""The residual MLP "compressed computation" toy as a target (``target=resid_mlp_1`` etc.; SPEC §2.2)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from apd.evaluation import EvalContext
from apd.metrics.resid_mlp import resid_mlp_run_metrics
from apd.targets.base import TargetConfig, register_target_kind
from apd.toy_models.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    decomposed_module_names,
    monosemantic_baseline,
    resid_mlp_batch,
    train_resid_mlp,
)

__all__ = ["ResidMLPTargetConfig"]


@register_target_kind
@dataclass(kw_only=True)
class ResidMLPTargetConfig(TargetConfig):
    """Residual MLP "compressed computation" toy (SPEC §2.2)."""

    n_features: int = 100
    d_embed: int = 1000
    d_mlp: int = 50
    n_layers: int = 1
    feature_probability: float = 0.01
    embed_seed: int = 0
    train_steps: int = 10_000
    train_batch_size: int = 2048
    train_lr: float = 3e-3

    kind: ClassVar[str] = "resid_mlp"

    def model_config(self) -> ResidMLPConfig:
        return ResidMLPConfig(n_features=self.n_features, d_embed=self.d_embed, d_mlp=self.d_mlp, n_layers=self.n_layers,
                              feature_probability=self.feature_probability, embed_seed=self.embed_seed,
                              init_seed=self.train_seed)  # fmt: skip

    def build(self) -> ResidMLP:
        return ResidMLP(self.model_config())

    def train(self, model: nn.Module) -> float:
        assert isinstance(model, ResidMLP)
        result = train_resid_mlp(model, self.train_steps, self.train_batch_size, self.train_lr, self.train_weight_decay, self.train_seed)
        return float(result["final_loss"])

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return resid_mlp_batch(self.n_features, batch_size, self.feature_probability, generator, device)

    def modules(self) -> list[str]:
        return decomposed_module_names(self.n_layers)

    def monosemantic(self) -> ResidMLP:
        return monosemantic_baseline(self.model_config())

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Per-feature recovery against the monosemantic baseline (``apd.metrics.resid_mlp``)."""
        return resid_mlp_run_metrics(ctx.target, self.monosemantic().to(ctx.device), ctx)  # type: ignore[arg-type]
