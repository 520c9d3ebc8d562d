"""apd.compare.resid and `python -m experiments.compare experiment=compare_resid_mlp_1`: every
residual-MLP comparison metric on hand-built cases with known answers, reuse of finished APD runs,
and a reduced comparison end to end."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from apd.baselines import SAETrainConfig, StandardSAE, StandardSAEConfig
from apd.compare import (
    RESID_COLUMNS,
    APDGrid,
    SAEGrid,
    component_outputs,
    evaluate_decomposition_resid,
    evaluate_sae_resid,
    latent_contributions,
    read_cosines,
    resid_activations,
    run_comparison,
    run_resid_comparison,
    unit_shrinkage,
)
from apd import APDConfig
from apd.decomposition import Decomposition
from apd.experiment import DecomposeRun
from apd.targets import ResidMLPTargetConfig
from apd.toy_models.resid_mlp import ResidMLP, ResidMLPConfig, resid_mlp_batch
from experiments import compare_schema
from tests.compare.presets import ROOT, run_compare

IN, OUT = "layers.0.mlp_in", "layers.0.mlp_out"
N, D = 4, 6  # features (= neurons) and residual width of the hand-built target
CALLERS = {"method", "architecture", "seed", "width", "sparsity_knob", "sparsity", "wall_seconds"}
METRICS = set(RESID_COLUMNS) - CALLERS  # what evaluate_*_resid fill in; the method fields are the caller's


def _perfect_target() -> ResidMLP:
    """Orthonormal W_E and one neuron per feature (W_in = W_Eᵀ, W_out = W_E): y = x + ReLU(x) exactly,
    and feature i's ground truths are simple: t_i = W_E[:, i], a_i = e_i, NC(i) = e_i."""
    model = ResidMLP(ResidMLPConfig(n_features=N, d_embed=D, d_mlp=N))
    W_E = torch.eye(D)[:, :N]
    with torch.no_grad():
        model.W_E.copy_(W_E)
        model.layers[0].mlp_in.weight.copy_(W_E.T)
        model.layers[0].mlp_out.weight.copy_(W_E)
    return model


def _data(target: ResidMLP, n: int = 4000, p: float = 0.3):
    return resid_activations(target, resid_mlp_batch(N, n, p, torch.Generator().manual_seed(0)))


def _sae(W_enc: torch.Tensor, W_dec: torch.Tensor, transcoder: bool) -> StandardSAE:
    d_in, d_sae = W_enc.shape
    extra = {"d_out": W_dec.shape[1], "apply_b_dec_to_input": False} if transcoder else {}
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, **extra))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------------------------ transcoders / SAEs


def test_a_transcoder_built_from_the_targets_own_weights_is_perfect_and_dedicates_a_latent_to_every_feature():
    target = _perfect_target()
    data = _data(target)
    W_in, W_out = target.layers[0].mlp_in.weight.detach(), target.layers[0].mlp_out.weight.detach()
    row = evaluate_sae_resid(_sae(W_in.T, W_out.T, transcoder=True), target, data, transcoder=True).row
    assert set(row) == METRICS
    assert row["loss_recovered"] == pytest.approx(1) and row["fvu"] == pytest.approx(0, abs=1e-12)
    assert row["mse_vs_target"] == pytest.approx(0, abs=1e-12) and row["mse_vs_labels"] == pytest.approx(0, abs=1e-12)
    assert row["n_features_dedicated"] == N and row["n_mono"] == N and row["n_duo"] == row["n_poly"] == 0
    assert row["mmcs"] == pytest.approx(1) and row["matched_mean_cos"] == pytest.approx(1) and row["all_recovered"] == 1
    assert row["mmcs_enc"] == pytest.approx(1) and row["matched_mean_cos_enc"] == pytest.approx(1)
    assert row["shrinkage"] == pytest.approx(1) and row["mmcs_learned"] == pytest.approx(1)
    assert row["latents_per_feature"] == 1 and row["n_duplicate_pairs"] == 0 and row["n_dead"] == 0
    assert row["n_params"] == D * N * 2 + N + D
    assert row["bits_per_datapoint"] == pytest.approx(row["l0"] * (math.log2(N) + 8))
    assert all(math.isnan(row[c]) for c in RESID_COLUMNS if c.startswith("id_"))


