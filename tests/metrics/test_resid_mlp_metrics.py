import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from apd.metrics.resid_mlp import (
    classify_components,
    component_neuron_contributions,
    feature_to_component,
    label_mses,
    matched_neuron_contributions,
    nc_slope,
    neuron_contributions,
    resid_mlp_metrics,
    scrub_antiscrub_mse,
    layer_neuron_spans,
    spd_neuron_contributions,
    spd_unit_layers,
    target_neuron_contributions,
    top1_onehot_mse,
)
from apd.toy_models.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    monosemantic_baseline,
    resid_mlp_batch,
    resid_mlp_labels,
)

torch.set_num_threads(1)


# --- a hand-made exact decomposition: one component per neuron -------------------------------


def per_neuron_components(model: ResidMLP) -> dict[str, Tensor]:
    """Component k = neuron k alone (its W_in row and W_out column); they sum to the weights."""
    per, L = model.config.d_mlp_per_layer, model.config.n_layers
    C = per * L
    out = {}
    for i, layer in enumerate(model.layers):
        W_in, W_out = layer.mlp_in.weight.detach(), layer.mlp_out.weight.detach()
        P_in = torch.zeros(C, *W_in.shape)
        P_out = torch.zeros(C, *W_out.shape)
        for j in range(per):
            P_in[i * per + j, j] = W_in[j]
            P_out[i * per + j, :, j] = W_out[:, j]
        out[f"layers.{i}.mlp_in"], out[f"layers.{i}.mlp_out"] = P_in, P_out
    return out


class MaskedComponents(nn.Module):
    """y = Σ_c s_c P_c x with the mask s passed per call through functional_call."""

    def __init__(self, P: Tensor):
        super().__init__()
        self.register_buffer("P", P)  # [C, d_out, d_in]
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        C, d_out, d_in = self.P.shape
        if d_out <= d_in:
            inner = torch.einsum("cod,bd->bco", self.P, x)
            return (self.mask[:, :, None] * inner).sum(1)
        z = (self.mask[:, :, None] * x[:, None, :]).reshape(x.shape[0], C * d_in)
        return z @ self.P.permute(0, 2, 1).reshape(C * d_in, d_out)


def masked_forward_of(model: ResidMLP, components: dict[str, Tensor]):
    decomposed = ResidMLP(model.config)
    decomposed.load_state_dict(model.state_dict())
    for name, P in components.items():
        decomposed.set_submodule(name, MaskedComponents(P))

    def masked_forward(x: Tensor, s: Tensor) -> Tensor:
        return functional_call(decomposed, {f"{n}.mask": s for n in components}, (x,))

    return masked_forward


def ablation_attributions(model: ResidMLP, masked_forward, C: int):
    """A_c(x) = ||f(x) - f(x; θ - P_c)||², via the (exact) decomposition."""

    def attributions(x: Tensor) -> Tensor:
        with torch.no_grad():
            y = model(x)
            ones = torch.ones(x.shape[0], C)
            cols = []
            for c in range(C):
                s = ones.clone()
                s[:, c] = 0
                cols.append(((masked_forward(x, s) - y) ** 2).sum(-1))
        return torch.stack(cols, dim=-1)

    return attributions


@pytest.fixture(scope="module")
def baseline() -> ResidMLP:
    return monosemantic_baseline(ResidMLPConfig())


@pytest.fixture(scope="module")
def baseline2() -> ResidMLP:
    return monosemantic_baseline(ResidMLPConfig(n_layers=2))


# --- neuron contributions ---------------------------------------------------------------------


def test_neuron_contributions_by_hand() -> None:
    W_E = torch.tensor([[1.0, 0.6], [0.0, 0.8]])  # unit columns
    W_in = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    W_out = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # feature 0: W_U[0] W_out = [1, 1], W_in W_E[:,0] = [1, 0]
    # feature 1: W_U[1] W_out = [0.6, 1.4], W_in W_E[:,1] = [0.6, 1.6]
    expected = torch.tensor([[1.0, 0.0], [0.36, 2.24]])
    torch.testing.assert_close(neuron_contributions(W_E, W_in, W_out), expected)
    # leading component dims broadcast
    batched = neuron_contributions(W_E, torch.stack([W_in, 2 * W_in]), torch.stack([W_out, W_out]))
    torch.testing.assert_close(batched, torch.stack([expected, 2 * expected]))


