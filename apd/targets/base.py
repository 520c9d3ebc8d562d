"""What every target shares: the ``TargetConfig`` interface, the registry of target kinds, and
getting a target (the shipped file, else trained), shipping (saving) and loading it.

A target config is an option of the experiments' ``target`` config group. It declares everything a
run needs to know about the target: how to build and train it, its data, which modules to
decompose (``modules``, ``tied``), how outputs are compared (``output_loss``), and its own metrics
from its ground truth (``evaluate``); generic code never names a target's layers. Small trained
targets are shipped in ``apd/toy_models/pretrained/`` (``apd.checkpoint``'s target files: tensors +
JSON, loaded with ``weights_only=True``); ``get_target`` loads the shipped file when its config
matches and trains the target otherwise. Each kind lives in its own module of ``apd.targets`` and
registers itself with :func:`register_target_kind`, so that ``target_from_dict`` (run dirs, target
files) finds it by its ``kind``.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from apd.checkpoint import SavedTarget, read_target, write_target
from apd.config import ConfigError, OutputLoss
from apd.evaluation import EvalContext

__all__ = ["TargetConfig", "get_target", "train_target", "save_target", "load_target", "target_from_dict",
           "register_target_kind", "PRETRAINED_DIR"]  # fmt: skip

PRETRAINED_DIR = Path(__file__).parent.parent / "toy_models" / "pretrained"


@dataclass(kw_only=True)
class TargetConfig:
    """Common fields of a target: its name and how it is trained."""

    name: str = "custom"
    """file stem under apd/toy_models/pretrained/ (and the run's label)"""
    pretrained: bool = True
    """load the shipped target when its config matches; train it otherwise"""
    train_steps: int = 5_000
    train_batch_size: int = 1024
    train_lr: float = 5e-3
    train_weight_decay: float = 1e-2
    train_seed: int = 0

    kind: ClassVar[str] = "base"

    def build(self) -> nn.Module:
        raise NotImplementedError

    def train(self, model: nn.Module) -> float:
        raise NotImplementedError

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        """Inputs to decompose on (training data of the decomposition)."""
        raise NotImplementedError

    def eval_batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        """Fresh inputs for a run's metrics (held-out data where the target has a split)."""
        return self.batch(batch_size, generator, device)

    def modules(self) -> list[str]:
        """Module-name patterns to decompose."""
        raise NotImplementedError

    def tied(self) -> dict[str, str]:
        """Declared ties ``{second use: matrix}`` between plain ``nn.Linear`` layers (``TiedLinear``
        layers tie themselves)."""
        return {}

    def output_loss(self) -> OutputLoss:
        """How outputs are compared: MSE, or KL for logits."""
        return OutputLoss.mse

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """The target's own metrics of a decomposition, from its ground truth (default: none; the
        generic ones are computed for every target by ``apd.evaluation``)."""
        return {}

    def target_info(self, model: nn.Module) -> dict[str, Any]:
        """Numbers about a freshly trained target for its shipped JSON, besides the training loss
        (default: none; the language model records its held-out losses)."""
        return {}

    def ready_made(self) -> tuple[nn.Module, dict[str, Any]] | None:
        """The trained model and its info when this target is neither shipped nor trained by apd
        (``target=module``: what its factory returns); None (the default): ``get_target`` loads the
        shipped file or trains it."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


_KINDS: dict[str, type[TargetConfig]] = {}
"""every registered kind (the modules of ``apd.targets`` register theirs on import)"""


T = TypeVar("T", bound=type[TargetConfig])


def register_target_kind(cls: T) -> T:
    """Make a target config class loadable by its ``kind`` (shipped files, run dirs); a duplicate raises."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise ValueError(f"a target kind {cls.kind!r} is already registered ({_KINDS[cls.kind].__name__})")
    _KINDS[cls.kind] = cls
    return cls


def target_from_dict(d: dict[str, Any]) -> TargetConfig:
    """The target config of ``TargetConfig.to_dict``'s dict (a run dir's ``run.json``, a target file)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        raise ConfigError(f"target kind {kind!r} is not known; known kinds: {sorted(_KINDS)}")
    return _KINDS[kind](**d)


def _identity(cfg: TargetConfig) -> dict[str, Any]:
    """The fields that determine the trained weights (not the name or the load policy)."""
    d = cfg.to_dict()
    d.pop("name")
    d.pop("pretrained")
    return d


def train_target(cfg: TargetConfig) -> tuple[nn.Module, dict[str, Any]]:
    model = cfg.build()
    t0 = time.perf_counter()
    loss = cfg.train(model)
    threads = torch.get_num_threads()
    info = {"train_loss": loss, "train_seconds": round(time.perf_counter() - t0, 1), "torch_threads": threads,
            "command": f"python -m experiments.train_target target={cfg.name} ship=true" + (f" threads={threads}" if threads != 1 else "")}  # fmt: skip
    info |= cfg.target_info(model)  # e.g. a language model's held-out losses (not in train_seconds)
    return model, info


def save_target(model: nn.Module, cfg: TargetConfig, info: dict[str, Any], path: Path, *, sidecar: bool = True) -> None:
    """Write ``model``'s weights with ``cfg`` and ``info`` to ``path`` (a target file of
    ``apd.checkpoint``), and (``sidecar``) the config and info readable beside it as ``<stem>.json``."""
    write_target(path, SavedTarget(config=cfg.to_dict(), info=info, state_dict=model.state_dict()))
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps({"config": cfg.to_dict(), **info}, indent=2) + "\n")


def load_target(path: str | Path) -> tuple[nn.Module, TargetConfig, dict[str, Any]]:
    """The model, config and info of a target file written by ``save_target``."""
    saved = read_target(path)
    cfg = target_from_dict(saved.config)
    model = cfg.build()
    model.load_state_dict(saved.state_dict)
    return model, cfg, saved.info


def get_target(cfg: TargetConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped target named ``cfg.name`` if its training config equals ``cfg``, else a freshly
    trained one (a ``module`` target: what its factory returns). The info dict says which
    (``source``) and the training loss."""
    made = cfg.ready_made()
    if made is not None:
        return made
    path = PRETRAINED_DIR / f"{cfg.name}.pt"
    if cfg.pretrained and path.is_file():
        model, shipped, info = load_target(path)
        if _identity(shipped) == _identity(cfg):
            return model, {**info, "source": str(path)}
    model, info = train_target(cfg)
    return model, {**info, "source": "trained in this run"}
