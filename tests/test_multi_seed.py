"""Several seeds trained at once (apd.decompose_seeds): each instance is exactly the run it stands for."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apd import APDConfig, ConfigError, NonFiniteLossError, decompose, decompose_seeds
from apd.checkpoint import CHECKPOINT_NAME
from apd.targets import TMSTargetConfig, get_target
from experiments.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]
TMS = TMSTargetConfig(name="tms_5_2", n_features=5, n_hidden=2)


def _config(**kw) -> APDConfig:
    base = dict(C=5, init_scale=0.1, topk=0.25, batch_topk=True, simplicity_coeff=0.7, schatten_p=1.0, lr=3e-2,
                lr_schedule="constant", warmup_frac=0.1, steps=40, finetune_frac=0.2, log_every=10,
                gradient_mode="hidden")  # fmt: skip
    return APDConfig(**(base | kw))


@pytest.fixture(scope="module")
def target():
    return get_target(TMS)[0]


def _batches(n: int, batch: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [TMS.batch(batch, g) for _ in range(n)]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-4)


def test_each_instance_equals_its_single_seed_run(target):
    """Instance i draws batches i, i+N, ...: fed the same batches, decompose() with seed i agrees."""
    config = _config(grad_clip_norm=0.05, unit_norm_A=True)  # per-instance clipping and projection too
    batches = _batches(2 * config.steps)
    decs = decompose_seeds(target, batches, config, TMS.modules(), seeds=[4, 9], progress=False)
    for i, seed in enumerate([4, 9]):
        single = decompose(target, batches[i::2], APDConfig(**(config.to_dict() | {"seed": seed})), TMS.modules(),
                           progress=False)  # fmt: skip
        assert decs[i].config.seed == seed
        _close(decs[i].A, single.A)
        _close(decs[i].B, single.B)
        assert [h["step"] for h in decs[i].history] == [h["step"] for h in single.history]
        assert decs[i].history[-1]["total"] == pytest.approx(single.history[-1]["total"], rel=1e-4)
    assert not torch.allclose(decs[0].A["enc"], decs[1].A["enc"])  # different seeds, different components


def test_one_seed_matches_decompose_on_the_same_global_rng_stream(target):
    config = _config(seed=3)
    data = lambda: TMS.batch(256, None)  # noqa: E731  (from the global RNG, seeded by both with seed 3)
    (multi,) = decompose_seeds(target, data, config, TMS.modules(), seeds=[3], progress=False)
    single = decompose(target, data, config, TMS.modules(), progress=False)
    _close(multi.A, single.A)
    _close(multi.component_weights(), single.component_weights())


def test_killed_run_resumes_to_the_uninterrupted_result(target, tmp_path):
    config = _config(checkpoint_every=10, log_every=5)  # killed at step 25: steps 20-24 are replayed
    data = lambda: TMS.batch(256, None)  # noqa: E731
    full = decompose_seeds(target, data, config, TMS.modules(), seeds=[0, 1, 2], progress=False)

    def crash(seed: int, step: int, terms: dict) -> None:
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose_seeds(target, data, config, TMS.modules(), seeds=[0, 1, 2], progress=False, callback=crash,
                        checkpoint_dir=tmp_path)  # fmt: skip
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    resumed = decompose_seeds(target, data, config, TMS.modules(), seeds=[0, 1, 2], progress=False, checkpoint_dir=tmp_path)
    for a, b in zip(full, resumed):
        for n in a.A:
            assert torch.equal(a.A[n], b.A[n]) and torch.equal(a.B[n], b.B[n])
        assert a.history == b.history
    with pytest.raises(Exception, match="another run"):
        decompose_seeds(target, data, config, TMS.modules(), seeds=[0, 1], progress=False, checkpoint_dir=tmp_path)


def test_bad_input_is_named(target):
    data = lambda: TMS.batch(64, None)  # noqa: E731
    with pytest.raises(ConfigError, match="optimizer='sgd'.*adam"):
        decompose_seeds(target, data, _config(optimizer="sgd"), TMS.modules(), seeds=[0, 1], progress=False)
    with pytest.raises(ConfigError, match="repeats a seed"):
        decompose_seeds(target, data, _config(), TMS.modules(), seeds=[0, 0], progress=False)
    with pytest.raises(ConfigError, match="per_sample"):
        decompose_seeds(target, data, _config(gradient_mode="per_sample"), TMS.modules(), seeds=[0], progress=False)
    with pytest.raises(ConfigError, match="empty"):
        decompose_seeds(target, data, _config(), TMS.modules(), seeds=[], progress=False)

    calls = []

    def poisoned() -> torch.Tensor:  # the second seed's batch at step 1 holds a NaN
        calls.append(1)
        x = TMS.batch(64, None)
        return x.fill_(float("nan")) if len(calls) == 4 else x

    with pytest.raises(NonFiniteLossError, match=r"step 1 for seed\(s\) \[8\]"):
        decompose_seeds(target, poisoned, _config(), TMS.modules(), seeds=[7, 8], progress=False)


def test_n_seeds_experiment_writes_one_run_dir_per_seed_and_summarizes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.decompose", "n_seeds=2", "seed=5", "steps=40", "figures=false",
           f"hydra.run.dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (5, 6):
        metrics = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        assert 0 <= metrics["mmcs"] <= 1 and metrics["n_seeds_at_once"] == 2
        assert f"seed: {seed}" in (out / f"seed_{seed}" / "config.yaml").read_text()
        assert len((out / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()) >= 2
    summary = json.loads((out / "metrics_seeds.json").read_text())
    assert summary["n_seeds"] == 2

    summarize(tmp_path, "mmcs", 0.5)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(r["seed"] for r in rows) == ["5", "6"] and all(r["status"] == "finished" for r in rows)

    before = (out / "seed_5" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (out / "seed_5" / "metrics.json").stat().st_mtime_ns == before  # not redone