def test_half_a_decoder_shrinks_by_half_and_recovers_three_quarters_of_the_loss():
    target = _perfect_target()
    W_E = target.W_E.detach()
    row = evaluate_sae_resid(_sae(W_E, 0.5 * W_E.T, transcoder=True), target, _data(target), transcoder=True).row
    assert row["shrinkage"] == pytest.approx(0.5) and row["mmcs"] == pytest.approx(1)
    # spliced output = W_U r + ½ W_U t: half the MLP's contribution is missing, MSE ¼ of the ablated one
    assert row["loss_recovered"] == pytest.approx(0.75)
    zero = evaluate_sae_resid(_sae(W_E, 0 * W_E.T, transcoder=True), target, _data(target), transcoder=True).row
    assert zero["loss_recovered"] == pytest.approx(0, abs=1e-12) and zero["n_features_dedicated"] == 0


def test_fvu_read_ignores_what_a_reconstruction_writes_where_the_unembedding_does_not_look():
    target = _perfect_target()
    data = _data(target)
    W_E = target.W_E.detach()
    hidden = torch.zeros(D, N)
    hidden[N] = 1.0  # every latent also writes e_N, orthogonal to every W_E[:, i]: W_U never reads it
    row = evaluate_sae_resid(_sae(W_E, (W_E + hidden).T, transcoder=True), target, data, transcoder=True).row
    assert row["fvu"] > 0.5 and row["fvu_read"] == pytest.approx(0, abs=1e-12) and row["loss_recovered"] == pytest.approx(1)
    # half the decoder: W_U · (MLP output) is y = ReLU(x), the spliced one y / 2, so FVU = Σ‖y/2‖² / Σ‖y − ȳ‖²
    half = evaluate_sae_resid(_sae(W_E, 0.5 * W_E.T, transcoder=True), target, data, transcoder=True).row
    y = data.x.clamp_min(0).double()
    assert half["fvu_read"] == pytest.approx(((y / 2).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(), rel=1e-6)
    assert half["fvu_read"] == pytest.approx(half["fvu"], rel=1e-6)  # W_E orthonormal: the MLP writes only where W_U reads


def test_a_latent_serving_two_features_is_a_duo_not_dedicated():
    target = _perfect_target()
    W_E = target.W_E.detach()
    merged = W_E[:, 0] + W_E[:, 1]  # latent 0 reads and writes features 0 and 1 together
    W_enc = torch.stack([merged, W_E[:, 2], W_E[:, 3]], dim=1)  # (D, 3)
    row = evaluate_sae_resid(_sae(W_enc, W_enc.T.clone(), transcoder=True), target, _data(target), transcoder=True).row
    assert row["n_duo"] == 1 and row["n_mono"] == 2 and row["n_features_dedicated"] == 2
    assert row["mmcs"] == pytest.approx((2 / math.sqrt(2) + 2) / 4, abs=1e-6)  # the merged row is 45° off each
    assert row["matched_mean_cos"] == pytest.approx((1 / math.sqrt(2) + 0 + 2) / 4, abs=1e-6)  # one feature unmatched
    assert 0 < row["loss_recovered"] < 1


def test_latent_contributions_read_off_each_latents_write_at_each_output():
    target = _perfect_target()
    W_E = target.W_E.detach()
    sae = _sae(W_E, 2.0 * W_E.T, transcoder=True)
    torch.testing.assert_close(latent_contributions(sae, W_E.T, W_E), 2.0 * torch.eye(N))
    # a neuron SAE writes through W_out: the identity SAE on the neurons is the MLP itself
    ident = _sae(torch.eye(N), torch.eye(N), transcoder=False)
    torch.testing.assert_close(latent_contributions(ident, torch.eye(N), W_E, target.layers[0].mlp_out.weight), torch.eye(N))


def test_unit_shrinkage_reads_each_features_unit_at_its_output():
    contributions = torch.tensor([[0.5, 9.0, 0.0], [7.0, 3.0, 0.0]])  # (units, features)
    # feature 0 → unit 0 (0.5 of gain 1), feature 1 → unit 1 (3 of gain 2), feature 2 has no unit (0)
    assert unit_shrinkage(contributions, torch.tensor([0, 1, -1]), torch.tensor([1.0, 2.0, 1.0])) == pytest.approx((0.5 + 1.5) / 3)


def test_the_identity_sae_on_the_neurons_is_perfect():
    target = _perfect_target()
    row = evaluate_sae_resid(_sae(torch.eye(N), torch.eye(N), transcoder=False), target, _data(target), transcoder=False).row
    assert row["loss_recovered"] == pytest.approx(1) and row["fvu"] == pytest.approx(0, abs=1e-12)
    assert row["mmcs"] == pytest.approx(1) and row["n_features_dedicated"] == N and row["shrinkage"] == pytest.approx(1)


# ------------------------------------------------------------------------------------ APD


def _neuron_decomposition(target: ResidMLP, merge: bool = False, hidden_write: float = 0.0) -> Decomposition:
    """One component per neuron (the ground truth of the perfect target), all-on masks; with
    ``merge``, neurons 0 and 1 share component 0 (its two ranks) and one component fewer; with
    ``hidden_write``, every component's W_out part also writes that much along e_N, a residual
    direction W_U does not read."""
    W_in, W_out = target.layers[0].mlp_in.weight.detach(), target.layers[0].mlp_out.weight.detach()
    groups = [[0, 1]] + [[k] for k in range(2, N)] if merge else [[k] for k in range(N)]
    C, m = len(groups), 2 if merge else 1
    A_in, B_in = torch.zeros(C, m, D), torch.zeros(C, N, m)
    A_out, B_out = torch.zeros(C, m, N), torch.zeros(C, D, m)
    for c, neurons in enumerate(groups):
        for r, k in enumerate(neurons):
            A_in[c, r], B_in[c, k, r] = W_in[k], 1.0  # P_c^in = Σ e_k W_in[k]
            A_out[c, r, k], B_out[c, :, r] = 1.0, W_out[:, k]  # P_c^out = Σ W_out[:, k] e_kᵀ
            B_out[c, N, r] += hidden_write
    return Decomposition.from_factors(APDConfig(C=C, rank=m, topk=float(C), batch_topk=True), {IN: A_in, OUT: A_out},
                         {IN: B_in, OUT: B_out}, {IN: W_in.clone(), OUT: W_out.clone()})  # fmt: skip


def test_apd_components_equal_to_the_neurons_score_perfectly():
    target = _perfect_target()
    row = evaluate_decomposition_resid(_neuron_decomposition(target), target, _data(target)).row
    assert set(row) == METRICS
    assert row["l0"] == N and row["n_dead"] == 0  # all-on masks (topk = C)
    assert row["loss_recovered"] == pytest.approx(1) and row["fvu"] == pytest.approx(0, abs=1e-10)
    assert row["fvu_read"] == pytest.approx(0, abs=1e-10)
    assert row["mse_vs_target"] == pytest.approx(0, abs=1e-10) and row["mse_vs_labels"] == pytest.approx(0, abs=1e-10)
    assert row["mmcs"] == pytest.approx(1) and row["matched_mean_cos"] == pytest.approx(1) and row["all_recovered"] == 1
    assert row["mmcs_learned"] == pytest.approx(1) and row["shrinkage"] == pytest.approx(1)
    assert row["mmcs_enc"] == pytest.approx(1) and row["matched_mean_cos_enc"] == pytest.approx(1)
    assert row["n_features_dedicated"] == N and row["n_mono"] == N and row["n_duo"] == 0
    assert row["latents_per_feature"] == 1 and row["n_duplicate_pairs"] == 0
    assert row["n_params"] == N * 1 * (D + N) * 2 and row["bits_per_datapoint"] == pytest.approx(N * math.log2(N))


def test_an_mlp_output_wrong_only_where_the_unembedding_does_not_look_has_fvu_but_no_fvu_read():
    target = _perfect_target()
    row = evaluate_decomposition_resid(_neuron_decomposition(target, hidden_write=1.0), target, _data(target)).row
    assert row["fvu"] > 0.5 and row["fvu_read"] == pytest.approx(0, abs=1e-10)
    assert row["loss_recovered"] == pytest.approx(1) and row["mse_vs_target"] == pytest.approx(0, abs=1e-10)


def test_an_apd_component_holding_two_neurons_fools_mmcs_but_not_dedicated_or_matched():
    target = _perfect_target()
    row = evaluate_decomposition_resid(_neuron_decomposition(target, merge=True), target, _data(target)).row
    assert row["loss_recovered"] == pytest.approx(1)  # all-on masks: still the exact MLP
    assert row["mmcs"] == pytest.approx(1) and row["n_recovered_0.99"] == N  # NC_0(0) = NC(0), NC_0(1) = NC(1)
    assert row["n_duo"] == 1 and row["n_features_dedicated"] == N - 2
    assert row["matched_mean_cos"] == pytest.approx((N - 1) / N) and row["all_recovered"] == 0
    assert row["mmcs_learned"] == pytest.approx((1 / math.sqrt(2) + N - 2) / (N - 1), abs=1e-6)
    assert row["mmcs_enc"] == pytest.approx((2 / math.sqrt(2) + N - 2) / N, abs=1e-6)  # ‖P_0^in ŵ_0‖ / ‖P_0^in‖_F


def test_component_outputs_and_read_cosines_by_hand():
    P_in = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]]])  # (C=2, d_mlp=2, d_embed=2)
    P_out = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])  # (C, d_embed, d_mlp)
    W_E = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # feature 0 = +e_0, feature 1 = -e_0
    out = component_outputs(P_in, P_out, W_E)  # (C, d_embed, n)
    torch.testing.assert_close(out[0], torch.tensor([[2.0, 0.0], [0.0, 0.0]]))  # ReLU kills feature 1
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(read_cosines(P_in, W_E), torch.tensor([[1.0, 0.6], [1.0, 0.6]]))


