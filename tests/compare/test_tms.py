"""apd.compare.tms and `python -m experiments.compare` on TMS: every comparison metric on hand-built
cases where the answer is known, and reduced TMS 5-2 (+ID) comparisons end to end."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from apd import APDConfig
from apd.baselines import SAETrainConfig, StandardSAE, StandardSAEConfig
from apd.compare import (
    COLUMNS,
    SAEGrid,
    component_bits,
    decomposition_n_params,
    evaluate_decomposition,
    evaluate_sae_row,
    identity_parts,
    output_loss_recovered,
    run_comparison,
    tms_activations,
)
from apd.decomposition import Decomposition
from apd.experiment import DecomposeRun
from apd.methods.apd import APD
from apd.metrics.tms import tms_recovery
from apd.targets import TMSTargetConfig, get_target
from apd.toy_models.tms import TMS, TMSConfig, tms_batch
from experiments import compare_schema
from tests.compare.presets import compose, run_compare


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


# ---------------------------------------------------------------------------- SAE rows


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


# ------------------------------------------------------------------ decomposition rows


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
    t = evaluate_decomposition(_ground_truth_decomposition(W), target, data)
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
    row = evaluate_decomposition(dec, target, _data(target, p=0.05)).row
    assert row["mmcs"] == pytest.approx(1) and row["n_recovered_0.99"] == 5
    assert row["matched_mean_cos"] == pytest.approx(0.8) and row["n_recovered_matched_0.99"] == 4
    assert row["all_recovered"] == 0
    assert row["mmcs_learned"] < 0.8  # the merged component is far from either single mechanism


def test_apd_on_id_one_component_holding_the_identity_is_the_ground_truth():
    target, _ = get_target(TMSTargetConfig(name="tms_5_2_id", identity=True))
    W = target.W.detach()
    t = evaluate_decomposition(_ground_truth_decomposition(W, hidden=torch.eye(2)), target, _data(target, p=0.05))
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
    assert component_bits(0.211, 5) == pytest.approx(0.211 * math.log2(5))
    assert component_bits(1.0, 1) == 0
    dec = _ground_truth_decomposition(torch.randn(2, 5))
    assert decomposition_n_params(dec) == dec.A["enc"].numel() + dec.B["enc"].numel() == 5 * 2 * 7
    clean, ablated = torch.zeros(4, 3), torch.ones(4, 3)
    lr = output_loss_recovered(0.5 * torch.ones(4, 3), clean, ablated)
    assert lr.score == pytest.approx(0.75) and lr.mse_spliced == pytest.approx(0.25) and lr.mse_ablated == 1
    with pytest.raises(ValueError, match="undefined"):
        output_loss_recovered(clean, clean, clean)


def test_per_module_evaluation_masks_are_scored_by_the_same_code(monkeypatch):
    """SPD evaluates with one mask per module; the row takes them as they come: L0 and bits add up
    over the modules (here the same top-k mask for W and for its tied use Wᵀ: twice APD's)."""
    target, _ = get_target(TMSTargetConfig(name="tms_5_2"))
    data = _data(target, p=0.05)
    W = target.W.detach()
    shared = evaluate_decomposition(_ground_truth_decomposition(W), target, data).row
    eval_masks = APD.eval_masks
    monkeypatch.setattr(APD, "eval_masks", lambda self, cm, x: {n: eval_masks(self, cm, x) for n in ("enc", "dec")})
    per_module = evaluate_decomposition(_ground_truth_decomposition(W), target, data).row
    assert per_module["l0"] == 2 * shared["l0"] and per_module["bits_per_datapoint"] == pytest.approx(2 * shared["bits_per_datapoint"])
    same = [c for c in shared if c not in ("l0", "bits_per_datapoint") and not math.isnan(shared[c])]
    assert {c: per_module[c] for c in same} == {c: shared[c] for c in same}


def test_a_feature_of_tiny_norm_is_not_required_by_all_recovered_in_any_row():
    """TMS drops a feature it cannot fit to a tiny column of W. ``all_recovered`` asks for every
    *represented* feature, as :func:`apd.metrics.tms.tms_recovery` does; the comparison used to ask for
    every feature, so these rows said 0 where the run's own metrics said 1."""
    W = torch.tensor([[1.0, 0.0, 1e-3], [0.0, 1.0, 0.0]])  # feature 2: 1/1000 of the others' norm, along feature 0
    target = _tms(W)
    data = _data(target)
    # two latents / components for three features: feature 2 cannot get one of its own
    sae = evaluate_sae_row(_sae(torch.eye(2), torch.eye(2)), target, data).row
    A, B = torch.zeros(2, 2, 3), torch.zeros(2, 2, 2)
    A[0, 0, 0], A[0, 0, 2], B[0, 0, 0] = 1.0, 1e-3, 1.0  # component 0 = W's columns 0 and 2
    A[1, 0, 1], B[1, 1, 0] = 1.0, 1.0  # component 1 = W's column 1
    dec = Decomposition.from_factors(APDConfig(C=2, topk=2.0, batch_topk=True), {"enc": A}, {"enc": B}, {"enc": W.clone()},
                                     tied={"dec": "enc"})  # fmt: skip
    apd = evaluate_decomposition(dec, target, data).row
    run_metrics = tms_recovery(W, dec.component_weights()["enc"])
    assert run_metrics["n_represented"] == 2 and run_metrics["all_recovered"] == 1
    assert apd["all_recovered"] == sae["all_recovered"] == run_metrics["all_recovered"] == 1
    assert sae["n_recovered_0.99"] == 3  # feature 2's direction is there, shared with feature 0

# -------------------------------------------------------------------------- end to end


def test_identity_comparison_writes_the_transcoder_sweep_and_apd_identity_figures(tmp_path):
    from experiments.compare import markdown
    from experiments.compare_figures import save_figures

    method = OmegaConf.to_object(compose("decompose", ["experiment=tms_5_2_id"])).method
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
    shrink = ["seeds=[0,1]", "apd.steps=150", "apd.topks=[0.211]", "spd.steps=60", "sae_train.steps=150", "n_eval=2000"]
    for name, value in [("relu_l1", 0.3), ("topk", 1), ("batchtopk", 0.25), ("jumprelu", 0.1)]:
        shrink += [f"saes.{name}.widths=[5]", f"saes.{name}.sparsity_values=[{value}]"]
    rows, columns = run_compare("compare_tms_5_2", shrink, out)
    required = ["method", "seed", "width", "l0", "mmcs", "mmcs_learned", "matched_mean_cos", "n_recovered_0.9",
                "n_recovered_0.99", "shrinkage", "fvu", "loss_recovered", "n_dead", "n_params", "bits_per_datapoint",
                "wall_seconds", "sparsity_knob", "sparsity"]  # fmt: skip
    assert set(required) <= set(rows[0])
    assert sorted({r["method"] for r in rows}) == ["apd", "batchtopk", "jumprelu", "relu_l1", "spd", "topk"]
    assert len(rows) == 6 * 2
    for r in rows:
        v = {k: float(r[k]) for k in required if k not in ("method", "sparsity_knob")}
        assert 0 <= v["mmcs"] <= 1 + 1e-6 and -1 <= v["matched_mean_cos"] <= 1 + 1e-6, r
        assert v["l0"] >= 0 and v["fvu"] >= 0 and v["n_params"] > 0 and v["bits_per_datapoint"] >= 0, r
        assert 0 <= v["n_recovered_0.99"] <= v["n_recovered_0.9"] <= 5 and v["n_dead"] >= 0, r
        assert v["loss_recovered"] <= 1 + 1e-6 and v["shrinkage"] >= 0 and v["wall_seconds"] > 0, r
    apd = [r for r in rows if r["method"] == "apd"]
    assert {r["sparsity_knob"] for r in apd} == {"topk"} and float(apd[0]["l0"]) == pytest.approx(0.211, abs=1e-3)
    spd = [r for r in rows if r["method"] == "spd"]
    assert {r["sparsity_knob"] for r in spd} == {"importance_minimality_coeff"} and {r["width"] for r in spd} == {"20"}
    md = (out / "comparison.md").read_text()
    assert "mean ± std" in md and "Legend" in md and "| apd | 10 | topk=0.211 | 2 |" in md  # width = the preset's C
    for name in ["pareto_l0.png", "directions.png"]:
        assert (out / "figures" / name).stat().st_size > 10_000


def test_a_finished_run_of_another_target_is_refused_naming_the_key_and_the_fix(tmp_path):
    """`compare ... 'spd.runs=[DIR]'` where DIR decomposed TMS 5-2 but the comparison is on TMS 40-10:
    a ConfigError naming spd.runs, what differs and the fix (the CLI: one "error:" line, exit 2) before
    anything is scored; the same run passes the check against its own target."""
    import subprocess
    import sys
    from pathlib import Path

    from apd import ConfigError, SPDConfig
    from apd.compare.runs import refuse_other_target
    from apd.experiment import run_decompose

    run = DecomposeRun(target=TMSTargetConfig(name="tms_5_2"), method=SPDConfig(C=5, steps=2), batch_size=32, n_eval=100)
    run_decompose(run, tmp_path / "spd52", progress=False)
    refuse_other_target(tmp_path / "spd52", run, "spd.runs")  # its own target: no error
    other = DecomposeRun(target=TMSTargetConfig(name="tms_40_10", n_features=40, n_hidden=10), method=APDConfig())
    with pytest.raises(ConfigError, match=r"spd\.runs: .*spd52 decomposed another target .*n_features \(run 5, comparison 40\)"):
        refuse_other_target(tmp_path / "spd52", other, "spd.runs")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", "experiment=compare_tms_40_10",
                           f"spd.runs=[{tmp_path / 'spd52'}]", "apd.enabled=false", "~saes", "browser=false",
                           f"hydra.run.dir={tmp_path / 'cmp'}"], cwd=root, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: spd.runs: ") and "Pass runs of tms_40_10" in proc.stderr and "Traceback" not in proc.stderr