def test_target_nc_of_baseline_is_identity(baseline: ResidMLP, baseline2: ResidMLP) -> None:
    expected = torch.cat([torch.eye(50), torch.zeros(50, 50)])
    for m in (baseline, baseline2):
        torch.testing.assert_close(target_neuron_contributions(m), expected, atol=1e-5, rtol=0)


def test_component_nc_sum_over_neurons(baseline2: ResidMLP) -> None:
    comps = per_neuron_components(baseline2)
    nc = component_neuron_contributions(baseline2.W_E, comps, baseline2.mlp_pairs())
    assert nc.shape == (50, 100, 50)
    # per-neuron components: component k carries exactly neuron k's column of the target NC
    torch.testing.assert_close(nc.sum(0), target_neuron_contributions(baseline2), atol=1e-5, rtol=0)
    torch.testing.assert_close(nc[7, :, 7], target_neuron_contributions(baseline2)[:, 7])
    assert nc[7, :, torch.arange(50) != 7].abs().max() == 0


# --- classification and slope -------------------------------------------------------------------


def test_classify_components_by_hand() -> None:
    nc = torch.zeros(5, 3, 2)  # C=5 components, 3 features, 2 neurons
    nc[0, 0, 1] = -0.5  # serves feature 0 only (sign does not matter)
    nc[1, 1, 0], nc[1, 2, 1] = 0.3, 0.05  # features 1, 2
    nc[2, :, 0] = 1.0  # all three
    nc[4, 1, 0] = 0.04  # at the threshold: not served
    out = classify_components(nc, threshold=0.04)
    assert (out["n_dead"], out["n_mono"], out["n_duo"], out["n_poly"]) == (2, 1, 1, 1)
    assert out["has_dedicated_component"].tolist() == [True, False, False]
    assert out["n_features_with_dedicated_component"] == 1
    assert out["serves"].tolist() == [
        [True, False, False],
        [False, True, True],
        [True, True, True],
        [False, False, False],
        [False, False, False],
    ]
    assert feature_to_component(nc, 0.04).tolist() == [2, 2, 2]
    assert feature_to_component(nc, 2.0).tolist() == [-1, -1, -1]


def test_per_neuron_components_are_mono_with_slope_one(baseline: ResidMLP) -> None:
    comps = per_neuron_components(baseline)
    nc = component_neuron_contributions(baseline.W_E, comps, baseline.mlp_pairs())
    out = classify_components(nc)
    assert (out["n_dead"], out["n_mono"], out["n_duo"], out["n_poly"]) == (0, 50, 0, 0)
    assert out["has_dedicated_component"].tolist() == [True] * 50 + [False] * 50
    assert out["n_features_with_dedicated_component"] == 50
    assert nc_slope(target_neuron_contributions(baseline), nc) == pytest.approx(1.0, abs=1e-5)
    assert feature_to_component(nc).tolist() == list(range(50)) + [-1] * 50


def test_merged_and_zero_components(baseline: ResidMLP) -> None:
    comps = per_neuron_components(baseline)
    merged = {
        n: torch.cat([P[:1] + P[1:2], P[2:], torch.zeros_like(P[:1])]) for n, P in comps.items()
    }
    nc = component_neuron_contributions(baseline.W_E, merged, baseline.mlp_pairs())
    out = classify_components(nc)
    assert (out["n_dead"], out["n_mono"], out["n_duo"], out["n_poly"]) == (1, 48, 1, 0)
    assert out["n_features_with_dedicated_component"] == 48
    assert not out["has_dedicated_component"][:2].any()
    # merging does not shrink anything
    assert nc_slope(target_neuron_contributions(baseline), nc) == pytest.approx(1.0, abs=1e-5)
    poly = {n: torch.cat([P[:3].sum(0, keepdim=True), P[3:]]) for n, P in comps.items()}
    out = classify_components(component_neuron_contributions(baseline.W_E, poly, baseline.mlp_pairs()))
    assert (out["n_dead"], out["n_mono"], out["n_duo"], out["n_poly"]) == (0, 47, 0, 1)