# ------------------------------------------------------------------------------------ the comparison


def test_run_comparison_points_residual_mlps_to_the_resid_comparison(tmp_path):
    with pytest.raises(TypeError, match="run_resid_comparison"):
        run_comparison(compare_schema.CompareApp(apd_experiment="resid_mlp_1"), DecomposeRun(target=ResidMLPTargetConfig(name="resid_mlp_1")), tmp_path)


def _apd_run() -> DecomposeRun:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        method = OmegaConf.to_object(compose(config_name="decompose", overrides=["experiment=resid_mlp_1"])).method
    return DecomposeRun(target=ResidMLPTargetConfig(name="resid_mlp_1"), method=method, steps=8, batch_size=64, n_eval=200)


def test_finished_apd_runs_and_saved_saes_are_scored_as_if_trained_again(tmp_path):
    run = _apd_run()
    cfg = compare_schema.CompareApp(apd_experiment="resid_mlp_1", seeds=[0], n_eval=300,
                                    sae_train=SAETrainConfig(steps=20, batch_size=64),
                                    saes={"sae": SAEGrid(architecture="topk", widths=[10], sparsity_values=[1])})  # fmt: skip
    first = run_resid_comparison(cfg, run, tmp_path / "inside", log=lambda s: None)
    run_dir = tmp_path / "inside" / "apd" / f"C{run.method.C}_topk{run.method.topk:g}" / "seed0"
    saved = tmp_path / "inside" / "saes" / "sae_w10_k1_seed0" / "training.json"
    stamp = saved.stat().st_mtime_ns
    cfg.apd = APDGrid(runs=[str(run_dir)])
    again = run_resid_comparison(cfg, run, tmp_path / "inside", log=lambda s: None)
    assert saved.stat().st_mtime_ns == stamp  # the SAE was reloaded, not retrained
    apd = again.rows[0]
    assert apd["seed"] == 0 and apd["width"] == run.method.C and apd["sparsity"] == run.method.topk
    for row, new in zip(first.rows, again.rows, strict=True):
        for col in RESID_COLUMNS:
            if col not in ("method", "architecture", "sparsity_knob", "wall_seconds") and not math.isnan(row[col]):
                assert new[col] == pytest.approx(row[col], rel=1e-5, abs=1e-7), (row["method"], col)
    assert any(str(run_dir) in note for note in again.notes) and "monosemantic" in again.notes[0]
    cfg.sae_train = SAETrainConfig(steps=21, batch_size=64)  # another training config: trained anew
    run_resid_comparison(cfg, run, tmp_path / "inside", log=lambda s: None)
    assert saved.stat().st_mtime_ns != stamp


