"""apd.compare.lm and `python -m experiments.compare experiment=compare_lm_1l`: models built from the
MLP's own weights score a perfect splice, a zero reconstruction none; seed consistency, the
SAE-component relations, densities and proxies on hand-made cases; and a shrunk comparison end to end."""

import csv
import itertools
import json
import math

import pytest
import torch

from apd import APDConfig
from apd.baselines import StandardSAE, StandardSAEConfig
from apd.compare import (
    LM_COLUMNS,
    LMTrained,
    UnitSet,
    density_columns,
    evaluate_decomposition_lm,
    evaluate_neurons,
    evaluate_sae_lm,
    lm_activations,
    matched_correlation,
    matched_cosine,
    relation_summary,
    sae_component_relations,
    seed_consistency,
    top_positions,
    unit_proxies,
)
from apd.decomposition import Decomposition
from apd.targets import LMTargetConfig, get_target
from tests.compare.presets import run_compare

CALLERS = {"method", "architecture", "seed", "width", "sparsity_knob", "sparsity", "wall_seconds"}
METRICS = set(LM_COLUMNS) - CALLERS


@pytest.fixture(scope="module")
def lm():
    """The shipped target and 6 held-out windows through it."""
    cfg = LMTargetConfig(name="lm_1l")
    model, _ = get_target(cfg)
    model.eval()
    return model, lm_activations(model, cfg, n_windows=6, seed=0)


def _sae(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, transcoder: bool) -> StandardSAE:
    d_in, d_sae = W_enc.shape
    extra = {"d_out": W_dec.shape[1], "apply_b_dec_to_input": False} if transcoder else {}
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, **extra))
    with torch.no_grad():
        for p, v in ((sae.W_enc, W_enc), (sae.W_dec, W_dec), (sae.b_enc, b_enc), (sae.b_dec, b_dec)):
            p.copy_(v)
    return sae


def _mlp_transcoder(model) -> StandardSAE:
    """A ReLU transcoder holding the MLP itself: encoder = mlp.up, decoder = mlp.down."""
    up, down = model.mlp.up, model.mlp.down
    return _sae(up.weight.detach().T, down.weight.detach().T, up.bias.detach(), down.bias.detach(), transcoder=True)


# ------------------------------------------------------------------------------------ splices


def test_the_neurons_and_models_holding_the_mlp_recover_the_whole_loss(lm):
    model, data = lm
    assert data.loss_ablated > data.loss_clean + 1.0  # the MLP matters: > 1 nat per token
    neurons = evaluate_neurons(model, data).row
    assert set(neurons) == set(LM_COLUMNS)
    identity = evaluate_sae_lm(_sae(torch.eye(512), torch.eye(512), torch.zeros(512), torch.zeros(512), transcoder=False),
                               model, data, transcoder=False).row  # fmt: skip
    transcoder = evaluate_sae_lm(_mlp_transcoder(model), model, data, transcoder=True).row
    assert set(identity) == set(transcoder) == METRICS
    for row in (neurons, identity, transcoder):
        assert row["loss_recovered"] == pytest.approx(1, abs=1e-5) and row["kl"] == pytest.approx(0, abs=1e-6)
        assert row["lm_loss"] == pytest.approx(data.loss_clean, abs=1e-5) and row["fvu_mlp_out"] == pytest.approx(0, abs=1e-8)
        assert math.isnan(row["loss_recovered_thresholded"])
    # the identity SAE and the transcoder fire exactly where the neurons do
    l0 = (data.acts > 0).float().sum(-1).mean().item()
    for row in (neurons, identity, transcoder):
        assert row["l0"] == pytest.approx(l0) and row["n_dead"] == neurons["n_dead"] and row["n_live"] == neurons["n_live"]
        assert row["bits_per_token"] == pytest.approx(l0 * (math.log2(512) + 8))
        for c in ("top_token_frac_median", "top_bigram_frac_mean", "token_entropy_median"):
            assert row[c] == pytest.approx(neurons[c], abs=1e-6)
    assert identity["n_params"] == 2 * 512 * 512 + 512 + 512 and neurons["n_params"] == 2 * 512 * 128 + 512 + 128
    assert identity["fvu"] == pytest.approx(0, abs=1e-10) and neurons["n_live"] + neurons["n_dead"] == 512


