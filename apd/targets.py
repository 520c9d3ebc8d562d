"""Targets as configs: build, train, ship (save) and load them, draw their data, score a decomposition.

A target config is an option of the experiments' ``target`` config group. It declares everything a
run needs to know about the target: how to build and train it, its data, which modules to
decompose (``modules``, ``tied``), how outputs are compared (``output_loss``), and its own metrics
from its ground truth (``evaluate``); generic code never names a target's layers. Small trained toy
targets are shipped in ``apd/toy_models/pretrained/`` (tensors + JSON, loaded with
``weights_only=True``); ``get_target`` loads the shipped file when its config matches and trains the
target otherwise. ``ModuleTargetConfig`` (``target=module``) imports your own model and data
factories by dotted path.
"""

import dataclasses
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from apd.config import ConfigError, OutputLoss
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

if TYPE_CHECKING:
    from apd.evaluation import EvalContext

__all__ = ["TargetConfig", "TMSTargetConfig", "ResidMLPTargetConfig", "ModuleTargetConfig", "get_target", "train_target",
           "save_target", "load_target", "target_from_dict", "register_target_kind", "PRETRAINED_DIR"]  # fmt: skip

PRETRAINED_DIR = Path(__file__).parent / "toy_models" / "pretrained"
_FORMAT = "apd-target/1"


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

    def evaluate(self, ctx: "EvalContext") -> dict[str, float]:
        """The target's own metrics of a decomposition, from its ground truth (default: none; the
        generic ones are computed for every target by ``apd.evaluation``)."""
        return {}

    def target_info(self, model: nn.Module) -> dict[str, Any]:
        """Numbers about a freshly trained target for its shipped JSON, besides the training loss
        (default: none; the language model records its held-out losses)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class TMSTargetConfig(TargetConfig):
    """Toy model of superposition n-m (SPEC §2.1), optionally with the hidden identity (+ID)."""

    n_features: int = 5
    n_hidden: int = 2
    identity: bool = False
    feature_probability: float = 0.05

    kind: ClassVar[str] = "tms"

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

    def evaluate(self, ctx: "EvalContext") -> dict[str, float]:
        from apd.metrics.tms import tms_metrics

        return tms_metrics(ctx.target, ctx.dec, ctx)  # type: ignore[arg-type]


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

    kind: ClassVar[str] = "resid_mlp"

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

    def evaluate(self, ctx: "EvalContext") -> dict[str, float]:
        from apd.metrics.resid_mlp import resid_mlp_run_metrics

        return resid_mlp_run_metrics(ctx.target, self.monosemantic().to(ctx.device), ctx)  # type: ignore[arg-type]


def _import(path: str, what: str) -> Callable[..., Any]:
    """The object at ``path`` ('package.module:name' or 'package.module.name')."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{what}={path!r}: give an importable path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what}={path!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH (run from its "
                          "project root) and spelt right?") from None  # fmt: skip
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ConfigError(f"{what}={path!r}: {module_name} has no {attr!r}; it has {public}")
    return getattr(module, attr)


@dataclass(kw_only=True)
class ModuleTargetConfig(TargetConfig):
    """Your own model (``target=module``): a factory that returns the trained ``nn.Module`` and a
    data factory ``data(batch_size, generator) -> inputs`` (a tensor with the batch first; integer
    token ids are fine), both imported by dotted path, e.g.
    ``target.factory=mypkg.models:load_trained target.data=mypkg.data:batch 'target.decompose=[fc1,fc2]'``.
    Generic metrics only (faithfulness, reconstruction, L0): the toolkit knows no ground truth for it."""

    name: str = "module"
    factory: str = ""
    """'package.module:function' returning the trained model (called with ``factory_kwargs``)"""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    """'package.module:function' called as ``data(batch_size, generator, **data_kwargs)`` for a batch of inputs"""
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    decompose: list[str] = field(default_factory=list)
    """module-name patterns to decompose (fnmatch over ``named_modules``)"""
    tie: dict[str, str] = field(default_factory=dict)
    """declared ties {second use: matrix} between plain nn.Linear layers"""
    loss: OutputLoss = OutputLoss.mse
    """how outputs are compared: mse, or kl when the model returns logits"""

    kind: ClassVar[str] = "module"

    def __post_init__(self) -> None:
        if not self.factory or not self.data:
            raise ConfigError("target=module needs target.factory and target.data: importable paths 'package.module:function' "
                              "of your model factory and of your batch function")  # fmt: skip
        if not self.decompose:
            raise ConfigError("target=module needs target.decompose: the module names to decompose, e.g. 'target.decompose=[fc1,fc2]'")
        self.loss = OutputLoss(self.loss)

    def build(self) -> nn.Module:
        model = _import(self.factory, "target.factory")(**self.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"target.factory={self.factory!r} returned a {type(model).__name__}, not an nn.Module")
        return model

    def train(self, model: nn.Module) -> float:
        raise ConfigError("target=module decomposes a trained model its factory returns; train it in your own code")

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        x = _import(self.data, "target.data")(batch_size, generator, **self.data_kwargs)
        if not isinstance(x, Tensor):
            raise ConfigError(f"target.data={self.data!r} returned a {type(x).__name__}, not a tensor of inputs")
        return x.to(device)

    def modules(self) -> list[str]:
        return list(self.decompose)

    def tied(self) -> dict[str, str]:
        return dict(self.tie)

    def output_loss(self) -> OutputLoss:
        return self.loss

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"loss": self.loss.value}


_KINDS: dict[str, type[TargetConfig]] = {}


def register_target_kind(cls: type[TargetConfig]) -> type[TargetConfig]:
    """Make a target config class loadable by its ``kind`` (shipped files, run dirs); a duplicate raises."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise ValueError(f"a target kind {cls.kind!r} is already registered ({_KINDS[cls.kind].__name__})")
    _KINDS[cls.kind] = cls
    return cls


for _cls in (TMSTargetConfig, ResidMLPTargetConfig, ModuleTargetConfig):
    register_target_kind(_cls)


def target_from_dict(d: dict[str, Any]) -> TargetConfig:
    d = dict(d)
    kind = d.pop("kind")
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


def save_target(model: nn.Module, cfg: TargetConfig, info: dict[str, Any], path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save({"format": _FORMAT, "config": json.dumps(cfg.to_dict()), "info": json.dumps(info), "state_dict": state}, path)
    path.with_suffix(".json").write_text(json.dumps({"config": cfg.to_dict(), **info}, indent=2) + "\n")


def load_target(path: str | Path) -> tuple[nn.Module, TargetConfig, dict[str, Any]]:
    obj = safe_load(Path(path))
    if obj.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an apd target file")
    cfg = target_from_dict(json.loads(obj["config"]))
    model = cfg.build()
    model.load_state_dict(obj["state_dict"])
    return model, cfg, json.loads(obj["info"])


def get_target(cfg: TargetConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped target named ``cfg.name`` if its training config equals ``cfg``, else a freshly
    trained one (a ``module`` target: what its factory returns). The info dict says which
    (``source``) and the training loss."""
    if isinstance(cfg, ModuleTargetConfig):
        return cfg.build(), {"source": cfg.factory, "train_loss": float("nan")}
    path = PRETRAINED_DIR / f"{cfg.name}.pt"
    if cfg.pretrained and path.is_file():
        model, shipped, info = load_target(path)
        if _identity(shipped) == _identity(cfg):
            return model, {**info, "source": str(path)}
    model, info = train_target(cfg)
    return model, {**info, "source": "trained in this run"}


import apd.lm_target  # noqa: E402,F401  (registers the "lm" kind; it subclasses TargetConfig, so it comes last)
