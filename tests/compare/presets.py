"""Composing the real Hydra configs (``conf/``) for the comparison tests, and running a comparison
end to end as a user would."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, as the entry points compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_compare(experiment: str, overrides: list[str], out: Path) -> tuple[list[dict[str, str]], list[str]]:
    """``python -m experiments.compare experiment=<experiment> <overrides>`` into ``out`` on one
    thread (it must succeed): the rows of its comparison.csv and their column names."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare", f"experiment={experiment}", *overrides, f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "comparison.csv").open() as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])
