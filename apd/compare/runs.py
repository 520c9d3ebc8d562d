"""Training (or reloading) the models of a comparison and handing each scored row on.

The loops over the grids are target-independent: :func:`decomposition_results` runs (or reloads) a
decomposition per cell of the decomposition grid × seed, or loads finished run dirs, and
:func:`sae_results` trains (or reloads) an SAE per grid cell × seed (:func:`train_sae_cell`). Each
takes a ``score`` function from its target's module (:mod:`apd.compare.tms`,
:mod:`apd.compare.resid`), which fills in the row's metric columns; the method fields and the wall
time are filled in here. Everything scored ends up in one :class:`Comparison`.
"""

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd.baselines import SAE, SAEConfig, SAEEvaluate, SAETrainConfig, get_sae_class, load_sae, save_sae, train_sae
from apd.compare.config import CompareConfig, SAEGrid
from apd.compare.scoring import Trained
from apd.config import ConfigError
from apd.decomposition import Decomposition, load_decomposition
from apd.experiment import RUN_FILE, DecomposeRun, run_decompose
from apd.methods import method_class, method_for
from apd.targets import get_target

__all__ = [
    "Comparison",
    "evaluation_target",
    "decomposition_fields",
    "run_decomposition",
    "load_decomposition_run",
    "decomposition_results",
    "sae_dir_name",
    "train_sae_cell",
    "sae_results",
    "row_logger",
]


@dataclass
class Comparison:
    """Every scored model, and the target and evaluation batch they were scored on."""

    results: list[Trained]
    target: Any
    """the target model (TMS or ResidMLP)"""
    data: Any
    """the evaluation batch (:class:`apd.compare.tms.TMSActivations` or
    :class:`apd.compare.resid.ResidActivations`); ``data.truth`` is the features' ground truth the
    figures draw"""
    kind: str
    """the target kind (``TargetConfig.kind``), which picks the comparison (:func:`apd.compare.comparison_for`)"""
    side_methods: set[str] = field(default_factory=set)
    """SAE grids kept out of the main table and Pareto figure (TMS: the transcoders, a side study)"""
    notes: list[str] = field(default_factory=list)
    """lines for comparison.md (e.g. which finished decomposition runs were loaded)"""
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """further tables across models, by name (the language model's seed consistency and SAE-component
    matches); ``python -m experiments.compare`` writes each to ``<name>.csv``"""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r.row for r in self.results]


def evaluation_target(cfg: CompareConfig, apd_run: DecomposeRun) -> tuple[nn.Module, Float[Tensor, "n_eval ..."]]:
    """``apd_run``'s target (the shipped one when its config matches), in eval mode, and the
    comparison's evaluation batch: ``cfg.n_eval`` inputs drawn from ``cfg.eval_seed``."""
    target, _ = get_target(apd_run.target)
    target.eval()
    x = apd_run.target.batch(cfg.n_eval, torch.Generator().manual_seed(cfg.eval_seed))
    return target, x


# ---------------------------------------------------------------------------------------------
# Decompositions
# ---------------------------------------------------------------------------------------------


def decomposition_fields(dec: Decomposition) -> dict[str, Any]:
    """The method fields of a decomposition's row: its method (also as ``architecture``), seed,
    width (its number of components per matrix; summed over the matrices when they differ) and its
    method's sparsity knob and value (``Method.sparsity_knob``; APD: topk)."""
    knob = method_class(dec.method).sparsity_knob
    per_module = dec.C_per_module()
    counts = set(per_module.values())
    width = counts.pop() if len(counts) == 1 else sum(per_module[n] for n in dec.matrix_names)
    return {"method": dec.method, "architecture": dec.method, "seed": dec.config.seed, "width": width,
            "sparsity_knob": knob, "sparsity": getattr(dec.config, knob)}  # fmt: skip


def _with_fields(trained: Trained, dec: Decomposition, wall_seconds: float) -> Trained:
    trained.row = {**decomposition_fields(dec), **trained.row, "wall_seconds": wall_seconds}
    return trained


def run_decomposition(
    run: DecomposeRun, out_dir: Path, score: Callable[[Decomposition], Trained], progress: bool = False
) -> Trained:
    """Decompose (or reload a finished run from ``out_dir``), score it with ``score`` and fill in the
    row's method fields and wall time (the decomposition's own, kept in its metrics.json when
    reloaded, + this evaluation)."""
    result = run_decompose(run, out_dir, progress=progress)
    t0 = time.perf_counter()
    trained = score(result.decomposition)
    return _with_fields(trained, result.decomposition, result.metrics["wall_seconds"] + time.perf_counter() - t0)


def load_decomposition_run(run_dir: str | Path) -> tuple[Decomposition, float]:
    """A finished decomposition run (a ``python -m experiments.decompose`` run dir, or a
    decomposition file): the decomposition and its wall seconds from ``metrics.json`` (NaN when
    there is none)."""
    dec = load_decomposition(run_dir)
    metrics = Path(run_dir) / "metrics.json"
    wall = json.loads(metrics.read_text()).get("wall_seconds", math.nan) if metrics.is_file() else math.nan
    return dec, float(wall)


