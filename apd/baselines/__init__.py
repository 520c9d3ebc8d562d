"""Sparse-autoencoder baselines in activation space (SPEC §4), with SAELens names and shapes.

Architectures (registry name -> class): "standard" (ReLU + L1, unit-norm decoder), "topk" (+ AuxK),
"batchtopk", "jumprelu". Any of them becomes a transcoder by setting ``d_out`` in its config. Dead
latents can be resampled during training (``SAETrainConfig.resample_steps``, Bricken et al. 2023).
"""

from .activations import BatchTopK, TopK, jumprelu, step
from .base import SAE, SAEConfig, TrainStepInput, TrainStepOutput
from .batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from .io import SAELoadError, load_sae, save_sae
from .jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from .registry import get_sae_class, register_sae, registered_architectures
from .resampling import resample_dead_latents, resampling_probabilities
from .standard import StandardSAE, StandardSAEConfig
from .topk import TopKSAE, TopKSAEConfig, topk_aux_loss
from .training import (
    BDecInit,
    DeadLatentTracker,
    SAEData,
    SAETrainConfig,
    TrainResult,
    geometric_median,
    sae_lr_at_step,
    train_sae,
)

__all__ = [
    "SAE",
    "SAEConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "StandardSAE",
    "StandardSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "BatchTopKSAE",
    "BatchTopKSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "TopK",
    "BatchTopK",
    "jumprelu",
    "step",
    "topk_aux_loss",
    "register_sae",
    "get_sae_class",
    "registered_architectures",
    "BDecInit",
    "SAETrainConfig",
    "SAEData",
    "DeadLatentTracker",
    "TrainResult",
    "geometric_median",
    "sae_lr_at_step",
    "train_sae",
    "resample_dead_latents",
    "resampling_probabilities",
    "SAELoadError",
    "save_sae",
    "load_sae",
]
