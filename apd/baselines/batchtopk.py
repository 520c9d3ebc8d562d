"""BatchTopK SAE (Bussmann, Leask, Nanda 2024): top k·B activations over the whole batch.

Training keeps the ⌊k·B⌋ largest ReLU'd pre-activations of the batch (k may be fractional), the
like-for-like match to APD's batch top-k. Batch top-k makes a sample's code depend on its batch, so
inference uses a fixed threshold θ instead: ``encode`` in eval mode returns ReLU(z)·[z > θ]. θ is an
exponential moving average of the smallest positive kept activation, updated after every training
step (the first update sets it directly).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import BatchTopK
from .base import SAE, TrainStepOutput
from .registry import register_sae
from .topk import TopKSAE, TopKSAEConfig

__all__ = ["BatchTopKSAEConfig", "BatchTopKSAE"]


@dataclass(kw_only=True)
class BatchTopKSAEConfig(TopKSAEConfig):
    k: float = 1.0  # type: ignore[assignment]
    """mean active latents per sample; ⌊k·B⌋ (at least 1) are kept over a batch of B"""
    threshold_ema_decay: float = 0.99
    """decay of the moving average that estimates the inference threshold"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_ema_decay < 1.0:
            raise ValueError(f"threshold_ema_decay={self.threshold_ema_decay} must be in [0, 1) (e.g. 0.99)")

    def _validate_k(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k={self.k} must be > 0")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}; lower k or raise d_sae")


class BatchTopKSAE(TopKSAE):
    """Batch top-k in training mode, a JumpReLU-like threshold in eval mode; losses "mse" and "aux"."""

    architecture = "batchtopk"
    training_forward_pass = SAE.training_forward_pass  # the batch-wide selection: TopKSAE's per-row sparse pass does not apply
    cfg: BatchTopKSAEConfig
    threshold: Tensor
    n_threshold_updates: Tensor

    def __init__(self, cfg: BatchTopKSAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.topk = BatchTopK(cfg.k)  # type: ignore[assignment]
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("n_threshold_updates", torch.zeros((), dtype=torch.long))

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        super().initialize_weights(generator)
        if hasattr(self, "threshold"):
            self.threshold.zero_()
            self.n_threshold_updates.zero_()

    def activation(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.training:
            return self.topk(hidden_pre)
        if int(self.n_threshold_updates) == 0:
            raise RuntimeError(
                "BatchTopKSAE in eval mode needs its inference threshold: train it first "
                "(or call update_threshold), or use train mode for batch top-k"
            )
        return hidden_pre.relu() * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    @torch.no_grad()
    def update_threshold(self, feature_acts: Float[Tensor, "... d_sae"]) -> None:
        """Fold the smallest positive activation kept by batch top-k into the running threshold."""
        kept = feature_acts[feature_acts > 0]
        if kept.numel() == 0:
            return
        low = kept.min().to(self.threshold.dtype)
        if int(self.n_threshold_updates) == 0:
            self.threshold.copy_(low)
        else:
            decay = self.cfg.threshold_ema_decay
            self.threshold.mul_(decay).add_((1.0 - decay) * low)
        self.n_threshold_updates += 1

    def after_optimizer_step(self, step_output: TrainStepOutput) -> None:
        super().after_optimizer_step(step_output)
        self.update_threshold(step_output.feature_acts)


register_sae(BatchTopKSAE.architecture, BatchTopKSAE, BatchTopKSAEConfig)
