"""APD against the SAE baselines on a toy: `python -m experiments.compare [experiment=compare_tms_5_2]`.

Trains APD (the settings of the decompose preset named by ``apd_experiment``; or scores the finished
run dirs listed in ``apd.runs``) and every SAE grid of the preset over its seeds on the same shipped
target, scores all of them on one evaluation batch (the comparison registered for the target's kind,
``apd.compare.comparison_for``: ``apd.compare.tms`` for TMS, ``apd.compare.resid`` for the 1-layer
residual MLP, ``apd.compare.lm`` for the language model) and writes into the run dir:
``comparison.csv`` (one row per model), ``comparison.md`` (the registered comparison's own report:
mean ± std over seeds, with a legend), one ``<name>.csv`` per further table of the comparison (the
language model's seed consistency and SAE-component matches) and ``figures/``. APD runs land in ``apd/`` (a finished one
is reloaded when the run dir is reused), SAEs in ``saes/``.
"""

import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from apd.compare import COLUMNS, Comparison, comparison_for
from apd.compare.report import ReportInputs
from apd.config import ConfigError
from apd.experiment import DecomposeRun
from experiments import compare_schema, schema
from experiments.compare_figures import save_figures

log = logging.getLogger(__name__)


def apd_template(app: compare_schema.CompareApp) -> DecomposeRun:
    """The APD run of the decompose preset ``app.apd_experiment`` (composed by Hydra, so the
    comparison follows the preset as it changes), before the grid's C / topk / steps / seed."""
    return _preset(app, app.apd_experiment, app.apd_overrides)


def spd_template(app: compare_schema.CompareApp) -> DecomposeRun | None:
    """The SPD run of the decompose preset ``app.spd_experiment`` (None without one), before the seed."""
    return _preset(app, app.spd_experiment, app.spd_overrides) if app.spd_experiment else None


def _preset(app: compare_schema.CompareApp, experiment: str, overrides: list[str]) -> DecomposeRun:
    cfg = hydra.compose(config_name="decompose", overrides=[f"experiment={experiment}", *overrides])
    schema.check_known_keys(cfg)  # an override given for the preset with a typo is refused
    preset: schema.DecomposeApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return DecomposeRun(target=preset.target, method=preset.method, seed=0, batch_size=preset.batch_size,
                        threads=app.threads, n_eval=preset.n_eval, device=preset.device)  # fmt: skip


def compare_app(cfg: DictConfig, out: Path) -> Comparison:
    app: compare_schema.CompareApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    torch.set_num_threads(app.threads)
    t0 = time.perf_counter()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    apd_run, spd_run = apd_template(app), spd_template(app)
    if spd_run is not None and spd_run.target.to_dict() != apd_run.target.to_dict():
        raise ConfigError(f"spd_experiment={app.spd_experiment} decomposes {spd_run.target.name}, apd_experiment="
                          f"{app.apd_experiment} {apd_run.target.name}: compare on one target")  # fmt: skip
    target_comparison = comparison_for(apd_run.target.kind)
    comparison = target_comparison.run(app, apd_run, out, log.info, spd_run=spd_run)
    write_csv(comparison.rows, out / "comparison.csv", target_comparison.columns)
    for name, table in comparison.tables.items():
        if table:
            write_csv(table, out / f"{name}.csv", list(table[0]))
    figures = save_figures(comparison, app, out / "figures") if app.figures else []
    wall = time.perf_counter() - t0
    (out / "comparison.md").write_text(markdown(app, apd_run, comparison, wall, [p.relative_to(out) for p in figures], spd_run))
    if comparison.kind == "lm" and app.browser:
        from experiments import browse

        index = browse.build(out, log=log.info)
        log.info(f"feature browser: {index}")
    return comparison


def write_csv(rows: list[dict[str, Any]], path: Path, first: list[str] = COLUMNS) -> None:
    """One row per model, the ``first`` columns first; NaN (not applicable) is written as an empty cell."""
    columns = first + [c for c in rows[0] if c not in first] if rows else first
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, "") for c in columns})


def report_inputs(app: compare_schema.CompareApp, apd_run: DecomposeRun, wall: float, figures: list[Path],
                  spd_run: DecomposeRun | None = None) -> ReportInputs:  # fmt: skip
    """What the comparison's report reads from the invocation (the presets' names, its wall time, the figures)."""
    if spd_run is None and app.spd.enabled and not app.spd.runs:
        spd_run = spd_template(app)
    return ReportInputs(cfg=app, apd_run=apd_run, spd_run=spd_run, apd_preset=app.apd_experiment, apd_overrides=app.apd_overrides,
                        spd_preset=app.spd_experiment, spd_overrides=app.spd_overrides, wall=wall, figures=figures)  # fmt: skip


def markdown(app: compare_schema.CompareApp, apd_run: DecomposeRun, comparison: Comparison, wall: float,
             figures: list[Path], spd_run: DecomposeRun | None = None) -> str:  # fmt: skip
    """comparison.md: the report of the comparison registered for the target's kind."""
    return comparison_for(comparison.kind).report(report_inputs(app, apd_run, wall, figures, spd_run), comparison)


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    schema.exit_on_unknown_keys(cfg)  # before anything runs: a +key typo is refused, not ignored
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        compare_app(cfg, out)
    except ConfigError as e:  # a setting to change: its message names it and the fix (as experiments.decompose reports it)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
