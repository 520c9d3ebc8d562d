"""Targets as configs: build, train, ship (save) and load them, draw their data, score a decomposition.

One module per kind, each registering itself (``apd.targets.base.register_target_kind``):

- ``apd.targets.base``: the ``TargetConfig`` interface, the registry, ``get_target`` (the shipped
  file when its config matches, else trained), ``save_target`` / ``load_target``;
- ``apd.targets.tms``: the toy model of superposition (``TMSTargetConfig``, SPEC §2.1);
- ``apd.targets.resid_mlp``: the residual-MLP toy (``ResidMLPTargetConfig``, SPEC §2.2);
- ``apd.targets.lm``: the one-layer Shakespeare transformer (``LMTargetConfig``, SPEC §6);
- ``apd.targets.lm_multi``: the four-layer Llama-style Shakespeare transformer (``MultiLMTargetConfig``, ``lm_4l``);
- ``apd.targets.module``: your own model and data by import path (``ModuleTargetConfig``, ``target=module``);
- ``apd.targets.hf``: a Hugging Face causal LM from a local folder (``HFTargetConfig``, ``target=hf``).

A new kind subclasses ``TargetConfig`` in a module that imports ``apd.targets.base`` (never this
package's ``__init__``) and decorates its class with ``register_target_kind``.
"""

from apd.targets.base import (
    PRETRAINED_DIR,
    TargetConfig,
    get_target,
    load_target,
    register_target_kind,
    save_target,
    target_from_dict,
    train_target,
)
from apd.targets.hf import HFTargetConfig
from apd.targets.lm import CHECK_BATCH, LMTargetConfig, lm_decomposition_metrics
from apd.targets.lm_multi import MultiLMTargetConfig, vpd_table, vpd_table_markdown
from apd.targets.module import ModuleTargetConfig
from apd.targets.resid_mlp import ResidMLPTargetConfig
from apd.targets.tms import TMSTargetConfig

__all__ = ["TargetConfig", "TMSTargetConfig", "ResidMLPTargetConfig", "LMTargetConfig", "MultiLMTargetConfig", "ModuleTargetConfig", "HFTargetConfig", "get_target",
           "train_target", "save_target", "load_target", "target_from_dict", "register_target_kind", "PRETRAINED_DIR",
           "CHECK_BATCH", "lm_decomposition_metrics", "vpd_table", "vpd_table_markdown"]  # fmt: skip
