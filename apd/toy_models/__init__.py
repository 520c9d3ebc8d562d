"""Toy target models with known ground truth (SPEC §2), and the one-layer language model (SPEC §6)."""

from apd.toy_models.lm import LMConfig, TransformerLM, evaluate_lm, train_lm
from apd.toy_models.lm_data import CharTokenizer, load_corpus, load_tokenizer
from apd.toy_models.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    decomposed_module_names,
    monosemantic_baseline,
    resid_mlp_batch,
    resid_mlp_labels,
    train_resid_mlp,
)
from apd.toy_models.tms import TMS, TMSConfig, tms_batch, tms_ground_truth, train_tms

__all__ = [
    "TMS",
    "TMSConfig",
    "tms_batch",
    "tms_ground_truth",
    "train_tms",
    "ResidMLP",
    "ResidMLPConfig",
    "decomposed_module_names",
    "monosemantic_baseline",
    "resid_mlp_batch",
    "resid_mlp_labels",
    "train_resid_mlp",
    "LMConfig",
    "TransformerLM",
    "evaluate_lm",
    "train_lm",
    "CharTokenizer",
    "load_corpus",
    "load_tokenizer",
]
