"""Sparse-autoencoder baselines in activation space (SPEC §4), with SAELens names and shapes.

Architectures (registry name -> class): "standard" (ReLU + L1, unit-norm decoder), "topk" (+ AuxK),
"batchtopk", "jumprelu". Any of them becomes a transcoder by setting ``d_out`` in its config. Dead
latents can be resampled during training (``SAETrainConfig.resample_steps``, Bricken et al. 2023);
a held-out curve can be recorded and training run until it is flat (``SAETrainConfig.eval_every``,
``until_converged``; ``apd.baselines.convergence``). ``apd.baselines.layers`` trains one transcoder
per named module (each layer's MLP) of any model and scores it spliced in.
"""

from .activations import BatchTopK, TopK, jumprelu, step
from .base import SAE, SAEConfig, TrainStepInput, TrainStepOutput
from .batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from .convergence import ConvergenceRule, window_change
from .io import SAELoadError, load_sae, save_sae
from .jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from .layers import (
    LayerTranscoder,
    capture_module_io,
    layer_training_data,
    module_loss_recovered,
    recovered_fraction,
    replaced_outputs,
    train_layer_transcoders,
    transcoder_scores,
)
from .registry import get_sae_class, register_sae, registered_architectures
from .resampling import resample_dead_latents, resampling_probabilities
from .standard import StandardSAE, StandardSAEConfig
from .topk import TopKSAE, TopKSAEConfig, topk_aux_loss
from .training import (
    BDecInit,
    DeadLatentTracker,
    SAEData,
    SAEEvaluate,
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
    "SAEEvaluate",
    "ConvergenceRule",
    "window_change",
    "DeadLatentTracker",
    "TrainResult",
    "geometric_median",
    "sae_lr_at_step",
    "train_sae",
    "resample_dead_latents",
    "resampling_probabilities",
    "LayerTranscoder",
    "capture_module_io",
    "replaced_outputs",
    "module_loss_recovered",
    "recovered_fraction",
    "layer_training_data",
    "train_layer_transcoders",
    "transcoder_scores",
    "SAELoadError",
    "save_sae",
    "load_sae",
]