def test_nc_slope_measures_shrinkage(baseline: ResidMLP) -> None:
    comps = per_neuron_components(baseline)
    comps["layers.0.mlp_out"] = 0.5 * comps["layers.0.mlp_out"]
    nc = component_neuron_contributions(baseline.W_E, comps, baseline.mlp_pairs())
    assert nc_slope(target_neuron_contributions(baseline), nc) == pytest.approx(0.5, abs=1e-5)
    # a hand-made case: best component per feature is chosen by |NC|, pooled least squares
    nc_t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    nc_c = torch.tensor([[[0.5, 0.0], [0.0, 0.1]], [[0.1, 0.0], [0.0, 3.0]]])
    # matched: feature 0 -> comp 0 [0.5, 0], feature 1 -> comp 1 [0, 3]; slope = (0.5 + 6) / 5
    assert nc_slope(nc_t, nc_c) == pytest.approx(1.3)


def test_nc_slope_with_groups_sums_the_best_piece_of_each_layer() -> None:
    # by hand: one feature on neurons 0-1 (layer 0) and 2-3 (layer 1)
    nc_t = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    nc_c = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.1, 0.0, 0.0, 0.0]], [[0.0, 0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 0.5]]])
    groups = torch.tensor([0, 0, 1, 1])
    assert matched_neuron_contributions(nc_c, groups).tolist() == [[1.0, 1.0, 2.0, 0.0]]
    assert nc_slope(nc_t, nc_c, groups) == pytest.approx(1.0)
    assert nc_slope(nc_t, nc_c) == pytest.approx(4 / 6)  # one piece alone: layer 1's share only


def test_spd_nc_slope_of_an_exact_two_layer_decomposition_is_one() -> None:
    """SPD-style pieces of a 2-layer residual MLP with an orthonormal embedding: per layer, W_in
    split into one rank-1 piece per feature (W_in e_i e_iᵀ), read through the whole W_out. Each
    feature's two pieces together give the target's NC exactly; the best single piece does not."""
    torch.manual_seed(0)
    model = ResidMLP(ResidMLPConfig(n_features=6, d_embed=6, d_mlp=8, n_layers=2))
    model.W_E.copy_(torch.linalg.qr(torch.randn(6, 6))[0])  # the pieces sum to W_in
    weights = {}
    for w_in, w_out in model.mlp_pairs():
        W_in = model.get_submodule(w_in).weight.detach()
        weights[w_in] = torch.stack([torch.outer(W_in @ e, e) for e in model.W_E.T])  # [6, d_mlp_l, d_embed]
        weights[w_out] = model.get_submodule(w_out).weight.detach()[None]
    assert torch.allclose(weights["layers.1.mlp_in"].sum(0), model.layers[1].mlp_in.weight, atol=1e-5)
    nc_c, units = spd_neuron_contributions(model.W_E, weights, model.mlp_pairs())
    layer_of = spd_unit_layers(units, model.mlp_pairs())
    assert layer_of.tolist() == [0] * 6 + [1] * 6
    assert layer_neuron_spans(weights, model.mlp_pairs()) == [(0, 4), (4, 8)]  # d_mlp 8 split over the two layers
    assert not nc_c[6:, :, :4].any() and not nc_c[:6, :, 4:].any()  # each piece on its own layer's neurons only
    nc_t = target_neuron_contributions(model)
    assert nc_slope(nc_t, nc_c, layer_of) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(matched_neuron_contributions(nc_c, layer_of), nc_t, atol=1e-6)
    assert nc_slope(nc_t, nc_c) < 0.9


# --- output-level metrics -----------------------------------------------------------------------


def test_exact_decomposition_reproduces_target(baseline2: ResidMLP) -> None:
    comps = per_neuron_components(baseline2)
    masked_forward = masked_forward_of(baseline2, comps)
    x = resid_mlp_batch(100, 256, 0.05, torch.Generator().manual_seed(0))
    y = masked_forward(x, torch.ones(256, 50))
    torch.testing.assert_close(y, baseline2(x), atol=1e-5, rtol=0)
    # all components off: residual only
    G = baseline2.W_E.T @ baseline2.W_E
    torch.testing.assert_close(masked_forward(x, torch.zeros(256, 50)), x @ G, atol=1e-5, rtol=0)


def test_top1_onehot_mse(baseline: ResidMLP) -> None:
    comps = per_neuron_components(baseline)
    masked_forward = masked_forward_of(baseline, comps)
    attributions = ablation_attributions(baseline, masked_forward, 50)
    mse = top1_onehot_mse(baseline, masked_forward, attributions, n_features=100)
    assert mse.shape == (100,)
    assert mse.max() < 1e-10
    # picking the wrong neuron loses ReLU(1) = 1 at output i: MSE 1/n for computed features
    wrong = lambda x: attributions(x).roll(1, dims=-1)  # noqa: E731
    mse = top1_onehot_mse(baseline, masked_forward, wrong, n_features=100)
    torch.testing.assert_close(mse[:50], torch.full((50,), 0.01), atol=1e-6, rtol=0)
    assert mse[50:].max() < 1e-10


