"""One experiment run: target → decomposition (any method) → metrics → artifacts in a run dir.

Plain dataclasses (``experiments/`` registers them in Hydra's ConfigStore); nothing here imports
Hydra, matplotlib or a logging service. Loggers are callbacks passed in.

A run dir holds ``run.json`` (the resolved run: target, method and its config, seed, batch size,
and the sha256 of the target's weights), ``target.pt`` (the target it decomposes, written when the
run starts), ``metrics.jsonl`` (loss terms every ``log_every`` steps), ``checkpoint.pt``
(resumable), ``decomposition.pt`` and ``metrics.json``. Started again on the same dir a run resumes
from its checkpoint on its own ``target.pt``, a finished one is not redone, and a run with
*different* settings is refused (:class:`RunDirError`) rather than mixed with the old one.
``load_run`` gives a notebook the target (the run's own: never retrained, unchanged when a shipped
target is retrained later), the decomposition, the run and its metrics.
"""

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apd.checkpoint import CHECKPOINT_NAME, FILE_NAME, TARGET_NAME, CheckpointError, checkpoint_step, state_sha256
from apd.config import ConfigError, MethodConfig, OutputLoss
from apd.decomposition import Decomposition, config_from, load_decomposition
from apd.distributed import is_main, rank_and_world
from apd.evaluation import evaluate
from apd.methods import APDConfig, method_for
from apd.targets import TargetConfig, TMSTargetConfig, get_target, load_target, save_target, target_from_dict
from apd.train import decompose, decompose_seeds

__all__ = ["DecomposeRun", "RunResult", "RunArtifacts", "RunDirError", "run_decompose", "run_decompose_seeds",
           "seed_run_dir", "seed_run_dirs", "load_run", "reevaluate", "check_run_dir", "cpu_share", "run_target", "RUN_FILE"]  # fmt: skip

RUN_FILE = "run.json"


class RunDirError(ConfigError):
    """A run dir holds a run with other settings than the one asked for."""


def cpu_share(parallel_jobs: int | None = None) -> int:
    """CPUs this job may use: SLURM's allocation if set; else the CPUs this process may run on,
    divided among ``parallel_jobs`` jobs running side by side (at least 1); else (None: no launcher
    shares this machine out) 1."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    if parallel_jobs is None:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, parallel_jobs))


@dataclass(kw_only=True)
class DecomposeRun:
    """A decomposition experiment. ``seed``, ``steps`` and ``device`` are the top-level knobs: each,
    when given, is written into ``method`` (its config); left out (None), the method's own value is
    kept. After construction all three show the resolved values, so a saved run has one value for
    each. The method's ``output_loss`` left unset (None) becomes the target's (KL for the language
    model, ``target.loss`` for your own module, else MSE); a value set explicitly is kept."""

    target: TargetConfig = field(default_factory=TMSTargetConfig)
    method: MethodConfig = field(default_factory=APDConfig)
    seed: int | None = None
    """seed of the components' initialisation and of the data stream (None: method.seed)"""
    steps: int | None = None
    """training steps (None: method.steps)"""
    device: str | None = None
    """torch device (None: method.device)"""
    batch_size: int = 2048
    threads: int = 0
    """torch intra-op threads for this run; 0 (the default) = automatic: the job's SLURM allocation
    (``SLURM_CPUS_PER_TASK``, i.e. ``hydra.launcher.cpus_per_task``) inside a SLURM job, the CPUs
    divided among joblib's ``n_jobs`` in a joblib sweep, else 1 (fastest for the toy models)"""
    n_eval: int = 10_000
    """fresh samples for the output-level metrics"""
    n_seeds: int = 1
    """train seeds seed, seed+1, ..., seed+n_seeds-1 at once in this process (stacked instances,
    ``apd.decompose_seeds``); each seed gets its own ``seed_<s>/`` run dir"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.threads < 0 or self.n_eval < 1 or self.n_seeds < 1:
            raise ConfigError(f"batch_size={self.batch_size}, threads={self.threads}, n_eval={self.n_eval}, "
                              f"n_seeds={self.n_seeds}: batch_size, n_eval and n_seeds must be >= 1, threads >= 0 "
                              "(0 = automatic)")  # fmt: skip
        # each top-level knob left out (None) takes the method's value; one given is written into the method
        knobs = {"seed": self.seed, "steps": self.steps, "device": self.device}
        changes: dict[str, Any] = {k: getattr(self.method, k) if v is None else v for k, v in knobs.items()}
        if getattr(self.method, "output_loss", OutputLoss.mse) is None:  # unset: the target decides
            changes["output_loss"] = self.target.output_loss()
        self.method = dataclasses.replace(self.method, **changes)
        self.seed, self.steps, self.device = changes["seed"], changes["steps"], changes["device"]
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but no CUDA device is available here; use device=cpu")

    def identity(self) -> dict[str, Any]:
        """What determines the run's results (not threads, device or where it writes): compared
        with a run dir's ``run.json`` before resuming or reusing it."""
        return {"target": self.target.to_dict(), "method": self.method.method, "config": self.method.to_dict() | {"device": None},
                "seed": self.seed, "batch_size": self.batch_size, "n_eval": self.n_eval, "n_seeds": self.n_seeds}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return self.identity() | {"config": self.method.to_dict(), "device": self.device, "threads": self.threads}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecomposeRun":
        return cls(target=target_from_dict(d["target"]), method=config_from(d["method"], d["config"]), seed=d["seed"],
                   device=d.get("device", "cpu"), batch_size=d["batch_size"], threads=d.get("threads", 1),
                   n_eval=d["n_eval"], n_seeds=d.get("n_seeds", 1))  # fmt: skip