def test_a_zero_reconstruction_recovers_nothing(lm):
    model, data = lm
    zero = _sae(torch.randn(128, 16), torch.zeros(16, 128), torch.zeros(16), torch.zeros(128), transcoder=True)
    row = evaluate_sae_lm(zero, model, data, transcoder=True).row
    assert row["loss_recovered"] == pytest.approx(0, abs=1e-6) and row["lm_loss"] == pytest.approx(data.loss_ablated)
    assert row["kl"] > 0.5 and row["fvu_mlp_out"] >= 1.0


def _neuron_decomposition(model, perm: torch.Tensor | None = None, flip: bool = False) -> Decomposition:
    """APD (rank 1, all components on) with one component per neuron i: P_i^up = e_i W_up[i],
    P_i^down = W_down[:, i] e_iᵀ; ``perm`` reorders the components, ``flip`` negates both factors."""
    W_up, W_down = model.mlp.up.weight.detach(), model.mlp.down.weight.detach()
    n = W_up.shape[0]
    sign = -1.0 if flip else 1.0
    A_up, B_up = (sign * W_up)[:, None, :], (sign * torch.eye(n))[:, :, None]  # (C, 1, 128), (C, 512, 1)
    A_down, B_down = torch.eye(n)[:, None, :], W_down.T[:, :, None]  # (C, 1, 512), (C, 128, 1)
    if perm is not None:
        A_up, B_up, A_down, B_down = A_up[perm], B_up[perm], A_down[perm], B_down[perm]
    cfg = APDConfig(C=n, rank=1, topk=float(n), batch_topk=True, attribution="activation")
    return Decomposition.from_factors(cfg, {"mlp.up": A_up, "mlp.down": A_down}, {"mlp.up": B_up, "mlp.down": B_down},
                                      {"mlp.up": W_up.clone(), "mlp.down": W_down.clone()})  # fmt: skip


def test_a_decomposition_into_the_neurons_with_every_component_on_is_the_mlp(lm):
    model, data = lm
    t = evaluate_decomposition_lm(_neuron_decomposition(model), model, data)
    row = t.row
    assert set(row) == METRICS
    assert row["loss_recovered"] == pytest.approx(1, abs=1e-5) and row["kl"] == pytest.approx(0, abs=1e-6)
    assert row["fvu_mlp_out"] == pytest.approx(0, abs=1e-8) and math.isnan(row["loss_recovered_thresholded"])
    assert row["l0"] == 512 and row["bits_per_token"] == pytest.approx(512 * 9)
    assert row["n_params"] == 512 * (128 + 512) * 2 and set(t.units) == {"mlp.up", "mlp.down"}
    torch.testing.assert_close(t.units["mlp.down"].write, model.mlp.down.weight.detach().T)
    assert t.units["mlp.up"].space_out == "neurons" and t.units["mlp.down"].space_in == "neurons"


# ------------------------------------------------------------------------------------ seed consistency