def refuse_other_target(run_dir: str | Path, apd_run: DecomposeRun, key: str) -> None:
    """A ConfigError, naming ``key`` and the fix, when the run dir ``run_dir`` (its ``run.json``)
    decomposed another target than the comparison's (``apd_run.target``): its scores against this
    target would mean nothing. A bare decomposition file has no run.json; attaching it to the target
    checks its matrices (``Decomposition.attach``)."""
    f = Path(run_dir) / RUN_FILE
    if not f.is_file():
        return
    theirs, ours = DecomposeRun.from_dict(json.loads(f.read_text())).target.to_dict(), apd_run.target.to_dict()
    if theirs != ours:
        differ = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
        raise ConfigError(f"{key}: {run_dir} decomposed another target than this comparison's ({ours.get('name')}); "
                          f"they differ in {', '.join(f'{k} (run {a!r}, comparison {b!r})' for k, (a, b) in differ.items())}. "
                          f"Pass runs of {ours.get('name')}, or leave {key} empty to train them here")  # fmt: skip


def _loaded_note(dec: Decomposition, run_dir: str, wall: float) -> str:
    """The comparison.md line of a loaded run: where it came from and its settings."""
    m = dec.config
    settings = method_for(m).settings_note(dec.C_per_module())
    return f"{dec.method.upper()} seed {m.seed}: loaded from `{run_dir}` ({settings}, its own time {wall:.0f} s)"


def decomposition_results(
    cfg: CompareConfig, apd_run: DecomposeRun, out: Path, score: Callable[[Decomposition], Trained],
    done: Callable[[Trained], None], notes: list[str] | None = None, spd_run: DecomposeRun | None = None,
) -> None:  # fmt: skip
    """Every decomposition of the comparison, scored by ``score`` and handed to ``done``.

    APD: the finished runs of ``cfg.apd.runs`` when given (any method, scored as they are), else
    each cell of ``cfg.apd`` on top of ``apd_run``'s method × ``cfg.seeds``, decomposed into
    ``out/apd/``. SPD (``cfg.spd.enabled``): the finished runs of ``cfg.spd.runs``, else ``spd_run``
    (its decompose preset) × ``cfg.seeds`` into ``out/spd/``. A finished run there is reloaded, not
    redone. Appends a line per loaded run to ``notes``."""

    def loaded(run_dirs: list[str], key: str) -> None:
        for run_dir in run_dirs:  # every run checked before any is scored
            refuse_other_target(run_dir, apd_run, key)
        for run_dir in run_dirs:
            dec, wall = load_decomposition_run(run_dir)
            if notes is not None:
                notes.append(_loaded_note(dec, run_dir, wall))
            t0 = time.perf_counter()
            trained = score(dec)
            done(_with_fields(trained, dec, wall + time.perf_counter() - t0))

    if cfg.apd.enabled:
        loaded(cfg.apd.runs, "apd.runs")
        if not cfg.apd.runs:
            for method in cfg.apd.settings(apd_run.method):
                for seed in cfg.seeds:
                    run = dataclasses.replace(apd_run, method=method, seed=seed, steps=method.steps)
                    done(run_decomposition(run, out / method.method / f"C{method.C}_topk{method.topk:g}" / f"seed{seed}", score))
    if cfg.spd.enabled:
        loaded(cfg.spd.runs, "spd.runs")
        if not cfg.spd.runs:
            if spd_run is None:
                raise ValueError("spd.enabled but no SPD preset was given (spd_experiment) and spd.runs is empty")
            steps = cfg.spd.steps if cfg.spd.steps is not None else spd_run.method.steps
            for seed in cfg.seeds:
                run = dataclasses.replace(spd_run, seed=seed, steps=steps)
                done(run_decomposition(run, out / spd_run.method.method / f"seed{seed}", score))


# ---------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------