@dataclass
class RunResult:
    metrics: dict[str, float]
    decomposition: Decomposition
    target: nn.Module


@dataclass
class RunArtifacts:
    """A finished (or checkpointed) run, loaded for a notebook by :func:`load_run`."""

    target: nn.Module
    decomposition: Decomposition
    run: DecomposeRun
    metrics: dict[str, float]
    """metrics.json (empty while the run is unfinished)"""
    run_dir: Path

    def component_model(self):  # noqa: ANN201
        """The decomposition attached to the target: ``cm(x, masks=...)`` (SPD's
        causal importances: ``result.decomposition.causal_importances(x, result.target)``)."""
        return self.decomposition.component_model or self.decomposition.attach(self.target)


def _diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def check_run_dir(out_dir: str | Path, run: DecomposeRun) -> None:
    """Raise :class:`RunDirError` if ``out_dir`` holds a run (or the checkpoint of one) with other
    settings than ``run``; a dir with the same run, or no run, passes."""
    out = Path(out_dir)
    saved_file = out / RUN_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        now = run.identity()
        saved_identity = {k: saved.get(k) for k in now} | {"config": {**saved.get("config", {}), "device": None}}
        if saved_identity != now:
            raise RunDirError(
                f"{out} holds a run with other settings ({'; '.join(_diff(saved_identity, now)[:8])}); "
                "use another run dir (e.g. hydra.run.dir=...), or delete that one to start over"
            )
        return
    if (out / FILE_NAME).is_file() or (out / CHECKPOINT_NAME).is_file():  # written before run.json existed
        dec = load_decomposition(out)
        if dec.config.to_dict() | {"device": None} != run.method.to_dict() | {"device": None}:
            diff = _diff(dec.config.to_dict(), run.method.to_dict())
            raise RunDirError(f"{out} holds a decomposition with other settings ({'; '.join(diff[:8])}); "
                              "use another run dir, or delete that one to start over")  # fmt: skip


