"""One experiment run on a toy target: target → APD → metrics → artifacts in a run dir.

Plain dataclasses (``experiments/`` registers them in Hydra's ConfigStore); nothing here imports
Hydra, matplotlib or a logging service. Loggers are callbacks passed in.
"""

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from apd.attributions import compute_attributions
from apd.config import APDConfig
from apd.decomposition import CHECKPOINT_NAME, FILE_NAME, Decomposition, load_decomposition, safe_load
from apd.losses import faithfulness_loss
from apd.metrics.resid_mlp import resid_mlp_metrics
from apd.metrics.tms import tms_recovery
from apd.multi import SEEDS_CHECKPOINT_NAME, decompose_seeds
from apd.targets import ResidMLPTargetConfig, TargetConfig, TMSTargetConfig, get_target
from apd.topk import topk_mask
from apd.train import decompose

__all__ = ["DecomposeRun", "RunResult", "run_decompose", "run_decompose_seeds", "seed_run_dir", "evaluate", "cpu_share"]


def cpu_share(parallel_jobs: int | None = None) -> int:
    """CPUs this job may use: SLURM's allocation if set; else the CPUs this process may run on,
    divided among ``parallel_jobs`` jobs running side by side (at least 1); else (None: no launcher
    shares this machine out) 1."""
    import os

    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    if parallel_jobs is None:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, parallel_jobs))


