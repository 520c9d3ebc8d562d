"""The files apd writes, in one place: their names, formats, how they are written and read back.

Every file is a ``torch.save`` dict of tensors and JSON strings with a ``format`` tag, written
atomically (:func:`atomic_save`) and read with ``weights_only=True`` (:func:`safe_load`: a file
holding pickled objects is refused). A missing, damaged or foreign file raises
:class:`CheckpointError` naming the file and what to do.

- ``decomposition.pt`` (:data:`DECOMPOSITION_FORMAT`): one finished decomposition
  (:class:`SavedDecomposition`); :func:`read_decomposition` also reads the earlier single-method
  format (APD only) and one seed's state out of a training checkpoint.
- ``checkpoint.pt`` (:data:`CHECKPOINT_FORMAT`): a resumable training state of one or several seeds
  (:class:`TrainingCheckpoint`: components, optimiser, every rank's RNG state, data position).
- ``<name>.pt`` of a target (:data:`TARGET_FORMAT`): a target's config, training facts and weights,
  shipped under ``apd/toy_models/pretrained/`` and kept in each run dir as ``target.pt``
  (:data:`TARGET_NAME`), pinned there by :func:`state_sha256` in ``run.json``.

This module knows the files, not the objects built from them: ``apd.decomposition`` turns a
:class:`SavedDecomposition` into a ``Decomposition``, ``apd.train`` resumes from a
:class:`TrainingCheckpoint`, ``apd.targets`` builds a target from a :class:`SavedTarget`.
"""

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "atomic_save", "safe_load", "state_sha256", "FILE_NAME", "CHECKPOINT_NAME", "TARGET_NAME",
           "DECOMPOSITION_FORMAT", "CHECKPOINT_FORMAT", "TARGET_FORMAT", "SavedDecomposition", "write_decomposition",
           "read_decomposition", "find_decomposition_file", "TrainingCheckpoint", "write_checkpoint", "read_checkpoint",
           "checkpoint_step", "SavedTarget", "write_target", "read_target"]  # fmt: skip

FILE_NAME = "decomposition.pt"
CHECKPOINT_NAME = "checkpoint.pt"
"""a training checkpoint: every seed's state plus optimiser/RNG/data state"""
TARGET_NAME = "target.pt"
"""the target a run decomposed, kept in its run dir"""

DECOMPOSITION_FORMAT = "apd-decomposition/2"
CHECKPOINT_FORMAT = "apd-checkpoint/2"
TARGET_FORMAT = "apd-target/1"
_OLD_FORMATS = ("apd-decomposition/1", "apd-checkpoint/1")
"""the single-method files of earlier versions: APD only (A, B and an APDConfig), one seed"""


class CheckpointError(RuntimeError):
    """A decomposition, checkpoint or target file is missing, corrupt, or not one of ours."""


# ---------------------------------------------------------------------------- any file
def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain containers only, no arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only load failed: {str(e).splitlines()[0]}); only load files written by apd"
        ) from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold an apd dict (found {type(obj).__name__})")
    return obj


def _require(obj: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is an {what} without {missing}: the file is damaged or was not written by apd")


def state_sha256(state: dict[str, Tensor]) -> str:
    """A hex sha256 of a state dict's names, dtypes, shapes and values (independent of how
    ``torch.save`` lays out a file, and of the device the tensors are on)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- decompositions
@dataclass
class SavedDecomposition:
    """One seed's trained state as stored: the method's config as its JSON dict, the trained
    tensors by their ``ComponentModel`` names (``model.<module>.A`` / ``.B``, a method's other
    state), the decomposed modules and ties, the target's decomposed weights, the loss history."""

    method: str
    config: dict[str, Any]
    modules: list[str]
    tied: dict[str, str]
    params: dict[str, Tensor]
    target_weights: dict[str, Tensor]
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)