def _start(run: DecomposeRun, out_dir: str | Path, seed_runs: dict[Path, DecomposeRun] | None = None) -> tuple[Path, nn.Module, dict, float]:
    """Check and claim the run dir (rank 0 of a data-parallel run; ``seed_runs``: a multi-seed
    run's ``seed_<s>/`` dirs and runs too), set the thread count, get the target: the run's own
    ``target.pt`` when an earlier start wrote it, else ``get_target`` and then written into each run
    dir and pinned in its ``run.json``. Returns (out, target, its info, start time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(out, run)
    runs = seed_runs or {out: run}
    for d, r in runs.items():
        if d != out:
            d.mkdir(parents=True, exist_ok=True)
            check_run_dir(d, r)
    if is_main():
        saved = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
        pin = {k: saved[k] for k in ("target_sha256",) if k in saved}  # kept: run_target checks target.pt against it
        (out / RUN_FILE).write_text(json.dumps(run.to_dict() | pin, indent=2) + "\n")
    torch.set_num_threads(run.threads or cpu_share())
    t0 = time.perf_counter()
    own = [d for d in runs if (d / TARGET_NAME).is_file()]
    if own:  # a resumed or finished run: the target it started with
        target, info = run_target(own[0])
    else:
        target, info = get_target(run.target)
        for d in runs:  # a run dir of an earlier version: its decomposition must be of this target
            if (d / FILE_NAME).is_file() or (d / CHECKPOINT_NAME).is_file():
                print(f"warning: {_check_decomposed(d, load_decomposition(d), target, info['source'])}")
    sha = state_sha256(target.state_dict())
    if is_main():
        for d, r in runs.items():
            if d not in own:
                save_target(target, run.target, info, d / TARGET_NAME, sidecar=False)
            (d / RUN_FILE).write_text(json.dumps(r.to_dict() | {"target_sha256": sha}, indent=2) + "\n")
    return out, target.to(run.device), info, t0


def _finished(d: Path) -> bool:
    return (d / "metrics.json").is_file() and (d / FILE_NAME).is_file()


def _metrics(dec: Decomposition, target: nn.Module, run: DecomposeRun, extra: dict[str, Any]) -> dict[str, Any]:
    metrics = evaluate(dec, target, run.target, n_eval=run.n_eval, seed=run.seed, device=run.device)
    metrics |= extra
    warnings = method_for(dec.config).run_warnings(metrics)
    if warnings:
        metrics["warnings"] = warnings
        for w in warnings:
            print(f"warning (seed {run.seed}): {w}")
    return metrics


def run_decompose(
    run: DecomposeRun, out_dir: str | Path, callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> RunResult:  # fmt: skip
    """Get the target (shipped or trained), decompose it, score it; write the run dir (module docstring).

    In a ``torch.distributed`` group the run is data-parallel over the ranks (``run.batch_size`` is
    the global batch); rank 0 writes the run dir and evaluates, the others return empty metrics."""
    out, target, info, t0 = _start(run, out_dir)
    if _finished(out):  # finished: not redone
        return RunResult(json.loads((out / "metrics.json").read_text()), load_decomposition(out), target)

    main = is_main()
    if main:
        _truncate_log(out)
    with (out / "metrics.jsonl").open("a") if main else contextlib.nullcontext() as log:

        def on_log(step: int, terms: dict[str, float]) -> None:
            log.write(json.dumps(terms) + "\n")
            log.flush()
            if callback is not None:
                callback(step, terms)

        dec = decompose(
            # data from the global RNG: decompose seeds it and checkpoints its state, so a killed
            # run resumes onto exactly the same batches (on every rank: each keeps its share)
            target, lambda: run.target.batch(run.batch_size, None), run.method, run.target.modules(),
            tied=run.target.tied() or None, callback=on_log if main else None, checkpoint_dir=out, progress=progress,
        )  # fmt: skip
    if not main:
        return RunResult({}, dec, target)
    dec.save(out)
    _, world = rank_and_world()
    metrics = _metrics(dec, target, run, {"wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                                          "target_train_loss": float(info["train_loss"]), "world_size": world,
                                          "batch_size_per_rank": run.batch_size // world})  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return RunResult(metrics, dec, target)


def seed_run_dir(out_dir: str | Path, seed: int) -> Path:
    """Where a multi-seed run (``n_seeds`` > 1) puts seed ``seed``'s results."""
    return Path(out_dir) / f"seed_{seed}"


def seed_run_dirs(run_dir: str | Path) -> list[Path]:
    """The run dirs that ``run_dir`` stands for: itself, or a multi-seed run's ``seed_<s>/`` dirs."""
    d = Path(run_dir)
    if not (d / RUN_FILE).is_file():
        raise ConfigError(f"{d} holds no {RUN_FILE}: pass a run dir written by apd.experiment.run_decompose "
                          "or python -m experiments.decompose")  # fmt: skip
    run = json.loads((d / RUN_FILE).read_text())
    n = run.get("n_seeds", 1)
    return [seed_run_dir(d, run["seed"] + s) for s in range(n)] if n > 1 else [d]


