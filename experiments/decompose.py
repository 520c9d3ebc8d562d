"""Decompose a target: `python -m experiments.decompose [experiment=NAME] [method=apd|spd] [seed=S] [steps=N]`.

Started again with the same run dir (`hydra.run.dir=...`, or the same `hydra.sweep.dir` for a
sweep) a run resumes from its last checkpoint, and a finished run is not redone; a run dir holding
a run with other settings is refused. `config.yaml` is the resolved run (what ran). In a multirun
a failing job writes `failure.json` (error and traceback) into its run dir and the sweep goes on.
A bad config value is one line on stderr (exit status 2), not a traceback.
"""

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from apd.config import ConfigError
from apd.distributed import broadcast_object, exit_now, init_from_env, is_main, rank_and_world, shutdown
from apd.experiment import check_run_dir, cpu_share, run_decompose, run_decompose_seeds, seed_run_dir
from experiments import schema  # noqa: F401  (registers the config schemas)
from experiments.figures import save_figures
from experiments.loggers import make_logger

log = logging.getLogger(__name__)


def decompose_app(cfg: DictConfig, out: Path) -> dict[str, float]:
    schema.check_known_keys(cfg)  # before anything runs: a +key typo is refused, not ignored
    app: schema.DecomposeApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if app.threads == 0:  # automatic: divide this machine's CPUs among the launcher's parallel jobs
        app.threads = cpu_share(_parallel_jobs())
    check_run_dir(out, app)  # before config.yaml is rewritten: a different run there is refused
    warn_token_batch(app)
    if not is_main():  # data-parallel: the other ranks train; rank 0 writes the run dir
        return run_decompose(app, out).metrics
    (out / "config.yaml").write_text(resolved_yaml(app))
    if app.n_seeds > 1:
        return _decompose_seeds_app(cfg, app, out)
    logger, close = make_logger(app.logger, out, OmegaConf.to_container(OmegaConf.structured(app)))  # type: ignore[arg-type]
    try:
        result = run_decompose(app, out, callback=logger)
    finally:
        close()
    if app.figures:
        save_figures(result, app, out / "figures")
    return result.metrics


def warn_token_batch(app: schema.DecomposeApp) -> str | None:
    """Warn (and return the warning) when your own target's inputs are token windows and a step reads
    more than 65,536 tokens (the default batch_size of 2048 is sized for the toys' single vectors)."""
    from apd.targets import ModuleTargetConfig

    if not isinstance(app.target, ModuleTargetConfig):
        return None
    x = app.target.batch(2, None)
    if x.is_floating_point() or x.dim() < 2 or app.batch_size * x[0].numel() <= 65_536:
        return None
    msg = (f"target.data gives token windows of {x[0].numel()} tokens and batch_size={app.batch_size} makes "
           f"{app.batch_size * x[0].numel():,} tokens a step; token runs use batch_size=16 n_eval=64 "
           "(experiment=spd_lm_1l's): set them on the command line")  # fmt: skip
    log.warning(msg)
    return msg


