"""ConfigStore registration of ``python -m experiments.compare`` (the APD vs SAE comparison)."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from apd.compare import CompareConfig
from experiments import schema  # noqa: F401  (registers the shared groups: target, method, logger)


@dataclass(kw_only=True)
class CompareApp(CompareConfig):
    apd_experiment: str = MISSING
    """decompose preset (conf/experiment/<name>.yaml) whose target and APD settings are compared"""
    apd_overrides: list[str] = field(default_factory=list)
    """further overrides of that preset, e.g. ["method.simplicity_coeff=1.0"]"""
    spd_experiment: str | None = None
    """decompose preset of the SPD rows (e.g. spd_tms_5_2; used when spd.enabled and spd.runs is empty)"""
    spd_overrides: list[str] = field(default_factory=list)
    threads: int = 1
    """torch intra-op threads"""
    figures: bool = True
    browser: bool = True
    """language model: also write the feature browser of the comparison (RUN_DIR/browser/index.html)"""


def register() -> None:
    ConfigStore.instance().store(name="compare_schema", node=CompareApp)


register()
