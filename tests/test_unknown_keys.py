"""`+key=value` typos are refused before anything runs (Hydra adds the key even to a struct node,
and ``OmegaConf.to_object`` would drop it silently)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apd.config import ConfigError
from experiments import schema

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="decompose", overrides=overrides)


@pytest.mark.parametrize("override,key,schema_name", [
    ("+method.typo=1", "method.typo", "APDConfig"),
    ("+target.n_hiden=3", "target.n_hiden", "TMSTargetConfig"),
    ("+stepz=3", "stepz", "DecomposeApp"),
    ("+logger.projekt=x", "logger.projekt", "LoggerConfig"),
])  # fmt: skip
def test_an_added_unknown_key_is_refused_naming_it_and_the_valid_ones(override, key, schema_name):
    cfg = _compose([override])
    assert OmegaConf.to_object(cfg)  # what ran before: the key silently dropped
    with pytest.raises(ConfigError) as e:
        schema.check_known_keys(cfg)
    message = str(e.value)
    assert "\n" not in message and f"unknown config key {key!r}" in message and f"{schema_name} has " in message
    parent = key.rpartition(".")[0]
    node_type = OmegaConf.get_type(OmegaConf.select(cfg, parent) if parent else cfg)
    assert node_type.__name__ == schema_name
    assert message.endswith(", ".join(f.name for f in dataclasses.fields(node_type)) + "; fix the spelling")


def test_dict_fields_take_any_key():
    schema.check_known_keys(_compose(["experiment=spd_resid_mlp_2", "+method.C_per_module={mlp_out:7}"]))
    schema.check_known_keys(_compose(["experiment=spd_lm_1l"]))
    schema.check_known_keys(_compose(["target=module", "target.factory=experiments.examples.mlp:trained_mlp",
                                      "target.data=experiments.examples.mlp:batch", "target.decompose=[0,2]",
                                      "+target.factory_kwargs.width=3"]))  # fmt: skip


def test_the_entry_point_fails_before_training(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.decompose", "+method.typo=1", f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'method.typo'") and "topk" in lines[0]
    assert not (out / "run.json").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("module,override,key", [
    ("experiments.train_target", "+target.n_hiden=3", "target.n_hiden"),
    ("experiments.compare", "+apd_typo=1", "apd_typo"),
])  # fmt: skip
def test_the_other_entry_points_fail_before_running(tmp_path, module, override, key):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", module, override, f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: unknown config key {key!r}"), proc.stderr[-2000:]
    assert not any(out.glob("*.pt")) and not (out / "comparison.md").exists()
