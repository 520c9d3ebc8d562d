"""apd.compare.runs and apd.compare.registry: a saved SAE is reused only when trained exactly as
asked, a decomposition row's method fields come from the decomposition, and comparisons are
picked by target kind."""

import json

import pytest
import torch

from apd import APDConfig
from apd.baselines import SAETrainConfig
from apd.compare import (
    COMPARISONS,
    COLUMNS,
    LM_COLUMNS,
    RESID_COLUMNS,
    SAEGrid,
    TargetComparison,
    Trained,
    comparison_for,
    decomposition_fields,
    register_comparison,
    run_comparison,
    run_lm_comparison,
    run_resid_comparison,
    train_sae_cell,
)
from apd.compare.lm_report import lm_report
from apd.compare.toy_report import resid_report, tms_report
from apd.decomposition import Decomposition


def _cell(save_dir, train_cfg: SAETrainConfig) -> Trained:
    """One tiny TopK SAE on Gaussian data, saved to ``save_dir``; scored as an empty row."""
    grid = SAEGrid(architecture="topk", widths=[3], sparsity_values=[1])
    return train_sae_cell("topk", grid, 3, 1, 0, 2, 2, lambda n, g: torch.randn(n, 2, generator=g),
                          lambda sae: Trained(row={}, arrows=torch.zeros(0, 2), arrows_live=torch.zeros(0, dtype=torch.bool)),
                          train_cfg, save_dir)  # fmt: skip


def test_an_sae_saved_before_gradient_clipping_is_retrained_not_reused(tmp_path):
    info = tmp_path / "training.json"
    cfg = SAETrainConfig(steps=3, batch_size=8)
    _cell(tmp_path, cfg)
    saved = json.loads(info.read_text())
    assert saved["train"]["grad_clip_norm"] == 1.0  # the clipping is part of the recorded training config
    stamp = info.stat().st_mtime_ns
    _cell(tmp_path, cfg)
    assert info.stat().st_mtime_ns == stamp  # same configs: reloaded
    del saved["train"]["grad_clip_norm"]  # a record written before the option existed (trained unclipped)
    info.write_text(json.dumps(saved))
    _cell(tmp_path, cfg)
    assert json.loads(info.read_text())["train"]["grad_clip_norm"] == 1.0  # retrained and recorded anew
    stamp = info.stat().st_mtime_ns
    _cell(tmp_path, SAETrainConfig(steps=3, batch_size=8, grad_clip_norm=None))
    assert info.stat().st_mtime_ns != stamp and json.loads(info.read_text())["train"]["grad_clip_norm"] is None


def test_a_decompositions_method_fields_come_from_the_decomposition():
    A, B = {"enc": torch.zeros(4, 1, 3)}, {"enc": torch.zeros(4, 2, 1)}
    dec = Decomposition.from_factors(APDConfig(C=4, rank=1, topk=1.5, seed=7), A, B, {"enc": torch.zeros(2, 3)})
    assert decomposition_fields(dec) == {"method": "apd", "architecture": "apd", "seed": 7, "width": 4,
                                         "sparsity_knob": "topk", "sparsity": 1.5}  # fmt: skip
    dec.method = "unknown"
    with pytest.raises(ValueError, match="method 'unknown' is not known"):
        decomposition_fields(dec)


def test_comparisons_are_registered_by_target_kind():
    assert comparison_for("tms").run is run_comparison and comparison_for("tms").columns == COLUMNS
    assert comparison_for("resid_mlp").run is run_resid_comparison and comparison_for("resid_mlp").columns == RESID_COLUMNS
    assert comparison_for("lm").run is run_lm_comparison and comparison_for("lm").columns == LM_COLUMNS
    assert comparison_for("tms").report is tms_report and comparison_for("resid_mlp").report is resid_report
    assert comparison_for("lm").report is lm_report
    with pytest.raises(ValueError, match="registered kinds: \\['lm', 'resid_mlp', 'tms'\\]"):
        comparison_for("module")
    with pytest.raises(ValueError, match="already registered"):
        register_comparison(TargetComparison(kind="tms", run=run_comparison, columns=COLUMNS, best_key=lambda a: (),
                                             report=lambda inputs, comparison: ""))  # fmt: skip
    assert sorted(COMPARISONS) == ["lm", "resid_mlp", "tms"]