def test_matched_cosine_by_hand():
    e = torch.eye(3)
    assert matched_cosine(e[:2], e[[1, 0]])["mean"] == pytest.approx(1)  # a permutation
    m = matched_cosine(e[:1], torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]]))
    assert m["mean"] == pytest.approx(1) and m["n"] == 1
    assert matched_cosine(e[:1], -e[:1])["mean"] == pytest.approx(-1)
    assert matched_cosine(e[:1], -e[:1], signed=False)["mean"] == pytest.approx(1)
    # e0·r0 = 0.6, e1·r0 = 0.8, both · r1 = 0: one of them gets r0, the best total is 0.8 (e1 → r0, e0 → r1)
    two = matched_cosine(e[:2], torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    assert two["mean"] == pytest.approx(0.4) and two["frac_above"] == 0
    assert math.isnan(matched_cosine(e[:0], e)["mean"])


def test_matched_correlation_is_the_best_one_to_one_pearson_matching_by_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(60, 4, generator=g) * (torch.rand(60, 4, generator=g) < 0.4)
    b = torch.rand(60, 5, generator=g) * (torch.rand(60, 5, generator=g) < 0.4)
    b[:, 2] = 0  # a dead unit takes no part
    pearson = torch.corrcoef(torch.cat([a, b[:, [0, 1, 3, 4]]], 1).T)[:4, 4:]
    best = max(sum(pearson[i, p[i]].item() for i in range(4)) / 4 for p in itertools.permutations(range(4)))
    m = matched_correlation(a.to_sparse(), b)
    assert m["mean"] == pytest.approx(best) and m["n"] == 4 and m["frac_above"] == 0
    assert m["mean_frequent"] == pytest.approx(best) and m["n_frequent"] == 4  # every unit fires on > 1% of the rows
    assert matched_correlation(b, a)["mean"] == pytest.approx(best)  # either side may be the larger
    # the same units, permuted and rescaled: correlation 1 for every pair
    same = matched_correlation(a, 3 * a[:, [2, 0, 3, 1]])
    assert same["mean"] == pytest.approx(1) and same["frac_above"] == 1
    # anti-correlated units: a hand-worked -1
    x = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert matched_correlation(x, 1 - x)["mean"] == pytest.approx(-1)
    rare = matched_correlation(x, 1 - x, frequent=0.6)  # both units fire on half the rows: not "frequent"
    assert math.isnan(rare["mean_frequent"]) and rare["n_frequent"] == 0 and rare["n"] == 1
    # one frequent pair (the first units, identical), one pair with a unit on 1 of 4 rows
    pair = matched_correlation(torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.0], [3.0, 0.0]]),
                               torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), frequent=0.5)  # fmt: skip
    assert pair["n"] == 2 and pair["n_frequent"] == 1 and pair["mean_frequent"] == pytest.approx(1)
    assert math.isnan(matched_correlation(torch.zeros(4, 2), x)["mean"])
    with pytest.raises(ValueError, match="same evaluation tokens"):
        matched_correlation(x, x[:3])


def _with_seed(t: LMTrained, seed: int, method: str) -> LMTrained:
    t.row |= {"method": method, "architecture": method, "seed": seed, "width": 512, "sparsity_knob": "k", "sparsity": 1.0}
    return t


def test_seed_consistency_of_a_model_with_itself_and_a_permuted_copy_is_one(lm):
    model, data = lm
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    decs = [_with_seed(evaluate_decomposition_lm(_neuron_decomposition(model, p, flip), model, data), s, "apd")
            for s, (p, flip) in enumerate([(None, False), (perm, True)])]  # fmt: skip
    tc = _mlp_transcoder(model)
    shuffled = _sae(tc.W_enc.detach()[:, perm], tc.W_dec.detach()[perm], tc.b_enc.detach()[perm], tc.b_dec.detach(), transcoder=True)
    saes = [_with_seed(evaluate_sae_lm(s, model, data, transcoder=True), i, "tc") for i, s in enumerate([tc, shuffled])]
    table = seed_consistency(decs + saes)
    assert [(r["method"], r["seed_a"], r["seed_b"]) for r in table] == [("apd", 0, 1), ("tc", 0, 1)]
    for r in table:
        assert r["cos_out"] == pytest.approx(1) and r["cos_in"] == pytest.approx(1) and r["frac_out_above"] == 1
        assert r["act_corr"] == pytest.approx(1) and r["frac_act_above"] == 1 and r["act_corr_frequent"] == pytest.approx(1)
    for t in decs + saes:
        assert t.row["seed_cos_out"] == pytest.approx(1) and t.row["seed_cos_in"] == pytest.approx(1)
        assert t.row["seed_act_corr"] == pytest.approx(1)
    # only the live units are matched: the transcoder's and the components' live sets
    assert table[1]["n_out"] == saes[0].row["n_live"] and table[0]["n_out"] == 2 * decs[0].row["n_live"]
    assert table[1]["n_act"] == saes[0].row["n_live"] and table[0]["n_act"] == decs[0].row["n_live"]  # APD: one family


# ------------------------------------------------------------------------------------ SAE vs components


