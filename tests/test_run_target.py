"""A run dir holds its own target (bug d of issue #30): ``target.pt`` is written when the run starts,
pinned by the sha256 in ``run.json``; ``load_run`` and a rerun on the dir use it and never retrain."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from apd import CheckpointError
from apd.experiment import DecomposeRun, load_run, run_decompose
from apd.targets import TMSTargetConfig, get_target, save_target, train_target

FORMATS = Path(__file__).parent / "data" / "formats"


def _tiny(**kw) -> TMSTargetConfig:
    """A TMS target that nothing ships: getting it trains it (50 steps)."""
    return TMSTargetConfig(name="tiny_tms", n_features=5, n_hidden=2, train_steps=50, train_batch_size=64, **kw)


def _run(target: TMSTargetConfig) -> DecomposeRun:
    return DecomposeRun(target=target, steps=10, batch_size=64, n_eval=100)


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """An empty folder of shipped targets standing in for apd/toy_models/pretrained/."""
    d = tmp_path / "pretrained"
    d.mkdir()
    monkeypatch.setattr(sys.modules[get_target.__module__], "PRETRAINED_DIR", d)
    return d


def _ship(cfg: TMSTargetConfig, folder: Path, seed: int) -> torch.Tensor:
    """Ship ``cfg`` with the weights of training seed ``seed`` (a shipped target retrained); returns its W."""
    model, info = train_target(dataclasses.replace(cfg, train_seed=seed))
    save_target(model, cfg, info, folder / f"{cfg.name}.pt")  # recorded under cfg: get_target(cfg) loads it
    return model.enc.weight.detach().clone()


def _no_training(monkeypatch) -> None:
    def refuse(self, model):  # noqa: ANN001, ANN202
        raise AssertionError("the target was trained again")

    monkeypatch.setattr(TMSTargetConfig, "train", refuse)


def test_load_run_gives_the_runs_own_target_after_the_shipped_one_changed(tmp_path, shipped):
    cfg = _tiny()
    _ship(cfg, shipped, seed=0)
    result = run_decompose(_run(cfg), tmp_path / "run", progress=False)
    W = result.target.enc.weight.detach().clone()
    new_W = _ship(cfg, shipped, seed=1)  # the shipped file is retrained
    assert not torch.allclose(W, new_W)
    loaded = load_run(tmp_path / "run")
    assert torch.equal(loaded.target.enc.weight, W)
    x = cfg.batch(32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.component_model()(x), loaded.target(x))  # the decomposition attaches to it
    # a rerun on the finished dir gives the run's own target too
    again = run_decompose(_run(cfg), tmp_path / "run", progress=False)
    assert torch.equal(again.target.enc.weight, W)


def test_load_run_never_trains_the_target(tmp_path, shipped, monkeypatch):
    cfg = _tiny()  # not shipped: the run trains it once, at its start
    result = run_decompose(_run(cfg), tmp_path / "run", progress=False)
    _no_training(monkeypatch)
    loaded = load_run(tmp_path / "run")
    assert torch.equal(loaded.target.enc.weight, result.target.enc.weight)


def test_the_run_dir_pins_its_target_by_hash(tmp_path, shipped):
    from apd.checkpoint import TARGET_NAME, state_sha256

    run_decompose(_run(_tiny()), tmp_path / "run", progress=False)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    loaded = load_run(tmp_path / "run")
    assert run_json["target_sha256"] == state_sha256(loaded.target.state_dict())
    assert (tmp_path / "run" / TARGET_NAME).stat().st_size < 10_000
    # a target.pt swapped for another target's is refused, naming the file and the hash
    other, info = train_target(_tiny(train_seed=3))
    save_target(other, _tiny(), info, tmp_path / "run" / TARGET_NAME, sidecar=False)
    with pytest.raises(CheckpointError, match=r"target\.pt holds weights of sha256 [0-9a-f]{12}.*run\.json pins [0-9a-f]{12}"):
        load_run(tmp_path / "run")


def test_a_multi_seed_run_dir_holds_its_target_in_every_seed_dir(tmp_path, shipped, monkeypatch):
    run = DecomposeRun(target=_tiny(), steps=10, batch_size=64, n_eval=100, n_seeds=2)
    from apd.experiment import run_decompose_seeds

    results = run_decompose_seeds(run, tmp_path / "run", progress=False)
    _no_training(monkeypatch)
    for seed, result in zip([0, 1], results):
        loaded = load_run(tmp_path / "run", seed=seed)
        assert torch.equal(loaded.target.enc.weight, result.target.enc.weight)
        assert loaded.run_dir == tmp_path / "run" / f"seed_{seed}" and (loaded.run_dir / "target.pt").is_file()


def test_a_run_dir_from_before_target_files_loads_the_shipped_target_with_a_warning(tmp_path):
    shutil.copytree(FORMATS / "run_v2", tmp_path / "run")
    with pytest.warns(UserWarning, match=r"holds no target\.pt.*rebuilt.*tms_5_2\.pt"):
        loaded = load_run(tmp_path / "run")
    assert not (tmp_path / "run" / "target.pt").exists()  # loading writes nothing
    x = loaded.run.target.batch(32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.component_model()(x), loaded.target(x), atol=1e-5, rtol=1e-5)


def test_a_run_dir_from_before_target_files_refuses_a_changed_shipped_target(tmp_path, shipped):
    shutil.copytree(FORMATS / "run_v2", tmp_path / "run")
    cfg = TMSTargetConfig(name="tms_5_2")
    model, info = train_target(TMSTargetConfig(name="tms_5_2", train_steps=50, train_seed=7))
    save_target(model, cfg, info, shipped / "tms_5_2.pt")  # a shipped tms_5_2 retrained since the run
    with pytest.raises(CheckpointError, match=r"holds no target\.pt.*not the target this run decomposed \(enc: the model's weight differs"):
        load_run(tmp_path / "run")


def _old_run_dir(tmp_path: Path) -> tuple[Path, DecomposeRun]:
    """A copy of a finished run dir of the version before target.pt (its run.json rewritten by this
    version, so that fields added to the configs since do not count as other settings)."""
    d = tmp_path / "run"
    shutil.copytree(FORMATS / "run_v2", d)
    run = DecomposeRun.from_dict(json.loads((d / "run.json").read_text()))
    (d / "run.json").write_text(json.dumps(run.to_dict()))
    return d, run


def test_a_rerun_on_a_run_dir_from_before_target_files_gives_it_its_target(tmp_path, capsys):
    d, run = _old_run_dir(tmp_path)
    result = run_decompose(run, d, progress=False)  # finished: not redone
    assert result.metrics == json.loads((FORMATS / "run_v2" / "metrics.json").read_text())
    assert "holds no target.pt" in capsys.readouterr().out
    assert (d / "target.pt").is_file() and json.loads((d / "run.json").read_text())["target_sha256"]
    loaded = load_run(d)  # from now on the run's own: no warning, nothing rebuilt
    assert torch.equal(loaded.target.enc.weight, result.target.enc.weight)


def test_a_rerun_on_a_run_dir_from_before_target_files_refuses_a_changed_shipped_target(tmp_path, shipped):
    d, run = _old_run_dir(tmp_path)
    model, info = train_target(TMSTargetConfig(name="tms_5_2", train_steps=50, train_seed=7))
    save_target(model, TMSTargetConfig(name="tms_5_2"), info, shipped / "tms_5_2.pt")
    with pytest.raises(CheckpointError, match=r"holds no target\.pt.*not the target this run decomposed"):
        run_decompose(run, d, progress=False)
    assert not (d / "target.pt").exists()
