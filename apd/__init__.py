"""apd: Attribution-based Parameter Decomposition of a trained network's weights."""

from apd.attributions import (
    ablation_attributions,
    activation_attributions,
    compute_attributions,
    gradient_attributions,
    gradient_attributions_loop,
)
from apd.component_model import ComponentModel, ModuleSelectionError
from apd.components import LinearComponents, TiedLinear, TransposedComponents
from apd.config import APDConfig, Attribution, ConfigError, LRSchedule, OutputLoss
from apd.data import DataError
from apd.decomposition import CheckpointError, Decomposition, load_decomposition
from apd.multi import decompose_seeds
from apd.optim import OPTIMIZERS
from apd.topk import topk_mask
from apd.train import LossTerms, NonFiniteLossError, compute_losses, decompose, train_step

__all__ = [
    "APDConfig",
    "Attribution",
    "LRSchedule",
    "OutputLoss",
    "OPTIMIZERS",
    "decompose",
    "decompose_seeds",
    "Decomposition",
    "load_decomposition",
    "ComponentModel",
    "LinearComponents",
    "TransposedComponents",
    "TiedLinear",
    "gradient_attributions",
    "gradient_attributions_loop",
    "ablation_attributions",
    "activation_attributions",
    "compute_attributions",
    "topk_mask",
    "LossTerms",
    "compute_losses",
    "train_step",
    "ConfigError",
    "DataError",
    "ModuleSelectionError",
    "CheckpointError",
    "NonFiniteLossError",
]