def test_sae_latents_find_their_best_subcomponents_by_hand():
    """Neuron space R^3, MLP output space R^2 with W_down = [[1, 0, 0], [0, 1, 1]]."""
    W_down = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    sae = LMTrained(row={"method": "sae", "width": 3, "sparsity": 1.0, "seed": 0}, arrows=torch.zeros(0, 1),
                    arrows_live=torch.zeros(0, dtype=torch.bool),
                    units={"latents": UnitSet(space_out="neurons", space_in="neurons",
                                              write=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                                              read=torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
                                              live=torch.tensor([True, True, False]),
                                              top=torch.tensor([[0, 1, 2], [5, 6, -1], [-1, -1, -1]]), signed=True)},
                    densities={"latents": torch.tensor([0.5, 0.25, 0.0])})  # fmt: skip
    down = UnitSet(space_out="mlp_out", space_in="neurons", write=torch.tensor([[0.0, -3.0], [1.0, 0.0], [1.0, 1.0]]),
                   read=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), live=torch.tensor([True, True, False]),
                   top=torch.tensor([[5, 7, -1], [0, 1, 3], [0, 1, 2]]), signed=False)  # fmt: skip
    up = UnitSet(space_out="neurons", space_in="mlp_in", write=torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
                 read=torch.zeros(2, 2), live=torch.tensor([True, True]), top=torch.full((2, 3), -1), signed=False)  # fmt: skip
    dec = LMTrained(row={"method": "spd", "seed": 0}, arrows=torch.zeros(0, 1), arrows_live=torch.zeros(0, dtype=torch.bool),
                    units={"mlp.down": down, "mlp.up": up})  # fmt: skip
    rows = sae_component_relations(sae, dec, W_down)
    assert [r["latent"] for r in rows] == [0, 1]  # latent 2 is dead
    # latent 0 writes e0 → W_down e0 = (1, 0): down component 1 exactly (component 2, (1,1), is dead)
    assert rows[0]["out_component"] == 1 and rows[0]["out_cos"] == pytest.approx(1)
    # latent 1 writes e1 → (0, 1): down component 0 = (0, −3), |cos| 1
    assert rows[1]["out_component"] == 0 and rows[1]["out_cos"] == pytest.approx(1)
    assert rows[0]["neuron_component"] == 1 and rows[1]["neuron_cos"] == pytest.approx(1 / math.sqrt(2))
    # latent 0 reads e2 (norm 2): down component 1 reads e2; latent 1 reads e1: component 2 is dead, so e0 / e2 give 0
    assert rows[0]["in_component"] == 1 and rows[0]["in_cos"] == pytest.approx(1)
    assert rows[1]["in_cos"] == pytest.approx(0)
    # top positions: {0,1,2} vs component 1's {0,1,3} → 2/4; {5,6} vs component 0's {5,7} → 1/3
    assert rows[0]["top_jaccard"] == pytest.approx(0.5) and rows[1]["top_jaccard"] == pytest.approx(1 / 3)
    s = relation_summary(rows, components_live=2)
    assert s["n_latents"] == 2 and s["frac_out_above"] == 1 and s["components_matched"] == 2
    assert s["median_top_jaccard"] == pytest.approx((0.5 + 1 / 3) / 2)


# ------------------------------------------------------------------------------------ densities and proxies