def write_decomposition(path: Path, saved: SavedDecomposition) -> None:
    atomic_save(
        {
            "format": DECOMPOSITION_FORMAT,
            "method": saved.method,
            "config": json.dumps(saved.config),
            "modules": json.dumps(saved.modules),
            "kinds": json.dumps(saved.kinds),
            "tied": json.dumps(saved.tied),
            "history": json.dumps(saved.history),
            "step": saved.step,
            "params": saved.params,
            "target_weights": saved.target_weights,
        },
        path,
    )


def find_decomposition_file(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file; in a folder (e.g. a run dir) its ``decomposition.pt``, else
    the first one below it, else the first training checkpoint below it."""
    p = Path(path)
    if not p.is_dir():
        return p
    hits = [p / FILE_NAME] if (p / FILE_NAME).is_file() else sorted(p.rglob(FILE_NAME))
    hits = hits or sorted(p.rglob(CHECKPOINT_NAME))
    if not hits:
        raise CheckpointError(f"no {FILE_NAME} or {CHECKPOINT_NAME} in {p} or below it; pass the run dir or the .pt file")
    return hits[0]


def read_decomposition(path: str | os.PathLike, seed: int | None = None) -> SavedDecomposition:
    """The decomposition in a file or folder (:func:`find_decomposition_file`): a
    ``decomposition.pt`` of this or the earlier single-method format, or the state of seed ``seed``
    (default: the first) at the step a training checkpoint was written."""
    p = find_decomposition_file(path)
    obj = safe_load(p)
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        return read_checkpoint(p, obj).seed_state(seed, p)
    if fmt in _OLD_FORMATS:
        _require(obj, ("config", "A", "B", "tied", "target_weights", "step", "history"), p, fmt)
        A, B, tied = obj["A"], obj["B"], json.loads(obj["tied"])
        params = {f"model.{n}.A": A[n] for n in A} | {f"model.{n}.B": B[n] for n in A}  # ComponentModel.param_name
        from apd.methods.apd import APD  # the earlier single-method format was APD's alone

        return SavedDecomposition(method=APD.name, config=json.loads(obj["config"]), modules=list(A) + list(tied), tied=tied,
                                  params=params, target_weights=obj["target_weights"], step=int(obj["step"]),
                                  history=json.loads(obj["history"]))  # fmt: skip
    if fmt != DECOMPOSITION_FORMAT:
        raise CheckpointError(f"{p} is not an apd decomposition (format {fmt!r}, want {DECOMPOSITION_FORMAT!r})")
    _require(obj, ("method", "config", "modules", "tied", "params", "target_weights", "step", "history"), p, fmt)
    return SavedDecomposition(
        method=obj["method"],
        config=json.loads(obj["config"]),
        modules=json.loads(obj["modules"]),
        tied=json.loads(obj["tied"]),
        params=obj["params"],
        target_weights=obj["target_weights"],
        step=int(obj["step"]),
        history=json.loads(obj["history"]),
        kinds=json.loads(obj.get("kinds", "{}")),
    )


# ---------------------------------------------------------------------------- training checkpoints
@dataclass
class TrainingCheckpoint:
    """A resumable training state. ``params`` holds every trained tensor, stacked along a leading
    seed dimension when ``stacked`` (several seeds trained at once); ``config`` is the run's method
    config as given (its ``seed`` the first seed's); ``rng`` holds every rank's RNG state in rank
    order; ``data_consumed`` the batches drawn from an iterable so far; ``histories`` one loss
    history per seed."""

    method: str
    config: dict[str, Any]
    modules: list[str]
    tied: dict[str, str]
    kinds: dict[str, str]
    target_weights: dict[str, Tensor]
    seeds: list[int]
    stacked: bool
    step: int
    params: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, Any]]
    data_consumed: int
    histories: list[list[dict[str, float]]]
    method_state: list[dict[str, Tensor]] = field(default_factory=list)
    """every rank's ``Method.training_state`` in rank order (empty: the method keeps none)"""

    def seed_state(self, seed: int | None = None, path: Path | str = "the checkpoint") -> SavedDecomposition:
        """Seed ``seed``'s decomposition at this step (default: the first seed)."""
        seed = self.seeds[0] if seed is None else seed
        if seed not in self.seeds:
            raise CheckpointError(f"{path} holds seeds {self.seeds}, not {seed}")
        i = self.seeds.index(seed)
        return SavedDecomposition(
            method=self.method, config=self.config | {"seed": seed}, modules=self.modules, tied=self.tied,
            params={n: (p[i] if self.stacked else p) for n, p in self.params.items()}, target_weights=self.target_weights,
            step=self.step, history=self.histories[i], kinds=self.kinds,
        )  # fmt: skip


def write_checkpoint(path: Path, ckpt: TrainingCheckpoint) -> None:
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "method": ckpt.method,
            "config": json.dumps(ckpt.config),
            "modules": json.dumps(ckpt.modules),
            "kinds": json.dumps(ckpt.kinds),
            "tied": json.dumps(ckpt.tied),
            "target_weights": ckpt.target_weights,
            "seeds": ckpt.seeds,
            "stacked": ckpt.stacked,
            "step": ckpt.step,
            "params": ckpt.params,
            "optimizer": ckpt.optimizer,
            "rng": ckpt.rng,
            "world_size": len(ckpt.rng),
            "data_consumed": ckpt.data_consumed,
            "histories": json.dumps(ckpt.histories),
            "method_state": ckpt.method_state,
        },
        path,
    )