def run_decompose_seeds(
    run: DecomposeRun, out_dir: str | Path, callback: Callable[[int, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> list[RunResult]:  # fmt: skip
    """Seeds ``run.seed`` .. ``run.seed + run.n_seeds - 1`` trained at once (``decompose_seeds``).

    ``out_dir`` holds the shared checkpoint (resumable); each seed's run.json, target.pt, decomposition,
    ``metrics.jsonl`` and ``metrics.json`` go to ``seed_run_dir(out_dir, seed)``, as a single run
    would write them. ``wall_seconds`` of each seed is the whole run's time divided by the number of seeds.
    """
    seeds = list(range(run.seed, run.seed + run.n_seeds))
    dirs = {s: seed_run_dir(out_dir, s) for s in seeds}
    seed_runs = {s: dataclasses.replace(run, seed=s, n_seeds=1) for s in seeds}
    out, target, info, t0 = _start(run, out_dir, {dirs[s]: seed_runs[s] for s in seeds})
    if all(_finished(d) for d in dirs.values()):
        return [RunResult(json.loads((d / "metrics.json").read_text()), load_decomposition(d), target) for d in dirs.values()]

    step = checkpoint_step(out / CHECKPOINT_NAME)
    logs = {}
    for s, d in dirs.items():
        _truncate_log(d, step)
        logs[s] = (d / "metrics.jsonl").open("a")
    try:

        def on_log(seed: int, step: int, terms: dict[str, float]) -> None:
            logs[seed].write(json.dumps(terms) + "\n")
            logs[seed].flush()
            if callback is not None:
                callback(seed, step, terms)

        decs = decompose_seeds(
            target, lambda: run.target.batch(run.batch_size, None), run.method, run.target.modules(), seeds,
            tied=run.target.tied() or None, callback=on_log, checkpoint_dir=out, progress=progress,
        )  # fmt: skip
    finally:
        for f in logs.values():
            f.close()
    train_seconds = time.perf_counter() - t0
    results = []
    for s, dec in zip(seeds, decs):
        t1 = time.perf_counter()
        dec.save(dirs[s])
        metrics = _metrics(dec, target, seed_runs[s], {})
        metrics |= {"wall_seconds": train_seconds / len(seeds) + time.perf_counter() - t1, "torch_threads": torch.get_num_threads(),
                    "target_train_loss": float(info["train_loss"]), "n_seeds_at_once": len(seeds)}  # fmt: skip
        (dirs[s] / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        results.append(RunResult(metrics, dec, target))
    return results


_RUN_FACTS = ("wall_seconds", "torch_threads", "target_train_loss", "world_size", "batch_size_per_rank")
"""metrics.json entries that describe how the run went, not the decomposition: kept by reevaluate"""


def reevaluate(run_dir: str | Path) -> dict[str, Any]:
    """Score a finished run's decomposition again with this version of the metrics (same evaluation
    inputs: the run's ``n_eval`` and seed) and rewrite its ``metrics.json``; the previous file is kept
    as ``metrics.prev.json``. For a multi-seed run dir, pass each ``seed_<s>/``. Returns the metrics."""
    d = Path(run_dir)
    if len(dirs := seed_run_dirs(d)) > 1:
        raise ConfigError(f"{d} trained {len(dirs)} seeds at once: re-evaluate each of its seed_<s>/ run dirs")
    art = load_run(d)
    if not (art.run_dir / FILE_NAME).is_file():
        raise ConfigError(f"{art.run_dir} has no {FILE_NAME}: the run has not finished (resume it with the same command)")
    torch.set_num_threads(art.run.threads or cpu_share())
    old = art.metrics
    metrics = _metrics(art.decomposition, art.target, art.run, {k: old[k] for k in _RUN_FACTS if k in old})
    path = art.run_dir / "metrics.json"
    if path.is_file():
        (art.run_dir / "metrics.prev.json").write_text(path.read_text())
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _truncate_log(out: Path, step: int | None = None) -> None:
    """A resumed run replays the steps after its checkpoint: drop their lines from metrics.jsonl."""
    log = out / "metrics.jsonl"
    if not log.is_file():
        return
    if step is None:
        step = checkpoint_step(out / CHECKPOINT_NAME)
    kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < step]
    log.write_text("".join(line + "\n" for line in kept))


def run_target(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The target a run dir holds (its ``target.pt``, checked against the sha256 its ``run.json``
    pins) and the target's info; nothing is trained."""
    d = Path(run_dir)
    path = d / TARGET_NAME
    model, cfg, info = load_target(path)
    saved = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).is_file() else {}
    pinned, got = saved.get("target_sha256"), state_sha256(model.state_dict())
    if pinned is not None and pinned != got:
        raise CheckpointError(f"{path} holds weights of sha256 {got[:12]}..., but {d / RUN_FILE} pins {pinned[:12]}...: "
                              "the file was replaced or damaged; put back the run's own, or start the run over in a new dir")  # fmt: skip
    if "target" in saved and target_from_dict(saved["target"]).to_dict() != cfg.to_dict():
        raise CheckpointError(f"{path} holds the target {cfg.to_dict()}, but {d / RUN_FILE} names {saved['target']}; "
                              "put back the run's own target.pt, or start the run over in a new dir")  # fmt: skip
    return model, {**info, "source": str(path)}


def _check_decomposed(d: Path, dec: Decomposition, target: nn.Module, source: str) -> str:
    """A run dir written before run dirs kept their target, with ``target`` rebuilt from its config
    (``source``): refused unless it carries the weights the run decomposed. Returns the warning's text."""
    where = f"{d} holds no {TARGET_NAME} (written before run dirs kept their target): rebuilt it from {RUN_FILE}'s target config"
    try:
        dec.attach(target)
    except ValueError as e:
        raise CheckpointError(f"{where} ({source}), but that is not the target this run decomposed "
                              f"({str(e).split(';')[0]}); load the decomposition alone with apd.load_decomposition(run_dir)") from None  # fmt: skip
    return f"{where} ({source}); its decomposed matrices equal the decomposition's, its other weights could not be checked"


def _rebuilt_target(d: Path, run: DecomposeRun, dec: Decomposition) -> nn.Module:
    """The target from the run's config (the shipped file or a retrain, as before run dirs kept it)."""
    target, info = get_target(run.target)
    warnings.warn(_check_decomposed(d, dec, target, info["source"]), stacklevel=3)
    return target


def load_run(run_dir: str | Path, seed: int | None = None) -> RunArtifacts:
    """A run dir written by ``run_decompose`` (or ``python -m experiments.decompose``), for a
    notebook: the target (the run's own ``target.pt``; nothing is trained), the decomposition (the
    final one, or the last checkpoint's while the run is unfinished), the run's settings and its
    metrics. For a multi-seed run dir, ``seed`` picks one (default: the first). A run dir written
    before run dirs kept their target gets it rebuilt from its config, with a warning, and refused
    when its decomposed matrices differ from the decomposition's."""
    d = Path(run_dir)
    if not (d / RUN_FILE).is_file():
        raise ConfigError(f"{d} holds no {RUN_FILE}: pass a run dir written by apd.experiment.run_decompose "
                          "or python -m experiments.decompose")  # fmt: skip
    run = DecomposeRun.from_dict(json.loads((d / RUN_FILE).read_text()))
    if run.n_seeds > 1:  # seeds trained at once: each has its own seed_<s>/ run dir
        d = seed_run_dir(d, run.seed if seed is None else seed)
        if not (d / RUN_FILE).is_file():
            raise ConfigError(f"{d.parent} trained seeds {run.seed}..{run.seed + run.n_seeds - 1}; seed {seed} is not among them")
        run = DecomposeRun.from_dict(json.loads((d / RUN_FILE).read_text()))
    if (d / FILE_NAME).is_file():
        dec = load_decomposition(d / FILE_NAME)
    else:  # unfinished: the last checkpoint (a multi-seed run keeps it one level up)
        ckpt = d / CHECKPOINT_NAME if (d / CHECKPOINT_NAME).is_file() else d.parent / CHECKPOINT_NAME
        dec = load_decomposition(ckpt, seed=run.seed)
    target = run_target(d)[0] if (d / TARGET_NAME).is_file() else _rebuilt_target(d, run, dec)
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    return RunArtifacts(target=target.to(run.device), decomposition=dec, run=run, metrics=metrics, run_dir=d)