@dataclass(kw_only=True)
class DecomposeRun:
    """A decomposition experiment. ``seed``, ``steps`` and ``device`` are the top-level knobs and
    are written into ``method`` (the APDConfig) on construction."""

    target: TargetConfig = field(default_factory=TMSTargetConfig)
    method: APDConfig = field(default_factory=APDConfig)
    seed: int = 0
    """seed of the components' initialisation and of the data stream"""
    steps: int | None = None
    """APD steps (None: method.steps)"""
    device: str = "cpu"
    batch_size: int = 2048
    threads: int = 0
    """torch intra-op threads for this run; 0 (the default) = automatic: the job's SLURM allocation
    (``SLURM_CPUS_PER_TASK``, i.e. ``hydra.launcher.cpus_per_task``) inside a SLURM job, the CPUs
    divided among joblib's ``n_jobs`` in a joblib sweep, else 1 (fastest for the toy models)"""
    n_eval: int = 10_000
    """fresh samples for the output-level metrics"""
    n_seeds: int = 1
    """train seeds seed, seed+1, ..., seed+n_seeds-1 at once in this process (vectorised instances,
    ``apd.decompose_seeds``); each seed gets its own ``seed_<s>/`` run dir"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.threads < 0 or self.n_eval < 1 or self.n_seeds < 1:
            raise ValueError(f"batch_size={self.batch_size}, threads={self.threads}, n_eval={self.n_eval}, "
                             f"n_seeds={self.n_seeds}: batch_size, n_eval and n_seeds must be >= 1, threads >= 0 "
                             "(0 = automatic)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available here; use device=cpu")
        steps = self.method.steps if self.steps is None else self.steps
        self.method = dataclasses.replace(self.method, seed=self.seed, steps=steps, device=self.device)


@dataclass
class RunResult:
    metrics: dict[str, float]
    decomposition: Decomposition
    target: nn.Module


def run_decompose(
    run: DecomposeRun, out_dir: str | Path, callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> RunResult:  # fmt: skip
    """Get the target (shipped or trained), decompose it, score it; write to ``out_dir``:
    ``decomposition.pt``, ``checkpoint.pt`` (resumable), ``metrics.jsonl``, ``metrics.json``."""
    out, target, info, t0 = _start(run, out_dir)
    if (out / "metrics.json").is_file() and (out / FILE_NAME).is_file():  # finished: not redone
        return RunResult(json.loads((out / "metrics.json").read_text()), load_decomposition(out), target)

    _truncate_log(out)
    with (out / "metrics.jsonl").open("a") as log:

        def on_log(step: int, terms: dict[str, float]) -> None:
            log.write(json.dumps(terms) + "\n")
            log.flush()
            if callback is not None:
                callback(step, terms)

        dec = decompose(
            # data from the global RNG: decompose seeds it and checkpoints its state, so a killed
            # run resumes onto exactly the same batches
            target, lambda: run.target.batch(run.batch_size, None), run.method, run.target.modules(),
            callback=on_log, checkpoint_dir=out, progress=progress,
        )  # fmt: skip
    dec.save(out)
    metrics = evaluate(dec, target, run)
    metrics |= {"wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                "target_train_loss": float(info["train_loss"])}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return RunResult(metrics, dec, target)


def _start(run: DecomposeRun, out_dir: str | Path) -> tuple[Path, nn.Module, dict, float]:
    """Make the run dir, set the thread count, get the target: (out, target, its info, start time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(run.threads or cpu_share())
    t0 = time.perf_counter()
    target, info = get_target(run.target)
    return out, target.to(run.device), info, t0


def seed_run_dir(out_dir: str | Path, seed: int) -> Path:
    """Where a multi-seed run (``n_seeds`` > 1) puts seed ``seed``'s results."""
    return Path(out_dir) / f"seed_{seed}"


def run_decompose_seeds(
    run: DecomposeRun, out_dir: str | Path, callback: Callable[[int, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> list[RunResult]:  # fmt: skip
    """Seeds ``run.seed`` .. ``run.seed + run.n_seeds - 1`` trained at once (``decompose_seeds``).

    ``out_dir`` holds the shared checkpoint (resumable); each seed's decomposition, ``metrics.jsonl``
    and ``metrics.json`` go to ``seed_run_dir(out_dir, seed)``, as a single run would write them.
    ``wall_seconds`` of each seed is the whole run's time divided by the number of seeds.
    """
    out, target, info, t0 = _start(run, out_dir)
    seeds = list(range(run.seed, run.seed + run.n_seeds))
    dirs = {s: seed_run_dir(out, s) for s in seeds}
    seed_runs = {s: dataclasses.replace(run, seed=s, n_seeds=1) for s in seeds}
    if all((d / "metrics.json").is_file() and (d / FILE_NAME).is_file() for d in dirs.values()):
        return [RunResult(json.loads((d / "metrics.json").read_text()), load_decomposition(d), target) for d in dirs.values()]

    step = _checkpoint_step(out / SEEDS_CHECKPOINT_NAME)
    logs = {}
    for s, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
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
            callback=on_log, checkpoint_dir=out, progress=progress,
        )  # fmt: skip
    finally:
        for f in logs.values():
            f.close()
    train_seconds = time.perf_counter() - t0
    results = []
    for s, dec in zip(seeds, decs):
        t1 = time.perf_counter()
        dec.save(dirs[s])
        metrics = evaluate(dec, target, seed_runs[s])
        metrics |= {"wall_seconds": train_seconds / len(seeds) + time.perf_counter() - t1, "torch_threads": torch.get_num_threads(),
                    "target_train_loss": float(info["train_loss"]), "n_seeds_at_once": len(seeds)}  # fmt: skip
        (dirs[s] / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        results.append(RunResult(metrics, dec, target))
    return results


def _checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was written at (0 if there is none)."""
    return int(safe_load(checkpoint)["step"]) if checkpoint.is_file() else 0


def _truncate_log(out: Path, step: int | None = None) -> None:
    """A resumed run replays the steps after its checkpoint: drop their lines from metrics.jsonl."""
    log = out / "metrics.jsonl"
    if not log.is_file():
        return
    if step is None:
        step = _checkpoint_step(out / CHECKPOINT_NAME)
    kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < step]
    log.write_text("".join(line + "\n" for line in kept))


def evaluate(dec: Decomposition, target: nn.Module, run: DecomposeRun) -> dict[str, float]:
    """The metrics.json numbers for the run's target kind (SPEC §3)."""
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    cfg = run.method
    k = cfg.topk if cfg.topk is not None else cm.C

    def attributions(x: Tensor) -> Tensor:
        with torch.no_grad():
            return compute_attributions(cm, x, cfg.attribution)

    def topk_forward(x: Tensor) -> Tensor:
        with torch.no_grad():
            return cm(x, mask=topk_mask(attributions(x), k, cfg.batch_topk))

    gen = torch.Generator().manual_seed(run.seed + 10_000)
    x = run.target.batch(run.n_eval, gen, run.device)
    with torch.no_grad():
        mask = topk_mask(attributions(x), k, cfg.batch_topk)
        generic = {
            "faithfulness_loss": faithfulness_loss(cm.target_weights(), cm.summed_weights()).item(),
            "topk_recon_mse": (cm(x, mask=mask) - cm(x)).pow(2).mean().item(),
            "l0": mask.sum(1).mean().item(),
        }
    if isinstance(run.target, TMSTargetConfig):
        return tms_recovery(target.W, dec.component_weights()["enc"]) | generic  # type: ignore[union-attr,arg-type]
    if isinstance(run.target, ResidMLPTargetConfig):
        with torch.no_grad():
            m = resid_mlp_metrics(
                target, run.target.monosemantic().to(run.device), dec.component_weights(),  # type: ignore[arg-type]
                lambda x, s: cm(x, mask=s), attributions, topk_forward, n_eval=run.n_eval, seed=run.seed,
            )  # fmt: skip
        m["mse_apd_topk_vs_labels"] = m.pop("mse_topk_vs_labels")
        m.pop("mse_topk_vs_target")  # = topk_recon_mse below (same batch size, other samples)
        return m | generic
    raise TypeError(f"no metrics for target kind {type(run.target).__name__}")

