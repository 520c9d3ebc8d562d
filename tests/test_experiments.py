"""The Hydra layer: every file in conf/ composes against its schema, and the entry points run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apd import load_decomposition
from apd.experiment import DecomposeRun, run_decompose
from apd.methods import method_for
from apd.targets import PRETRAINED_DIR, ResidMLPTargetConfig, TMSTargetConfig, get_target, load_target, save_target, train_target
from experiments import schema
from experiments.figures import save_figures

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("compare_"))
TARGETS = sorted(p.stem for p in (CONF / "target").glob("*.yaml"))


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_into_a_valid_run(experiment):
    cfg = _compose("decompose", [f"experiment={experiment}", "seed=3", "steps=7"])
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, schema.DecomposeApp)
    # each preset picks its own target (named after it; apd_ / spd_ prefix the method where the target has both)
    assert app.target.name == experiment.removesuffix("_paper").removeprefix("spd_").removeprefix("apd_")
    assert app.method.seed == 3 and app.method.steps == 7 and app.steps == 7  # one value, written everywhere
    assert app.method.method == ("spd" if experiment.startswith("spd_") else "apd")
    assert getattr(app.method, "topk", None) is None or app.method.topk <= app.method.C


def test_C_per_module_on_the_command_line_reaches_the_built_model():
    app = OmegaConf.to_object(_compose("decompose", ["experiment=spd_resid_mlp_2", "+method.C_per_module={mlp_out:7}"]))
    assert app.method.C_per_module == {"mlp_out": 7}
    target, _ = get_target(app.target)
    cm = method_for(app.method).build(target, app.target.modules())
    assert cm.C_per_module() == {"layers.0.mlp_in": 200, "layers.0.mlp_out": 7, "layers.1.mlp_in": 200, "layers.1.mlp_out": 7}


MODULE_EXAMPLE = ["target.factory=experiments.examples.mlp:trained_mlp", "target.data=experiments.examples.mlp:batch",
                  "target.decompose=[0,2]"]  # fmt: skip


def test_an_explicit_output_loss_is_kept_and_an_unset_one_is_the_targets():
    # bug (a): DecomposeRun took "equal to the default" for "not set", so an explicit
    # output_loss=mse on the language model (KL target) silently became KL, and on target=module
    # with loss=kl likewise
    from apd import APDConfig, OutputLoss, SPDConfig
    from apd.targets import ModuleTargetConfig

    lm = OmegaConf.to_object(_compose("decompose", ["experiment=spd_lm_1l"])).target
    module = ModuleTargetConfig(factory="experiments.examples.mlp:trained_mlp", data="experiments.examples.mlp:batch",
                                decompose=["0", "2"], loss="kl")  # fmt: skip
    for cls in (SPDConfig, APDConfig):
        for target in (lm, module):
            assert DecomposeRun(target=target, method=cls(output_loss="mse")).method.output_loss is OutputLoss.mse
            assert DecomposeRun(target=target, method=cls()).method.output_loss is OutputLoss.kl  # unset: the target's
        assert DecomposeRun(target=TMSTargetConfig(), method=cls(output_loss="kl")).method.output_loss is OutputLoss.kl
        assert DecomposeRun(target=TMSTargetConfig(), method=cls()).method.output_loss is OutputLoss.mse
        assert method_for(cls()).config.output_loss is OutputLoss.mse  # no target config (plain decompose): mse
    # the command line: python -m experiments.decompose experiment=spd_lm_1l method.output_loss=mse
    for experiment in ("spd_lm_1l", "apd_lm_1l"):
        app = OmegaConf.to_object(_compose("decompose", [f"experiment={experiment}", "method.output_loss=mse"]))
        assert app.method.output_loss is OutputLoss.mse and method_for(app.method).config.output_loss is OutputLoss.mse
        assert "output_loss: mse" in OmegaConf.to_yaml(OmegaConf.structured(app))  # what config.yaml records
        unset = OmegaConf.to_object(_compose("decompose", [f"experiment={experiment}", "method.output_loss=null"]))
        assert unset.method.output_loss is OutputLoss.kl
    own = ["experiment=spd_tms_5_2", "target=module", *MODULE_EXAMPLE, "target.loss=kl"]
    assert OmegaConf.to_object(_compose("decompose", [*own, "method.output_loss=mse"])).method.output_loss is OutputLoss.mse
    assert OmegaConf.to_object(_compose("decompose", own)).method.output_loss is OutputLoss.kl


def test_a_seed_or_device_set_on_the_method_alone_is_kept():
    # the same bug for the top-level knobs: DecomposeRun wrote its default seed 0 and device cpu over
    # an explicit method.seed / method.device (a given top-level value still wins)
    from apd import SPDConfig

    run = DecomposeRun(target=TMSTargetConfig(), method=SPDConfig(seed=4, device="cpu:0"))
    assert (run.seed, run.method.seed, run.device, run.method.device) == (4, 4, "cpu:0", "cpu:0")
    run = DecomposeRun(target=TMSTargetConfig(), method=SPDConfig(seed=4), seed=2)
    assert (run.seed, run.method.seed, run.device, run.method.device) == (2, 2, "cpu", "cpu")
    app = OmegaConf.to_object(_compose("decompose", ["experiment=spd_tms_5_2", "method.seed=4"]))
    assert app.seed == 4 and app.method.seed == 4
    app = OmegaConf.to_object(_compose("decompose", ["experiment=spd_tms_5_2", "method.seed=4", "seed=2"]))
    assert app.seed == 2 and app.method.seed == 2


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_composes(target):
    extra = {"module": MODULE_EXAMPLE, "hf": ["target.path=DIR", "target.modules=[lm_head]"]}.get(target, [])
    app = OmegaConf.to_object(_compose("train_target", [f"target={target}", *extra]))
    assert app.target.name == target
    assert app.target.modules()


@pytest.mark.parametrize("logger", ["none", "tensorboard", "wandb"])
def test_logger_options_compose(logger):
    app = OmegaConf.to_object(_compose("decompose", [f"logger={logger}"]))
    assert app.logger.kind.value == logger


@pytest.mark.parametrize(
    "override,match",
    [
        ("method.topK=3", "topK"),
        ("method.C=abc", "C"),
        ("method.attribution=saliency", "attribution"),
        ("target.n_hiden=3", "n_hiden"),
        ("stepz=3", "stepz"),
    ],
)
def test_typos_and_wrong_types_fail_at_compose(override, match):
    with pytest.raises(Exception, match=match):
        OmegaConf.to_object(_compose("decompose", [override]))


def test_out_of_range_values_fail_with_the_field_name():
    with pytest.raises(Exception, match="k cannot exceed"):
        OmegaConf.to_object(_compose("decompose", ["method.topk=11"]))  # C is 10 in the default preset


def test_target_ship_and_load_round_trip(tmp_path):
    cfg = TMSTargetConfig(name="tiny", n_features=4, n_hidden=2, train_steps=50, train_batch_size=64)
    model, info = train_target(cfg)
    save_target(model, cfg, info, tmp_path / "tiny.pt")
    loaded, cfg2, info2 = load_target(tmp_path / "tiny.pt")
    assert cfg2 == cfg and info2["train_loss"] == info["train_loss"]
    assert json.loads((tmp_path / "tiny.json").read_text())["command"].endswith("target=tiny ship=true")
    x = torch.rand(8, 4)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("name", ["tms_5_2", "tms_40_10", "tms_5_2_id", "tms_40_10_id", "resid_mlp_1", "resid_mlp_2", "resid_mlp_3"])
def test_shipped_targets_exist_and_match_their_configs(name):
    app = OmegaConf.to_object(_compose("train_target", [f"target={name}"]))
    model, info = get_target(app.target)
    assert info["source"] == str(PRETRAINED_DIR / f"{name}.pt"), "the shipped target does not match conf/target"
    assert (PRETRAINED_DIR / f"{name}.json").is_file() and info["train_loss"] < 0.01
    assert (PRETRAINED_DIR / f"{name}.pt").stat().st_size < 4 * 2**20  # small files only


def test_get_target_trains_when_the_shipped_config_differs():
    cfg = TMSTargetConfig(name="tms_5_2", n_features=5, n_hidden=2, train_steps=20, train_batch_size=32)
    _, info = get_target(cfg)
    assert info["source"] == "trained in this run"


def test_main_job_writes_its_artifacts(tmp_path):
    """The main job shortened to 200 steps (the default run's check; the full 3000-step job is slow):
    metrics, config, the metrics log, figures and a loadable decomposition."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.decompose", "steps=200", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results written to {out}" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["mmcs", "ml2r", "n_recovered_0.9", "faithfulness_loss", "topk_recon_mse", "l0", "wall_seconds"]:
        assert isinstance(metrics[key], (int, float)), key
    assert 0 < metrics["mmcs"] <= 1 and metrics["faithfulness_loss"] >= 0
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2
    assert {p.name for p in (out / "figures").iterdir()} >= {"tms_columns.png", "component_heatmaps.png"}
    dec = load_decomposition(out)
    assert dec.step == 200 and dec.component_weights()["enc"].shape == (10, 2, 5)


@pytest.mark.slow  # the 3000-step main job: 30 s (fast check: test_main_job_writes_its_artifacts)
def test_main_job_recovers_tms_5_2_and_writes_its_artifacts(tmp_path):
    """`python -m experiments.decompose` (the README's main job), run as a user would."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.decompose", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results written to {out}" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["all_recovered"] == 1 and metrics["n_recovered_matched_0.99"] == 5, metrics
    for key in ["mmcs", "ml2r", "n_recovered_0.9", "n_recovered_0.99", "matched_mean_cos", "n_dead",
                "faithfulness_loss", "topk_recon_mse", "l0", "wall_seconds"]:  # fmt: skip
        assert isinstance(metrics[key], (int, float)), key
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").read_text().count("\n") > 10
    assert {p.name for p in (out / "figures").iterdir()} >= {"tms_columns.png", "component_heatmaps.png"}
    dec = load_decomposition(out)
    assert dec.step == dec.config.steps and dec.component_weights()["enc"].shape == (10, 2, 5)


def test_resid_mlp_run_writes_every_metric(tmp_path):
    run = DecomposeRun(target=ResidMLPTargetConfig(name="resid_mlp_1"), steps=3, batch_size=32, n_eval=200,
                       method=OmegaConf.to_object(_compose("decompose", ["experiment=resid_mlp_1"])).method)  # fmt: skip
    result = run_decompose(run, tmp_path, progress=False)
    figures = save_figures(result, run, tmp_path / "figures")
    assert {p.name for p in figures} == {"neuron_contributions.png", "scrub_antiscrub.png", "top1_onehot_mse.png", "mechanisms.png",
                                          "loss_curves.png"}
    assert all(p.stat().st_size > 10_000 for p in figures)
    keys = ["n_features_with_dedicated_component", "n_mono", "n_duo", "n_poly", "n_dead", "nc_slope",
            "top1_onehot_mse", "scrubbed_mse", "antiscrubbed_mse", "topk_recon_mse", "mse_monosemantic_vs_target",
            "mse_target_vs_labels", "mse_apd_topk_vs_labels", "mse_monosemantic_vs_labels", "faithfulness_loss",
            "l0", "wall_seconds"]  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert all(k in saved for k in keys), set(keys) - set(saved)
    # the monosemantic baseline and the trained target are both far better than zero output
    assert saved["mse_target_vs_labels"] < saved["mse_monosemantic_vs_labels"] < 0.01
    assert result.metrics["l0"] == pytest.approx(1.28, abs=0.05)


def test_an_spd_run_on_the_residual_mlp_reports_its_w_out_mechanism(tmp_path):
    app = OmegaConf.to_object(_compose("decompose", ["experiment=spd_resid_mlp_2", "steps=3", "n_eval=200", "batch_size=32",
                                                     "method.compile_ci=off"]))
    m = run_decompose(app, tmp_path, progress=False).metrics
    for w_out in ["layers.0.mlp_out", "layers.1.mlp_out"]:  # the mechanism holding most of its live subcomponents
        assert m[f"w_out_mechanism_rank/{w_out}"] >= 1 and 0 < m[f"w_out_mechanism_share/{w_out}"] <= 1
        assert 1 <= m[f"w_out_n_mechanisms/{w_out}"] <= m["n_mechanisms"]
    # a feature's mechanism has a W_in piece per layer: each layer's own slope, and the sum's
    assert {"nc_slope", "nc_slope/layers.0.mlp_in", "nc_slope/layers.1.mlp_in"} <= m.keys()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_runs_a_few_steps_end_to_end(experiment, tmp_path):
    app = OmegaConf.to_object(_compose("decompose", [f"experiment={experiment}", "steps=5", "n_eval=500"]))
    result = run_decompose(app, tmp_path, progress=False)
    assert json.loads((tmp_path / "metrics.json").read_text()).keys() == result.metrics.keys()
    assert load_decomposition(tmp_path).step == 5


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.decompose", "logger=tensorboard", "steps=20", "figures=false",
         f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def _decompose(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.decompose", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)  # fmt: skip


def test_config_yaml_is_the_resolved_run_and_a_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = _decompose("steps=30", "seed=4", "figures=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.steps == 30 and saved.method.steps == 30 and saved.seed == 4 and saved.method.seed == 4
    before = (out / "metrics.json").read_text()
    # the same run again: finished, not redone, config.yaml unchanged
    again = _decompose("steps=30", "seed=4", "figures=false", f"hydra.run.dir={out}")
    assert again.returncode == 0 and (out / "metrics.json").read_text() == before
    # other settings into the same dir: refused in one line, nothing overwritten
    other = _decompose("steps=30", "seed=4", "method.lr=0.01", "figures=false", f"hydra.run.dir={out}")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: ") and "method.lr" not in other.stdout
    assert "config.lr: 0.03 there, 0.01 now" in other.stderr and "Traceback" not in other.stderr
    assert OmegaConf.load(out / "config.yaml").method.lr == 0.03 and (out / "metrics.json").read_text() == before


def test_a_bad_config_value_is_one_line_on_the_command_line(tmp_path):
    proc = _decompose("method.topk=11", "figures=false", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: APDConfig.topk=11.0 > C=10: k cannot exceed the number of components" in proc.stderr


def test_your_own_model_from_the_command_line(tmp_path):
    out = tmp_path / "own"
    proc = _decompose("target=module", *MODULE_EXAMPLE, "method.C=6", "method.topk=2", "method.steps=40",
                      "figures=false", f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(2.0, abs=0.05) and metrics["faithfulness_loss"] < 1.0


def test_module_target_errors_name_the_field_and_the_fix():
    from apd.config import ConfigError
    from apd.targets import ModuleTargetConfig

    with pytest.raises(ConfigError, match="target=module needs target.factory and target.data"):
        ModuleTargetConfig(decompose=["0"])
    with pytest.raises(ConfigError, match="target.decompose"):
        ModuleTargetConfig(factory="experiments.examples.mlp:trained_mlp", data="experiments.examples.mlp:batch")
    wrong = ModuleTargetConfig(factory="experiments.examples.mlp:trained_mlp", data="experiments.examples.mlp:batches",
                               decompose=["0"])  # fmt: skip
    with pytest.raises(ConfigError, match="has no 'batches'; it has .*'batch'"):
        wrong.batch(4, None)
    with pytest.raises(ConfigError, match="cannot import 'no_such_package.models' \\(No module named 'no_such_package'\\)"):
        ModuleTargetConfig(factory="no_such_package.models:make", data="experiments.examples.mlp:batch", decompose=["0"]).build()


def test_load_run_gives_a_notebook_the_target_decomposition_run_and_metrics(tmp_path):
    from apd.experiment import load_run

    run = DecomposeRun(target=TMSTargetConfig(name="tms_5_2"), steps=20, batch_size=256, n_eval=500)
    result = run_decompose(run, tmp_path, progress=False)
    loaded = load_run(tmp_path)
    assert loaded.run.identity() == run.identity() and loaded.metrics == result.metrics
    assert torch.equal(loaded.decomposition.A["enc"], result.decomposition.A["enc"])
    cm = loaded.component_model()
    x = run.target.batch(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cm(x), loaded.target(x))
    text = repr(loaded.decomposition)
    assert text.startswith("Decomposition(APD, C=8 over 1 matrices [enc (2, 5)], tied {'dec': 'enc'}, step 20/20")
    assert "tensor(" not in text and len(text) < 200


def test_an_spd_run_on_tms_with_identity_writes_its_metrics_and_figures(tmp_path):
    app = OmegaConf.to_object(_compose("decompose", ["experiment=spd_tms_5_2_id", "steps=30", "n_eval=500", "batch_size=256"]))
    result = run_decompose(app, tmp_path, progress=False)
    m = result.metrics
    for key in ["mmcs", "ml2r", "all_recovered", "ci_recon_mse", "l0", "l0/enc", "l0/hidden", "l0/dec", "n_alive/hidden",
                "ci_thresholded_recon_mse", "id_recovered", "id_n_alive", "id_cos", "n_mechanisms", "mechanisms"]:  # fmt: skip
        assert key in m, key
    assert m["l0"] == pytest.approx(m["l0/enc"] + m["l0/hidden"] + m["l0/dec"])
    figures = save_figures(result, app, tmp_path / "figures")
    assert {p.name for p in figures} == {"tms_columns.png", "component_heatmaps.png", "mechanisms.png", "causal_importances.png",
                                          "loss_curves.png"}


def test_evaluate_rescores_a_finished_run_and_keeps_the_old_metrics(tmp_path, capsys):
    from experiments import evaluate

    run = DecomposeRun(target=TMSTargetConfig(name="tms_5_2"), steps=20, batch_size=256, n_eval=500)
    first = run_decompose(run, tmp_path / "run", progress=False).metrics
    stale = {**first, "mmcs": -1.0, "n_mechanisms": 99.0}  # as if written by an older version of the metrics
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(stale))
    assert evaluate.main([str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads((tmp_path / "run" / "metrics.prev.json").read_text()) == stale
    # the same decomposition on the same evaluation inputs: the same numbers, run facts kept
    assert again["mmcs"] == pytest.approx(first["mmcs"]) and again["n_mechanisms"] == first["n_mechanisms"]
    assert again["wall_seconds"] == first["wall_seconds"]
    assert f"{tmp_path / 'run'}: mmcs" in capsys.readouterr().out
    # not a run dir: one line, status 1
    assert evaluate.main([str(tmp_path)]) == 1
    assert "holds no run.json" in capsys.readouterr().err
