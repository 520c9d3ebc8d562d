"""Hydra ConfigStore registration: every group option is checked against a dataclass, so a
misspelt key or a wrong type fails at compose time."""

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from apd import APDConfig, MethodConfig, SPDConfig
from apd.experiment import DecomposeRun
from apd.targets import LMTargetConfig, ModuleTargetConfig, ResidMLPTargetConfig, TargetConfig, TMSTargetConfig


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


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="target", name="tms_schema", node=TMSTargetConfig)
    cs.store(group="target", name="resid_mlp_schema", node=ResidMLPTargetConfig)
    cs.store(group="target", name="module_schema", node=ModuleTargetConfig)
    cs.store(group="target", name="lm_schema", node=LMTargetConfig)
    cs.store(group="method", name="apd_schema", node=APDConfig)
    cs.store(group="method", name="spd_schema", node=SPDConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(name="decompose_schema", node=DecomposeApp)
    cs.store(name="train_target_schema", node=TrainTargetApp)


register()
