"""Toy targets as configs: build, train, ship (save) and load them, and draw their data.

``TMSTargetConfig`` and ``ResidMLPTargetConfig`` are the options of the experiments' ``target``
config group. Small trained targets are shipped in ``apd/toy_models/pretrained/`` (tensors + JSON,
loaded with ``weights_only=True``); ``get_target`` loads the shipped file when its config matches
and trains the target otherwise.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apd.decomposition import CheckpointError, atomic_save, safe_load
from apd.toy_models.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    decomposed_module_names,
    monosemantic_baseline,
    resid_mlp_batch,
    train_resid_mlp,
)
from apd.toy_models.tms import TMS, TMSConfig, tms_batch, train_tms

__all__ = ["TargetConfig", "TMSTargetConfig", "ResidMLPTargetConfig", "get_target", "train_target",
           "save_target", "load_target", "PRETRAINED_DIR"]  # fmt: skip

PRETRAINED_DIR = Path(__file__).parent / "toy_models" / "pretrained"
_FORMAT = "apd-target/1"


@dataclass(kw_only=True)
class TargetConfig:
    """Common fields of a toy target: its name and how it is trained."""

    name: str = "custom"
    """file stem under apd/toy_models/pretrained/ (and the run's label)"""
    pretrained: bool = True
    """load the shipped target when its config matches; train it otherwise"""
    train_steps: int = 5_000
    train_batch_size: int = 1024
    train_lr: float = 5e-3
    train_weight_decay: float = 1e-2
    train_seed: int = 0

    kind = "base"

    def build(self) -> nn.Module:
        raise NotImplementedError

    def train(self, model: nn.Module) -> float:
        raise NotImplementedError

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        raise NotImplementedError

    def modules(self) -> list[str]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class TMSTargetConfig(TargetConfig):
    """Toy model of superposition n-m (SPEC §2.1), optionally with the hidden identity (+ID)."""

    n_features: int = 5
    n_hidden: int = 2
    identity: bool = False
    feature_probability: float = 0.05

    kind = "tms"

    def build(self) -> TMS:
        torch.manual_seed(self.train_seed)
        return TMS(TMSConfig(n_features=self.n_features, n_hidden=self.n_hidden, identity=self.identity,
                             feature_probability=self.feature_probability))  # fmt: skip

    def train(self, model: nn.Module) -> float:
        assert isinstance(model, TMS)
        return train_tms(model, self.train_steps, self.train_batch_size, self.train_lr, self.train_weight_decay, self.train_seed)

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return tms_batch(self.n_features, batch_size, self.feature_probability, generator, device)

    def modules(self) -> list[str]:
        return ["enc", "dec"] + (["hidden"] if self.identity else [])


@dataclass(kw_only=True)
class ResidMLPTargetConfig(TargetConfig):
    """Residual MLP "compressed computation" toy (SPEC §2.2)."""

    n_features: int = 100
    d_embed: int = 1000
    d_mlp: int = 50
    n_layers: int = 1
    feature_probability: float = 0.01
    embed_seed: int = 0
    train_steps: int = 10_000
    train_batch_size: int = 2048
    train_lr: float = 3e-3

    kind = "resid_mlp"

    def model_config(self) -> ResidMLPConfig:
        return ResidMLPConfig(n_features=self.n_features, d_embed=self.d_embed, d_mlp=self.d_mlp, n_layers=self.n_layers,
                              feature_probability=self.feature_probability, embed_seed=self.embed_seed,
                              init_seed=self.train_seed)  # fmt: skip

    def build(self) -> ResidMLP:
        return ResidMLP(self.model_config())

    def train(self, model: nn.Module) -> float:
        assert isinstance(model, ResidMLP)
        result = train_resid_mlp(model, self.train_steps, self.train_batch_size, self.train_lr, self.train_weight_decay, self.train_seed)
        return float(result["final_loss"])

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return resid_mlp_batch(self.n_features, batch_size, self.feature_probability, generator, device)

    def modules(self) -> list[str]:
        return decomposed_module_names(self.n_layers)

    def monosemantic(self) -> ResidMLP:
        return monosemantic_baseline(self.model_config())


_KINDS: dict[str, type[TargetConfig]] = {c.kind: c for c in (TMSTargetConfig, ResidMLPTargetConfig)}


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
    info = {"train_loss": loss, "train_seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
            "command": f"python -m experiments.train_target target={cfg.name} ship=true"}  # fmt: skip
    return model, info


def save_target(model: nn.Module, cfg: TargetConfig, info: dict[str, Any], path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save({"format": _FORMAT, "config": json.dumps(cfg.to_dict()), "info": json.dumps(info), "state_dict": state}, path)
    path.with_suffix(".json").write_text(json.dumps({"config": cfg.to_dict(), **info}, indent=2) + "\n")


def load_target(path: str | Path) -> tuple[nn.Module, TargetConfig, dict[str, Any]]:
    obj = safe_load(Path(path))
    if obj.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an apd target file")
    d = json.loads(obj["config"])
    cfg = _KINDS[d.pop("kind")](**d)
    model = cfg.build()
    model.load_state_dict(obj["state_dict"])
    return model, cfg, json.loads(obj["info"])


def get_target(cfg: TargetConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped target named ``cfg.name`` if its training config equals ``cfg``, else a freshly
    trained one. The info dict says which (``source``) and the training loss."""
    path = PRETRAINED_DIR / f"{cfg.name}.pt"
    if cfg.pretrained and path.is_file():
        model, shipped, info = load_target(path)
        if _identity(shipped) == _identity(cfg):
            return model, {**info, "source": str(path)}
    model, info = train_target(cfg)
    return model, {**info, "source": "trained in this run"}


import apd.lm_target  # noqa: E402,F401  (registers the "lm" kind in _KINDS; it subclasses TargetConfig, so it comes last)