def test_reduced_resid_mlp_comparison_end_to_end(tmp_path):
    """`python -m experiments.compare experiment=compare_resid_mlp_1`, shrunk: 1 seed, APD trained
    inside for a few steps, two transcoder widths, one neuron SAE."""
    out = tmp_path / "run"
    shrink = ["seeds=[0]", "apd.steps=10", 'apd_overrides=["batch_size=64","n_eval=200"]', "n_eval=1000",
              "spd.steps=10", 'spd_overrides=["batch_size=64","n_eval=200","method.compile_ci=off"]',
              "sae_train.steps=40", "sae_train.batch_size=256",
              "saes.transcoder_batchtopk.widths=[100,130]", "saes.transcoder_batchtopk.sparsity_values=[1.28]",
              "saes.sae_batchtopk.widths=[100]", "saes.sae_batchtopk.sparsity_values=[1.28]"]  # fmt: skip
    rows, columns = run_compare("compare_resid_mlp_1", shrink, out)
    assert columns == RESID_COLUMNS
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["apd", "spd"] and len(rows) == 1 + 1 + 2 + 1
    assert {"transcoder_batchtopk", "sae_batchtopk"} <= set(methods)
    for r in rows:
        v = {k: float(r[k]) for k in RESID_COLUMNS if k not in ("method", "architecture", "sparsity_knob") and r[k] != ""}
        assert 0 <= v["mmcs"] <= 1 + 1e-6 and -1 <= v["matched_mean_cos"] <= 1 + 1e-6, r
        assert v["l0"] >= 0 and v["fvu"] >= 0 and v["n_params"] > 0 and v["bits_per_datapoint"] >= 0, r
        assert 0 <= v["n_recovered_0.99"] <= v["n_recovered_0.9"] <= 100 and v["n_dead"] >= 0, r
        assert v["loss_recovered"] <= 1 + 1e-6 and v["shrinkage"] >= 0 and v["wall_seconds"] > 0, r
        assert 0 <= v["n_features_dedicated"] <= 100 and v["mse_vs_target"] >= 0 and v["mse_vs_labels"] > 0, r
        assert v["fvu_read"] >= 0, r
        assert v["n_mono"] + v["n_duo"] + v["n_poly"] <= v["width"], r  # SPD: its W_in subcomponents
        assert not any(k.startswith("id_") for k in v), r  # no identity: empty cells
    apd, spd = rows[0], rows[1]
    assert apd["sparsity_knob"] == "topk" and float(apd["l0"]) == pytest.approx(1.28, abs=1e-3) and apd["width"] == "130"
    assert spd["sparsity_knob"] == "importance_minimality_coeff" and spd["width"] == "120"  # the spd_resid_mlp_1 preset's C
    md = (out / "comparison.md").read_text()
    assert "Residual-MLP quantities" in md and "monosemantic baseline" in md and "| apd | 130 | topk=1.28 | 1 |" in md
    for name in ["pareto_l0.png", "transcoder_sweep.png"]:
        assert (out / "figures" / name).stat().st_size > 10_000
