"""apd.compare.config: the grids check their fields, and every comparison preset composes."""

import pytest
from omegaconf import OmegaConf

from apd import APDConfig
from apd.compare import APDGrid, SAEGrid
from experiments import compare_schema
from tests.compare.presets import CONF, compose

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("compare_*.yaml"))


def test_grids_check_their_fields():
    assert SAEGrid(architecture="jumprelu").knob == "l0_coeff"
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAEGrid(architecture="gated")
    with pytest.raises(ValueError, match="sparsity_knob"):
        SAEGrid(architecture="topk", sparsity_knob="l1_coeff")
    with pytest.raises(ValueError, match="d_sae"):
        SAEGrid(architecture="topk", options={"d_sae": 3})
    with pytest.raises(ValueError, match="SAETrainConfig"):
        SAEGrid(architecture="topk", train={"stepz": 3})
    cfg = SAEGrid(architecture="batchtopk", transcoder=True).sae_config(2, 5, 0.25, d_out=2)
    assert cfg.is_transcoder and cfg.k == 0.25 and not cfg.apply_b_dec_to_input
    preset = APDConfig(C=5, topk=0.211, steps=100)
    assert [(m.C, m.topk, m.steps) for m in APDGrid().settings(preset)] == [(5, 0.211, 100)]
    cells = APDGrid(widths=[5, 6], topks=[0.2, 0.3], steps=7).settings(preset)
    assert [(m.C, m.topk, m.steps) for m in cells] == [(5, 0.2, 7), (5, 0.3, 7), (6, 0.2, 7), (6, 0.3, 7)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_compare_preset_composes_and_names_a_decompose_preset_of_its_target(preset):
    app = OmegaConf.to_object(compose("compare", [f"experiment={preset}"]))
    decompose = OmegaConf.to_object(compose("decompose", [f"experiment={app.apd_experiment}"]))
    # >= 5 seeds on the toys; the language model's comparison trains two of everything (seed consistency)
    assert isinstance(app, compare_schema.CompareApp) and len(app.seeds) >= (2 if decompose.target.kind == "lm" else 5)
    assert all(isinstance(g, SAEGrid) for g in app.saes.values()) and app.saes
    assert preset == f"compare_{decompose.target.name}"
    assert app.sae_train.steps > 0


def test_compare_typos_fail_at_compose():
    with pytest.raises(Exception, match="widthz"):
        OmegaConf.to_object(compose("compare", ["saes.topk.widthz=[3]"]))
    with pytest.raises(Exception, match="sparsity_knob"):
        OmegaConf.to_object(compose("compare", ["saes.topk.sparsity_knob=l1_coeff"]))
