"""apd: parameter-space decompositions (APD, SPD) of a trained network's weights."""

from apd.attributions import (
    ablation_attributions,
    activation_attributions,
    compute_attributions,
    gradient_attributions,
    gradient_attributions_loop,
)
from apd.checkpoint import CheckpointError
from apd.component_model import ComponentModel, ModuleSelectionError
from apd.components import EmbeddingComponents, LinearComponents, TiedLinear, TransposedComponents
from apd.config import Attribution, ConfigError, FaithfulnessNorm, GradientMode, LRSchedule, MethodConfig, OutputLoss, Precision
from apd.data import DataError
from apd.decomposition import Decomposition, load_decomposition
from apd.ci_functions import CIFn
from apd.methods import METHODS, APDConfig, Method, SPDConfig
from apd.optim import OPTIMIZERS
from apd.topk import topk_mask
from apd.train import NonFiniteLossError, NonFiniteTargetError, decompose, decompose_seeds, loss_terms, train_step

__all__ = [
    "APDConfig",
    "SPDConfig",
    "CIFn",
    "MethodConfig",
    "METHODS",
    "Method",
    "Attribution",
    "GradientMode",
    "LRSchedule",
    "OutputLoss",
    "Precision",
    "FaithfulnessNorm",
    "OPTIMIZERS",
    "decompose",
    "decompose_seeds",
    "Decomposition",
    "load_decomposition",
    "ComponentModel",
    "LinearComponents",
    "EmbeddingComponents",
    "TransposedComponents",
    "TiedLinear",
    "gradient_attributions",
    "gradient_attributions_loop",
    "ablation_attributions",
    "activation_attributions",
    "compute_attributions",
    "topk_mask",
    "loss_terms",
    "train_step",
    "ConfigError",
    "DataError",
    "ModuleSelectionError",
    "CheckpointError",
    "NonFiniteLossError",
    "NonFiniteTargetError",
]