def _decompose_seeds_app(cfg: DictConfig, app: schema.DecomposeApp, out: Path) -> dict[str, float]:
    """``n_seeds`` > 1: one ``seed_<s>/`` run dir per seed (config, metrics, figures, logger);
    ``out/metrics.json`` holds the mean of each metric over the seeds and their ``success_rate``."""
    seeds = list(range(app.seed, app.seed + app.n_seeds))
    loggers = {}
    for s in seeds:
        seed_app = dataclasses.replace(app, seed=s, n_seeds=1)
        d = seed_run_dir(out, s)
        d.mkdir(parents=True, exist_ok=True)
        check_run_dir(d, seed_app)
        (d / "config.yaml").write_text(resolved_yaml(seed_app))
        loggers[s] = make_logger(app.logger, d, OmegaConf.to_container(OmegaConf.structured(seed_app)))  # type: ignore[arg-type]
    try:

        def on_log(seed: int, step: int, terms: dict[str, float]) -> None:
            log_fn = loggers[seed][0]
            if log_fn is not None:
                log_fn(step, terms)

        results = run_decompose_seeds(app, out, callback=on_log)
    finally:
        for _, close in loggers.values():
            close()
    for s, result in zip(seeds, results):
        if app.figures:
            save_figures(result, dataclasses.replace(app, seed=s, n_seeds=1), seed_run_dir(out, s) / "figures")
    summary = seeds_summary([r.metrics for r in results])
    (out / "metrics_seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s, r in zip(seeds, results):
        print(f"seed {s}: " + ", ".join(f"{k}={r.metrics[k]:.4g}" for k in _HEADLINE if k in r.metrics))
    return summary


def seeds_summary(per_seed: list[dict]) -> dict[str, float]:
    """``metrics_seeds.json`` of a multi-seed run: each number's mean over the seeds, the
    ``success_rate`` (mean ``all_recovered``, or dedicated features on the residual MLP), the summed
    ``wall_seconds`` and ``n_seeds``."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
    summary = {k: sum(m[k] for m in per_seed) / len(per_seed) for k in keys}
    summary["success_rate"] = summary.get("all_recovered", summary.get("n_features_with_dedicated_component", 0.0))
    summary["wall_seconds"] = sum(m["wall_seconds"] for m in per_seed)
    summary["n_seeds"] = float(len(per_seed))
    return summary


_HEADLINE = ["all_recovered", "mmcs", "ml2r", "n_features_with_dedicated_component", "topk_recon_mse", "ci_recon_mse", "l0",
             "wall_seconds"]  # fmt: skip


def resolved_yaml(app: schema.DecomposeApp) -> str:
    """The run as it runs (after the top-level seed/steps/device are written into the method)."""
    return OmegaConf.to_yaml(OmegaConf.structured(app))


def _parallel_jobs() -> int | None:
    """How many jobs the launcher runs at once on this machine: joblib's n_jobs; None where no
    launcher shares the CPUs out (a plain run; a SLURM job reads SLURM_CPUS_PER_TASK)."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or "n_jobs" not in hc.launcher:
        return None
    n_jobs = int(hc.launcher.n_jobs or 1)
    return len(os.sched_getaffinity(0)) if n_jobs < 0 else n_jobs  # joblib: -1 = one job per CPU


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""conf/ beside experiments/, absolute: the ``apd-decompose`` script finds it from any folder (Hydra
reads a relative config_path against the running script's folder, the virtualenv's bin/ for a script)"""


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="decompose")
def main(cfg: DictConfig) -> float:
    init_from_env()  # several tasks of one SLURM job step: one data-parallel run (torchrun: done in launch())
    finished = False
    try:
        result = _main(cfg)
        finished = True
        return result
    finally:
        shutdown(barrier=finished)  # a data-parallel run's ranks leave together (no-op for one process)


def _main(cfg: DictConfig) -> float:
    out = Path(HydraConfig.get().runtime.output_dir)
    if not is_main():  # the other ranks train and write nothing
        return _other_rank(cfg, out)
    (out / "failure.json").unlink(missing_ok=True)
    try:
        metrics = decompose_app(cfg, out)
    except ConfigError as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        (out / "failure.json").write_text(json.dumps({"error": type(e).__name__, "message": str(e)}, indent=2) + "\n")
        log.error("run failed (%s: %s); the sweep goes on", type(e).__name__, e)
        return float("nan")
    except Exception as e:
        failure = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        (out / "failure.json").write_text(json.dumps(failure, indent=2) + "\n")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("run failed (%s: %s); details in %s; the sweep goes on", type(e).__name__, e, out / "failure.json")
            return float("nan")
        raise
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"{k:>36}: {v:.4g}")
        elif v:  # lists: mechanisms (in metrics.json), warnings
            print(f"{k:>36}: {v if k != 'mechanisms' else f'{len(v)} listed in metrics.json'}")
    print(f"results written to {out}")
    return metrics.get("all_recovered", metrics.get("n_features_with_dedicated_component", 0.0))


def _other_rank(cfg: DictConfig, out: Path) -> float:
    """A data-parallel run's rank > 0: its share of the training; rank 0 reports (and writes failure.json)."""
    try:
        decompose_app(cfg, out)
    except Exception as e:
        print(f"rank {rank_and_world()[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    return float("nan")


OWN_TARGETS = ("module", "hf")
"""targets that are your own model: the default preset (``experiment=tms_5_2``, a TMS run's settings) does
not apply to them"""
TOKEN_DEFAULTS = {"batch_size": "16", "n_eval": "64"}
"""batch sizes for token windows (``experiment=spd_lm_1l``'s: 16 windows a step, 64 for the metrics)
in place of the toy targets' 2048 inputs a step and 10,000 for the metrics"""


def own_target_overrides(argv: list[str]) -> list[str]:
    """The overrides ``launch`` adds for a run of your own target (``target=module`` or ``target=hf``)
    given with no ``experiment=``: ``~experiment`` (the default preset belongs to another target; its
    method settings would be refused by ``method=spd``), and for ``target=hf`` the token batch sizes
    of ``TOKEN_DEFAULTS`` where the command line sets none. A run dir is named after the target
    (``outputs/decompose/<target.name>/...``, ``conf/decompose.yaml``)."""
    target = next((a.split("=", 1)[1] for a in argv if a.startswith("target=")), None)
    if target not in OWN_TARGETS:
        return []
    keys = {a.lstrip("~+").split("=", 1)[0] for a in argv}
    extra = [] if "experiment" in keys else ["~experiment"]
    if target == "hf":
        extra += [f"{k}={v}" for k, v in TOKEN_DEFAULTS.items() if k not in keys]
    return extra


def launch() -> None:
    """``python -m experiments.decompose`` and ``torchrun --nproc_per_node=N -m experiments.decompose``
    (and the ``apd-decompose`` console script, from any folder).

    Under torchrun the process group starts here; every rank then runs in the same run dir (rank 0's
    ``hydra.run.dir``, broadcast, when none is given), and ranks > 0 keep Hydra from writing theirs."""
    sys.argv += own_target_overrides(sys.argv[1:])
    if init_from_env():
        if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
            raise SystemExit("error: torchrun runs one data-parallel decomposition; for a sweep of data-parallel jobs use "
                             "the SLURM launcher with hydra.launcher.tasks_per_node=N (docs/guide/scale_out.md)")  # fmt: skip
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
            stamp = broadcast_object(time.strftime("%Y-%m-%d_%H-%M-%S"))
            sys.argv.append(f"hydra.run.dir=outputs/decompose/${{apd_run_name:${{hydra:runtime.choices.experiment}},${{target.name}}}}/{stamp}")
        if not is_main():
            sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        main()
        exit_now(0)  # the run is done and its process group destroyed: skip the interpreter's teardown
    main()


if __name__ == "__main__":
    launch()