def test_density_columns_and_top_positions_by_hand():
    c = density_columns(torch.tensor([0.0, 1e-5, 1e-2, 0.1]), ultralow=1e-4)
    assert c["n_dead"] == 1 and c["n_live"] == 3 and c["n_ultralow"] == 1 and c["median_log10_density"] == pytest.approx(-2)
    acts = torch.tensor([[0.0, 1.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert top_positions(acts, 3).tolist() == [[1, 2, -1], [0, -1, -1]]


def test_proxies_of_a_one_token_unit_and_a_mixed_unit():
    tokens = torch.tensor([[0, 1, 0, 2, 0, 1]])
    acts = torch.tensor([[1.0, 0.5], [0.0, 0.5], [2.0, 0.0], [0.0, 0.5], [3.0, 0.0], [0.0, 0.5]])
    p = unit_proxies(tokens, vocab_size=3, acts=acts, top_k=10)
    # unit 0 fires on token 0 only; unit 1 on tokens 0, 1, 2, 1: most common 1 (2 of 4), entropy 1.5 bits
    assert p["top_token_frac"].tolist() == [1.0, 0.5] and p["token_entropy"].tolist() == pytest.approx([0.0, 1.5])


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # 42 s
def test_reduced_lm_comparison_end_to_end(tmp_path):
    """`python -m experiments.compare experiment=compare_lm_1l`, shrunk: two seeds, APD and SPD a few
    steps inside, one small neuron SAE with resampling and one transcoder."""
    out = tmp_path / "run"
    shrink = ["seeds=[0,1]", "n_eval=100", "apd.steps=3", 'apd_overrides=["batch_size=2","n_eval=2","method.C=64"]', "spd.steps=3",
              'spd_overrides=["batch_size=2","n_eval=2","method.faithfulness_warmup_steps=20","method.C=64"]',
              "sae_train.steps=12", "sae_train.batch_size=256", "sae_train.init_sample_size=512", "sae_train.warmup_steps=2",
              "saes.relu_l1.train={resample_steps:[6],resample_window:512,resample_sample_size:512}",
              "~saes.topk", "~saes.batchtopk", "saes.relu_l1.widths=[64]", "saes.relu_l1.sparsity_values=[1.0]",
              "saes.transcoder.widths=[32]", "saes.transcoder.sparsity_values=[4]"]  # fmt: skip
    rows, columns = run_compare("compare_lm_1l", shrink, out)
    assert columns == LM_COLUMNS
    assert [r["method"] for r in rows] == ["neurons", "apd", "apd", "spd", "spd", "relu_l1", "relu_l1", "transcoder", "transcoder"]
    for r in rows:
        v = {k: float(r[k]) for k in LM_COLUMNS if k not in ("method", "architecture", "sparsity_knob") and r[k] != ""}
        assert v["l0"] > 0 and v["loss_recovered"] <= 1 + 1e-6 and v["kl"] >= 0 and v["fvu_mlp_out"] >= 0, r
        assert v["n_live"] + v["n_dead"] >= v["width"] and v["n_params"] > 0 and v["bits_per_token"] > 0, r
        assert 0 < v["top_token_frac_median"] <= 1 and v["token_entropy_mean"] >= 0 and v["wall_seconds"] >= 0, r
        if r["method"] != "neurons":
            assert -1 <= v["seed_cos_out"] <= 1 + 1e-6 and -1 <= v["seed_cos_in"] <= 1 + 1e-6, r  # two seeds each
            assert -1 <= v["seed_act_corr"] <= 1, r
    assert float(rows[0]["loss_recovered"]) == pytest.approx(1) and rows[3]["loss_recovered_thresholded"] != ""
    assert rows[1]["sparsity_knob"] == "topk" and float(rows[1]["l0"]) == pytest.approx(16, abs=0.01)  # APD: 16 per token
    assert float(rows[3]["width"]) == 64 and rows[3]["sparsity_knob"] == "importance_minimality_coeff"
    training = json.loads((out / "saes" / "relu_l1_w64_l1_coeff1_seed0" / "training.json").read_text())
    assert training["train"]["resample_steps"] == [6] and training["n_resampled"] >= 0
    with (out / "seed_consistency.csv").open() as f:
        pairs = list(csv.DictReader(f))
    assert [p["method"] for p in pairs] == ["apd", "spd", "relu_l1", "transcoder"]
    with (out / "sae_component_matches.csv").open() as f:
        matches = list(csv.DictReader(f))
    assert {m["sae_method"] for m in matches} == {"relu_l1", "transcoder"} and {m["sae_seed"] for m in matches} == {"0"}
    assert {m["decomposition"] for m in matches} == {"apd", "spd"}
    assert all(0 <= float(m["out_cos"]) <= 1 + 1e-6 for m in matches)
    md = (out / "comparison.md").read_text()
    for section in ("### neurons", "### spd", "### relu_l1", "## Bars", "## Seed consistency", "matched description length",
                    "## Monosemanticity proxies", "## SAE latents against decomposition subcomponents", "density resolution"):
        assert section in md, section
    for name in ["loss_vs_l0.png", "loss_vs_bits.png", "log_density.png"]:
        assert (out / "figures" / name).stat().st_size > 10_000
    index = (out / "browser" / "index.html").read_text()  # the comparison ends with its feature browser
    for family in ("neurons", "spd", "apd", "relu_l1", "transcoder"):
        assert family in index, family
