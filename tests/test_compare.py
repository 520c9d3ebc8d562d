"""apd.compare and `python -m experiments.compare`: every comparison metric on hand-built cases where
the answer is known, the presets, and a reduced TMS 5-2 comparison end to end."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apd.baselines import SAETrainConfig, StandardSAE, StandardSAEConfig
from apd.compare import (
    COLUMNS,
    APDGrid,
    SAEGrid,
    apd_bits,
    apd_loss_recovered,
    apd_n_params,
    evaluate_apd,
    evaluate_sae_row,
    feature_splitting,
    identity_parts,
    run_comparison,
    summarise,
    tms_activations,
)
from apd import APDConfig
from apd.decomposition import Decomposition
from apd.experiment import DecomposeRun
from apd.targets import TMSTargetConfig, get_target
from apd.toy_models.tms import TMS, TMSConfig, tms_batch
from experiments import compare_schema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("compare_*.yaml"))


def _tms(W: torch.Tensor) -> TMS:
    """A TMS whose W is given (n_hidden × n_features), decoder bias -0.1."""
    model = TMS(TMSConfig(n_features=W.shape[1], n_hidden=W.shape[0]))
    with torch.no_grad():
        model.enc.weight.copy_(W)
        model.dec.bias.fill_(-0.1)
    return model


def _data(target: TMS, n: int = 4000, p: float = 0.3):
    x = tms_batch(target.config.n_features, n, p, torch.Generator().manual_seed(0))
    return tms_activations(target, x)


def _sae(W_enc: torch.Tensor, W_dec: torch.Tensor) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1]))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------------------------ SAE rows


def test_a_perfect_dictionary_scores_mmcs_1_and_recovers_every_feature():
    W = 2.0 * torch.eye(3)  # orthogonal features of norm 2: h = 2x >= 0, so ReLU(h @ I) = h exactly
    target = _tms(W)
    data = _data(target)
    row = evaluate_sae_row(_sae(torch.eye(3), torch.eye(3)), target, data, bits_per_value=8.0).row
    assert row["mmcs"] == pytest.approx(1) and row["matched_mean_cos"] == pytest.approx(1)
    assert row["mmcs_learned"] == pytest.approx(1)
    assert row["n_recovered_0.99"] == row["n_recovered_matched_0.99"] == 3 and row["all_recovered"] == 1
    assert row["shrinkage"] == pytest.approx(1)  # activation 2 on x = e_j, unit decoder row, ‖W[:, j]‖ = 2
    assert row["fvu"] == pytest.approx(0, abs=1e-12) and row["loss_recovered"] == pytest.approx(1)
    assert row["latents_per_feature"] == 1 and row["n_split_features"] == 0 and row["n_duplicate_pairs"] == 0
    assert row["n_dead"] == 0
    assert row["l0"] == pytest.approx((data.x != 0).sum(1).float().mean().item())
    assert row["n_params"] == 3 * 3 * 2 + 3 + 3  # W_enc, W_dec, b_enc, b_dec
    assert row["bits_per_datapoint"] == pytest.approx(row["l0"] * (math.log2(3) + 8.0))
    assert all(math.isnan(row[k]) for k in COLUMNS if k.startswith("id_"))


def test_a_latent_serving_two_features_fools_mmcs_but_not_the_matched_cosine():
    # features 0 and 1 point almost the same way (cos 0.995); latent 0 is the best match of both
    t1 = torch.tensor([0.995, math.sqrt(1 - 0.995**2), 0.0])
    W = torch.stack([torch.tensor([1.0, 0, 0]), t1, torch.tensor([0, 0, 1.0])], dim=1)  # (3 hidden, 3 features)
    target = _tms(W)
    W_dec = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # the third latent points away from every feature
    row = evaluate_sae_row(_sae(W_dec.T.clone(), W_dec), target, _data(target)).row
    assert row["mmcs"] > 0.99 and row["n_recovered_0.99"] == 3  # MMCS counts latent 0 twice
    assert row["n_recovered_matched_0.99"] == 2 and row["all_recovered"] == 0  # one-to-one it cannot
    # the matching gives latent 0 to feature 1 (0.995) and leaves feature 0 the stray latent (cosine 0)
    assert row["matched_mean_cos"] == pytest.approx((0.995 + 1 + 0) / 3, abs=1e-5)


def test_duplicated_latents_count_as_split_features_and_duplicate_pairs():
    truth = torch.eye(3)
    dirs = torch.stack([truth[0], truth[0] * 2, truth[1], truth[2], -truth[2]])
    live = torch.tensor([True, True, True, True, True])
    s = feature_splitting(dirs, truth, live, tau=0.9)
    assert s == {"latents_per_feature": pytest.approx(4 / 3), "n_split_features": 1, "n_duplicate_pairs": 1}
    live[1] = False  # a dead copy is not a split
    assert feature_splitting(dirs, truth, live)["n_split_features"] == 0


# ------------------------------------------------------------------------------------ APD rows


def _ground_truth_decomposition(W: torch.Tensor, hidden: torch.Tensor | None = None) -> Decomposition:
    """Components = the ground-truth mechanisms W e_j e_jᵀ (full-rank layout, second rank unused);
    with ``hidden``, one more component holding the whole identity (and nothing of W)."""
    m, n = W.shape
    C = n + (hidden is not None)
    A = torch.zeros(C, m, n)
    B = torch.zeros(C, m, m)
    for j in range(n):
        A[j, 0, j] = 1.0
        B[j, :, 0] = W[:, j]
    As, Bs, targets = {"enc": A}, {"enc": B}, {"enc": W.clone()}
    if hidden is not None:
        Ah, Bh = torch.zeros(C, m, m), torch.zeros(C, m, m)
        Ah[-1], Bh[-1] = torch.eye(m), hidden
        As["hidden"], Bs["hidden"], targets["hidden"] = Ah, Bh, hidden.clone()
    return Decomposition.from_factors(APDConfig(C=C, topk=float(C), batch_topk=True), As, Bs, targets, tied={"dec": "enc"})


def test_apd_components_equal_to_the_mechanisms_score_perfectly_with_all_on_masks():
    target, _ = get_target(TMSTargetConfig(name="tms_5_2"))
    W = target.W.detach()
    data = _data(target, p=0.05)
    t = evaluate_apd(_ground_truth_decomposition(W), target, data)
    row = t.row
    assert row["mmcs"] == pytest.approx(1) and row["matched_mean_cos"] == pytest.approx(1)
    assert row["mmcs_learned"] == pytest.approx(1) and row["all_recovered"] == 1
    assert row["shrinkage"] == pytest.approx(1)
    assert row["fvu"] == pytest.approx(0, abs=1e-10) and row["loss_recovered"] == pytest.approx(1, abs=1e-8)
    assert row["l0"] == 5 and row["n_dead"] == 0  # all-on masks (topk = C)
    assert row["latents_per_feature"] == 1 and row["n_duplicate_pairs"] == 0
    assert row["n_params"] == 5 * 2 * (5 + 2)  # C·m·(d_in + d_out), the tied decoder not again
    assert row["bits_per_datapoint"] == pytest.approx(5 * math.log2(5))
    torch.testing.assert_close(t.arrows, W.T)  # the drawn columns: component c holds W[:, c] only
    assert t.arrow_labels == [f"c{c}" for c in range(5)]


def test_one_apd_component_holding_two_features_is_caught_by_the_matched_cosine():
    target, _ = get_target(TMSTargetConfig(name="tms_5_2"))
    W = target.W.detach()
    dec = _ground_truth_decomposition(W)
    dec.A["enc"][0, 1, 1] = 1.0  # component 0 also holds feature 1 in its second rank
    dec.B["enc"][0, :, 1] = W[:, 1]
    dec.A["enc"][1], dec.B["enc"][1] = 0.0, 0.0  # ... and component 1 is empty
    row = evaluate_apd(dec, target, _data(target, p=0.05)).row
    assert row["mmcs"] == pytest.approx(1) and row["n_recovered_0.99"] == 5
    assert row["matched_mean_cos"] == pytest.approx(0.8) and row["n_recovered_matched_0.99"] == 4
    assert row["all_recovered"] == 0
    assert row["mmcs_learned"] < 0.8  # the merged component is far from either single mechanism


def test_apd_on_id_one_component_holding_the_identity_is_the_ground_truth():
    target, _ = get_target(TMSTargetConfig(name="tms_5_2_id", identity=True))
    W = target.W.detach()
    t = evaluate_apd(_ground_truth_decomposition(W, hidden=torch.eye(2)), target, _data(target, p=0.05))
    row = t.row
    assert row["id_n_components"] == 1 and row["id_max_share"] == pytest.approx(1)
    assert row["id_best_cos_identity"] == pytest.approx(1)
    assert row["fvu"] == pytest.approx(0, abs=1e-10) and row["loss_recovered"] == pytest.approx(1, abs=1e-8)
    assert row["mmcs"] == pytest.approx(1)
    assert row["n_params"] == 6 * 2 * (5 + 2) + 6 * 2 * (2 + 2)
    assert [d["share"] for d in t.details][-1] == pytest.approx(1)


def test_identity_cut_into_feature_projectors():
    W = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # orthogonal features: I = Π_0 + Π_1
    P = torch.stack([torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0])), torch.zeros(2, 2)])
    summary, per_component = identity_parts(P, torch.eye(2), W, negligible=0.1)
    assert summary["id_n_components"] == 2 and summary["id_projector_cos"] == pytest.approx(1)
    assert summary["id_max_share"] == pytest.approx(1 / math.sqrt(2))
    assert summary["id_best_cos_identity"] == pytest.approx(1 / math.sqrt(2))
    assert [d["best_projector_feature"] for d in per_component[:2]] == [0, 1]


def test_bits_params_and_loss_recovered_formulas():
    assert apd_bits(0.211, 5) == pytest.approx(0.211 * math.log2(5))
    assert apd_bits(1.0, 1) == 0
    dec = _ground_truth_decomposition(torch.randn(2, 5))
    assert apd_n_params(dec) == dec.A["enc"].numel() + dec.B["enc"].numel() == 5 * 2 * 7
    clean, ablated = torch.zeros(4, 3), torch.ones(4, 3)
    lr = apd_loss_recovered(0.5 * torch.ones(4, 3), clean, ablated)
    assert lr.score == pytest.approx(0.75) and lr.mse_spliced == pytest.approx(0.25) and lr.mse_ablated == 1
    with pytest.raises(ValueError, match="undefined"):
        apd_loss_recovered(clean, clean, clean)


def test_summarise_means_and_stds_over_seeds():
    rows = [{"method": "a", "width": 5, "sparsity": 1.0, "seed": s, "sparsity_knob": "k", "x": v, "y": float("nan")}
            for s, v in enumerate([1.0, 3.0])]  # fmt: skip
    (agg,) = summarise(rows)
    assert agg["n"] == 2 and agg["x"] == 2.0 and agg["x_std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(agg["y"]) and agg["sparsity_knob"] == "k" and "seed" not in agg


# ------------------------------------------------------------------------------------ config


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


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_compare_preset_composes_and_names_a_decompose_preset_of_its_target(preset):
    app = OmegaConf.to_object(_compose("compare", [f"experiment={preset}"]))
    assert isinstance(app, compare_schema.CompareApp) and len(app.seeds) >= 5
    assert all(isinstance(g, SAEGrid) for g in app.saes.values()) and app.saes
    decompose = OmegaConf.to_object(_compose("decompose", [f"experiment={app.apd_experiment}"]))
    assert preset == f"compare_{decompose.target.name}"
    assert app.sae_train.steps > 0


def test_compare_typos_fail_at_compose():
    with pytest.raises(Exception, match="widthz"):
        OmegaConf.to_object(_compose("compare", ["saes.topk.widthz=[3]"]))
    with pytest.raises(Exception, match="sparsity_knob"):
        OmegaConf.to_object(_compose("compare", ["saes.topk.sparsity_knob=l1_coeff"]))


# ------------------------------------------------------------------------------------ end to end


def test_identity_comparison_writes_the_transcoder_sweep_and_apd_identity_figures(tmp_path):
    from experiments.compare import markdown
    from experiments.compare_figures import save_figures

    method = OmegaConf.to_object(_compose("decompose", ["experiment=tms_5_2_id"])).method
    run = DecomposeRun(target=TMSTargetConfig(name="tms_5_2_id", identity=True), method=method, steps=30, n_eval=200)
    cfg = compare_schema.CompareApp(
        apd_experiment="tms_5_2_id", seeds=[0], n_eval=500,
        sae_train=SAETrainConfig(steps=30, batch_size=128),
        saes={"transcoder": SAEGrid(architecture="topk", transcoder=True, widths=[2, 5], sparsity_values=[1])},
    )  # fmt: skip
    comparison = run_comparison(cfg, run, tmp_path, log=lambda s: None)
    assert [r.row["method"] for r in comparison.results] == ["apd", "transcoder", "transcoder"]
    figures = save_figures(comparison, cfg, tmp_path / "figures")
    assert {p.name for p in figures} == {"pareto_l0.png", "directions.png", "transcoder_sweep.png", "apd_identity.png"}
    md = markdown(cfg, run, comparison, 1.0, figures)
    assert "transcoder width sweep" in md and "components carrying I" in md and "| transcoder | 5 |" in md


def test_reduced_tms_5_2_comparison_end_to_end(tmp_path):
    """`python -m experiments.compare experiment=compare_tms_5_2`, shrunk: 2 seeds, 1 width, few steps."""
    out = tmp_path / "run"
    shrink = ["seeds=[0,1]", "apd.steps=150", "apd.topks=[0.211]", "sae_train.steps=150", "n_eval=2000"]
    for name, value in [("relu_l1", 0.3), ("topk", 1), ("batchtopk", 0.25), ("jumprelu", 0.1)]:
        shrink += [f"saes.{name}.widths=[5]", f"saes.{name}.sparsity_values=[{value}]"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare", "experiment=compare_tms_5_2", *shrink, f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    required = ["method", "seed", "width", "l0", "mmcs", "mmcs_learned", "matched_mean_cos", "n_recovered_0.9",
                "n_recovered_0.99", "shrinkage", "fvu", "loss_recovered", "n_dead", "n_params", "bits_per_datapoint",
                "wall_seconds", "sparsity_knob", "sparsity"]  # fmt: skip
    assert set(required) <= set(rows[0])
    assert sorted({r["method"] for r in rows}) == ["apd", "batchtopk", "jumprelu", "relu_l1", "topk"]
    assert len(rows) == 5 * 2
    for r in rows:
        v = {k: float(r[k]) for k in required if k not in ("method", "sparsity_knob")}
        assert 0 <= v["mmcs"] <= 1 + 1e-6 and -1 <= v["matched_mean_cos"] <= 1 + 1e-6, r
        assert v["l0"] >= 0 and v["fvu"] >= 0 and v["n_params"] > 0 and v["bits_per_datapoint"] >= 0, r
        assert 0 <= v["n_recovered_0.99"] <= v["n_recovered_0.9"] <= 5 and v["n_dead"] >= 0, r
        assert v["loss_recovered"] <= 1 + 1e-6 and v["shrinkage"] >= 0 and v["wall_seconds"] > 0, r
    apd = [r for r in rows if r["method"] == "apd"]
    assert {r["sparsity_knob"] for r in apd} == {"topk"} and float(apd[0]["l0"]) == pytest.approx(0.211, abs=1e-3)
    md = (out / "comparison.md").read_text()
    assert "mean ± std" in md and "Legend" in md and "| apd | 10 | topk=0.211 | 2 |" in md  # width = the preset's C
    for name in ["pareto_l0.png", "directions.png"]:
        assert (out / "figures" / name).stat().st_size > 10_000
