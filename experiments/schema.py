"""Hydra ConfigStore registration: every group option is checked against a dataclass, so a
misspelt key or a wrong type fails at compose time."""

import dataclasses
import sys
from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from apd.config import ConfigError

from apd import APDConfig, MethodConfig, SPDConfig
from apd.experiment import DecomposeRun
from apd.targets import HFTargetConfig, LMTargetConfig, ModuleTargetConfig, MultiLMTargetConfig, ResidMLPTargetConfig, TargetConfig, TMSTargetConfig


class LoggerKind(str, Enum):
    none = "none"  # metrics.jsonl only (always written)
    tensorboard = "tensorboard"
    wandb = "wandb"


@dataclass(kw_only=True)
class LoggerConfig:
    kind: LoggerKind = LoggerKind.none
    project: str = "apd"
    wandb_mode: str = "offline"
    """wandb's mode: offline by default, so no account or network is needed"""


@dataclass(kw_only=True)
class DecomposeApp(DecomposeRun):
    target: TargetConfig = MISSING  # chosen from the target group (a TMS, residual-MLP, LM or module option)
    method: MethodConfig = MISSING  # chosen from the method group (apd, spd)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    figures: bool = True


@dataclass(kw_only=True)
class TrainTargetApp:
    target: TargetConfig = MISSING
    ship: bool = False
    """also write the target into apd/toy_models/pretrained/ (the shipped copy)"""
    threads: int = 1


def check_known_keys(cfg: DictConfig, path: str = "") -> None:
    """Raise :class:`ConfigError` (one line) naming a key that its node's schema dataclass lacks.

    Hydra's ``+key=value`` adds a key even to a struct node, and ``OmegaConf.to_object`` then drops
    it silently: ``+method.typo=1`` would run a job with the typo ignored. Nodes typed as a plain
    ``dict`` (``method.C_per_module``, ``target.factory_kwargs``) take any key and are not checked."""
    schema = OmegaConf.get_type(cfg)
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        name = f"{path}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r} (a +{name}=... override?): {schema.__name__} has "
                              f"{', '.join(fields)}; fix the spelling")  # fmt: skip
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{name}.")


def run_name(experiment: str | None, target: str) -> str:
    """A run dir's name: the preset's, or the target's for a run without one (your own target)."""
    return target if experiment in (None, "", "None", "null") else experiment


def exit_on_unknown_keys(cfg: DictConfig) -> None:
    """:func:`check_known_keys` for an entry point: a typo ends the job with the one-line error on
    stderr and exit status 2, before anything runs."""
    try:
        check_known_keys(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def register() -> None:
    if not OmegaConf.has_resolver("apd_run_name"):
        OmegaConf.register_new_resolver("apd_run_name", run_name)
    cs = ConfigStore.instance()
    cs.store(group="target", name="tms_schema", node=TMSTargetConfig)
    cs.store(group="target", name="resid_mlp_schema", node=ResidMLPTargetConfig)
    cs.store(group="target", name="module_schema", node=ModuleTargetConfig)
    cs.store(group="target", name="lm_schema", node=LMTargetConfig)
    cs.store(group="target", name="lm_multi_schema", node=MultiLMTargetConfig)
    cs.store(group="target", name="hf_schema", node=HFTargetConfig)
    cs.store(group="method", name="apd_schema", node=APDConfig)
    cs.store(group="method", name="spd_schema", node=SPDConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(name="decompose_schema", node=DecomposeApp)
    cs.store(name="train_target_schema", node=TrainTargetApp)


register()