_CHECKPOINT_KEYS = ("method", "config", "modules", "tied", "target_weights", "seeds", "stacked", "step", "params",
                    "optimizer", "rng", "data_consumed", "histories")  # fmt: skip


def read_checkpoint(path: Path, obj: dict[str, Any] | None = None) -> TrainingCheckpoint:
    """The training checkpoint at ``path`` (``obj``: its contents, when already loaded)."""
    obj = safe_load(path) if obj is None else obj
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this apd version (format {obj.get('format')!r}); "
            "its decomposition still loads with apd.load_decomposition, but training cannot resume from it: "
            "use a new checkpoint directory, or resume=False to start over there"
        )
    _require(obj, _CHECKPOINT_KEYS, path, CHECKPOINT_FORMAT)
    return TrainingCheckpoint(
        method=obj["method"],
        config=json.loads(obj["config"]),
        modules=json.loads(obj["modules"]),
        tied=json.loads(obj["tied"]),
        kinds=json.loads(obj.get("kinds", "{}")),
        target_weights=obj["target_weights"],
        seeds=[int(s) for s in obj["seeds"]],
        stacked=bool(obj["stacked"]),
        step=int(obj["step"]),
        params=obj["params"],
        optimizer=obj["optimizer"],
        rng=obj["rng"] if isinstance(obj["rng"], list) else [obj["rng"]],  # one process: a bare dict
        data_consumed=int(obj["data_consumed"]),
        histories=json.loads(obj["histories"]),
        method_state=list(obj.get("method_state", [])),  # absent in files written before it existed
    )


def checkpoint_step(path: Path) -> int:
    """The step the training checkpoint at ``path`` was written at (0 if there is none)."""
    return read_checkpoint(path).step if path.is_file() else 0


# ---------------------------------------------------------------------------- targets
@dataclass
class SavedTarget:
    """A target as stored: its config's dict (with its ``kind``), facts about its training, weights."""

    config: dict[str, Any]
    info: dict[str, Any]
    state_dict: dict[str, Tensor]


def write_target(path: Path, saved: SavedTarget) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in saved.state_dict.items()}
    atomic_save({"format": TARGET_FORMAT, "config": json.dumps(saved.config), "info": json.dumps(saved.info), "state_dict": state},
                path)  # fmt: skip


def read_target(path: str | os.PathLike) -> SavedTarget:
    p = Path(path)
    obj = safe_load(p)
    if obj.get("format") != TARGET_FORMAT:
        raise CheckpointError(f"{p} is not an apd target file (format {obj.get('format')!r}, want {TARGET_FORMAT!r})")
    _require(obj, ("config", "info", "state_dict"), p, TARGET_FORMAT)
    return SavedTarget(config=json.loads(obj["config"]), info=json.loads(obj["info"]), state_dict=obj["state_dict"])