def train_sae_cell(
    name: str,
    grid: SAEGrid,
    width: int,
    value: float,
    seed: int,
    d_in: int,
    d_out: int,
    data: Callable[[int, torch.Generator], Any],
    score: Callable[[SAE], Trained],
    train_cfg: SAETrainConfig | None = None,
    save_dir: Path | None = None,
    evaluate: SAEEvaluate | None = None,
) -> Trained:
    """Train one SAE (one grid cell, one seed) on fresh batches from ``data``, score it with
    ``score`` and fill in the row's method fields and wall time. With ``save_dir`` the SAE is saved
    there with its training config, time, final losses and L0, the latents resampled (as [step,
    count] pairs) and, with ``eval_every``, its held-out curve and convergence verdict
    (``training.json``; ``evaluate``: the curve's evaluation, default FVU and L0); an SAE already
    saved there with the same SAE and training configs is reloaded, not retrained (its wall time:
    the saved one + this evaluation). With a curve the row also gets ``train_steps``, ``converged``
    (1 / 0) and ``curve_change``, and the Trained its ``curve``."""
    t0 = time.perf_counter()
    sae_cls, _ = get_sae_class(grid.architecture)
    sae_cfg = grid.sae_config(d_in, width, value, d_out=d_out)
    train = dataclasses.replace(train_cfg or SAETrainConfig(), seed=seed, **grid.train)
    record = {"train": {k: getattr(v, "value", v) for k, v in dataclasses.asdict(train).items()}}
    sae, seconds, curve = _saved_sae(save_dir, sae_cfg, record) if save_dir is not None else (None, 0.0, {})
    if sae is None:
        sae = sae_cls(sae_cfg)
        result = train_sae(sae, data, train, evaluate=evaluate)
        seconds = time.perf_counter() - t0
        curve = result.curve_record() if result.curve else {}
        if save_dir is not None:
            resampled = [[i, int(n)] for i, n in enumerate(result.metrics["n_resampled"].tolist()) if n]
            save_sae(sae, save_dir)
            (save_dir / "training.json").write_text(json.dumps(record | {
                "seconds": seconds, "final_losses": result.final_losses, "final_l0": float(result.metrics["l0"][-1]),
                "n_resampled": sum(n for _, n in resampled), "resampled": resampled, **({"convergence": curve} if curve else {})}, indent=2) + "\n")  # fmt: skip
    t1 = time.perf_counter()
    trained = score(sae)
    trained.row = {"method": name, "architecture": grid.architecture, "seed": seed, "width": width,
                   "sparsity_knob": grid.knob, "sparsity": value, **trained.row,
                   "wall_seconds": seconds + time.perf_counter() - t1}  # fmt: skip
    if curve.get("curve"):
        trained.row |= {"train_steps": curve["steps_trained"], "converged": float(bool(curve["converged"])),
                        "curve_change": math.nan if curve["curve_change"] is None else curve["curve_change"]}  # fmt: skip
        trained.curve = {k: list(v) for k, v in curve["curve"].items()}
    return trained


def _saved_sae(save_dir: Path, sae_cfg: SAEConfig, record: dict[str, Any]) -> tuple[SAE | None, float, dict[str, Any]]:
    """The SAE saved in ``save_dir``, its training seconds and its convergence record, if it was
    trained with ``sae_cfg`` and exactly the training config in ``record`` (a record written before a
    training field existed, e.g. ``grad_clip_norm``, lacks it and so differs); (None, 0, {}) otherwise."""
    info = save_dir / "training.json"
    if not info.is_file():
        return None, 0.0, {}
    saved = json.loads(info.read_text())
    sae = load_sae(save_dir)
    if saved.get("train") != record["train"] or sae.cfg != sae_cfg:
        return None, 0.0, {}
    return sae, float(saved["seconds"]), saved.get("convergence", {})


def sae_dir_name(name: str, width: int, knob: str, value: float, seed: int) -> str:
    """The ``saes/`` folder of one SAE grid cell and seed: ``<name>_w<width>_<knob><value>_seed<seed>``."""
    return f"{name}_w{width}_{knob}{value:g}_seed{seed}"


def sae_results(
    cfg: CompareConfig, out: Path, train: Callable[[str, SAEGrid, int, float, int, Path | None], Trained],
    done: Callable[[Trained], None],
) -> None:  # fmt: skip
    """Every SAE grid cell × seed: ``train(name, grid, width, value, seed, save_dir)`` → ``done``
    (models saved under ``out/saes/`` when ``cfg.save_models``)."""
    for name, grid in cfg.saes.items():
        for width in grid.widths:
            for value in grid.sparsity_values:
                for seed in cfg.seeds:
                    save = out / "saes" / sae_dir_name(name, width, grid.knob, value, seed) if cfg.save_models else None
                    done(train(name, grid, width, value, seed, save))


_LOGGED = {"l0": "l0", "mmcs": "mmcs", "matched": "matched_mean_cos", "shrink": "shrinkage", "fvu": "fvu",
           "lossrec": "loss_recovered"}  # fmt: skip


def row_logger(
    results: list[Trained], log: Callable[[str], None], logged: dict[str, str] | None = None
) -> Callable[[Trained], None]:
    """A ``done`` callback for :func:`decomposition_results` / :func:`sae_results`: log a one-line
    summary of the row (``logged``: label -> column, default the ground-truth comparisons'), append
    the model to ``results``."""
    columns = _LOGGED if logged is None else logged

    def done(t: Trained) -> None:
        r = t.row
        values = " ".join(f"{label}={r[col]:.3f}" for label, col in columns.items())
        log(f"{r['method']:>12} width={r['width']:<3} {r['sparsity_knob']}={r['sparsity']:<7.4g} seed={r['seed']}: "
            f"{values} ({r['wall_seconds']:.1f}s)")  # fmt: skip
        results.append(t)

    return done