def test_scrub_antiscrub_mse(baseline2: ResidMLP) -> None:
    comps = per_neuron_components(baseline2)
    masked_forward = masked_forward_of(baseline2, comps)
    nc = component_neuron_contributions(baseline2.W_E, comps, baseline2.mlp_pairs())
    g = torch.Generator().manual_seed(0)
    scrubbed, anti = scrub_antiscrub_mse(
        baseline2, masked_forward, feature_to_component(nc), 50, 100, n_samples=100, generator=g
    )
    assert scrubbed[50:].isnan().all() and anti[50:].isnan().all()
    assert scrubbed[:50].max() < 1e-10
    # without its neuron, feature i's output misses ReLU(v): E[ReLU(v)²] / n = 1 / (6 n)
    assert anti[:50].mean().item() == pytest.approx(1 / 600, rel=0.1)
    assert (anti[:50] > 1e-4).all()


def test_label_mses_match_analytic_values(baseline: ResidMLP) -> None:
    p, n = 0.01, 100
    x = resid_mlp_batch(n, 50_000, p, torch.Generator().manual_seed(0))
    labels = resid_mlp_labels(x)
    out = label_mses(baseline, baseline, None, x, labels)
    assert set(out) == {
        "mse_target_vs_labels",
        "mse_monosemantic_vs_labels",
        "mse_monosemantic_vs_target",
    }
    assert out["mse_monosemantic_vs_target"] == 0.0
    assert out["mse_target_vs_labels"] == out["mse_monosemantic_vs_labels"]
    # error_i = Σ_{j≠i} G_ij x_j - [i ≥ 50] ReLU(x_i); E[x²] = p/3, E[ReLU(x)²] = p/6
    G = baseline.W_E.T @ baseline.W_E
    off = (G - torch.diag(G.diagonal())).pow(2).sum(1).mean().item()
    analytic = off * p / 3 + 0.5 * p / 6
    assert out["mse_monosemantic_vs_labels"] == pytest.approx(analytic, rel=0.05)
    # an exact decomposition with every component on is the target
    masked_forward = masked_forward_of(baseline, per_neuron_components(baseline))
    topk = lambda x: masked_forward(x, torch.ones(x.shape[0], 50))  # noqa: E731
    x, labels = x[:1000], labels[:1000]
    out = label_mses(baseline, baseline, topk, x, labels)
    assert out["mse_topk_vs_target"] < 1e-12
    assert out["mse_topk_vs_labels"] == pytest.approx(out["mse_target_vs_labels"], rel=1e-4)


def test_resid_mlp_metrics_keys_and_values(baseline: ResidMLP) -> None:
    comps = per_neuron_components(baseline)
    masked_forward = masked_forward_of(baseline, comps)
    attributions = ablation_attributions(baseline, masked_forward, 50)
    topk = lambda x: masked_forward(x, torch.ones(x.shape[0], 50))  # noqa: E731
    out = resid_mlp_metrics(
        target=baseline,
        monosemantic=baseline,
        component_weights=comps,
        masked_forward=masked_forward,
        attributions=attributions,
        topk_forward=topk,
        n_eval=2000,
        n_scrub_samples=50,
    )
    assert set(out) >= {
        "n_features_with_dedicated_component", "n_mono", "n_duo", "n_poly", "n_dead", "nc_slope",
        "top1_onehot_mse", "scrubbed_mse", "antiscrubbed_mse", "mse_monosemantic_vs_target",
        "mse_target_vs_labels", "mse_monosemantic_vs_labels",
    }  # fmt: skip
    assert (out["n_mono"], out["n_duo"], out["n_poly"], out["n_dead"]) == (50, 0, 0, 0)
    assert out["n_features_with_dedicated_component"] == 50
    assert out["nc_slope"] == pytest.approx(1.0, abs=1e-5)
    assert out["top1_onehot_mse"] < 1e-10 and out["scrubbed_mse"] < 1e-10
    assert out["antiscrubbed_mse"] == pytest.approx(1 / 600, rel=0.2)
    assert out["mse_monosemantic_vs_target"] == 0.0
    assert all(isinstance(v, (int, float)) for v in out.values())
