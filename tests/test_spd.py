"""SPD: squashing functions, causal-importance functions, masks, the Δ-component, the losses by hand,
and the method in the one training loop (seeds at once, resume, bad input)."""

import math

import pytest
import torch
from torch import nn

from apd import ComponentModel, ConfigError, ModuleSelectionError, SPDConfig, decompose, decompose_seeds, load_decomposition, sigmoids
from apd.ci_functions import MLPCI, SharedMLPCI, VectorMLPCI
from apd.losses.importance_minimality import importance_minimality_loss
from apd.methods import method_for
from apd.methods.spd import annealed_p, ci_functions, components_per_module, leaky_hard_sigmoids, lower_leaky_hard_sigmoid, minimality_scale, upper_leaky_hard_sigmoid
from apd.train import loss_terms


def test_lower_leaky_hard_sigmoid_clamps_and_leaks_only_upwards_below_zero():
    x = torch.tensor([-1.0, -1.0, 0.5, 0.5, 1.5, 1.5], requires_grad=True)
    y = lower_leaky_hard_sigmoid(x, alpha=0.1)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0]))
    g = torch.tensor([-2.0, 3.0, -2.0, 3.0, -2.0, 3.0])  # dL/dy
    (y * g).sum().backward()
    # below 0: α·g only when g < 0 (descent raises x); inside: g; above 1: 0
    torch.testing.assert_close(x.grad, torch.tensor([-0.2, 0.0, -2.0, 3.0, 0.0, 0.0]))


def test_upper_leaky_hard_sigmoid():
    x = torch.tensor([-1.0, 0.25, 3.0], requires_grad=True)
    y = upper_leaky_hard_sigmoid(x, alpha=0.1)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.25, 1.2]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 0.1]))


def test_fused_leaky_hard_sigmoids_match_the_separate_ones_in_value_and_gradient():
    # every region (below 0, inside, above 1) with gradients of both signs, and a random bulk
    x0 = torch.cat([torch.tensor([-1.0, -1.0, 0.5, 0.5, 1.5, 1.5]), torch.randn(500, generator=torch.Generator().manual_seed(0)) * 2])
    gl = torch.cat([torch.tensor([-2.0, 3.0, -2.0, 3.0, -2.0, 3.0]), torch.randn(500, generator=torch.Generator().manual_seed(1))])
    gu = torch.cat([torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, -0.5]), torch.randn(500, generator=torch.Generator().manual_seed(2))])
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    lower, upper = leaky_hard_sigmoids(xa, alpha=0.1)
    torch.testing.assert_close(lower, lower_leaky_hard_sigmoid(x0, 0.1))
    torch.testing.assert_close(upper, upper_leaky_hard_sigmoid(x0, 0.1))
    torch.autograd.backward([lower, upper], [gl, gu])
    torch.autograd.backward([lower_leaky_hard_sigmoid(xb, 0.1), upper_leaky_hard_sigmoid(xb, 0.1)], [gl, gu])
    torch.testing.assert_close(xa.grad, xb.grad)
    # hand-worked: below 0 the lower one leaks α·gl only for gl < 0 (the upper one passes nothing);
    # inside gl + gu; above 1 only the upper one's α·gu
    torch.testing.assert_close(xa.grad[:6], torch.tensor([-0.2, 0.0, -1.5, 2.5, 0.05, -0.05]))
    # only one output used: the other's gradient counts as zero
    xc = x0.clone().requires_grad_()
    leaky_hard_sigmoids(xc, alpha=0.1)[1].backward(gu)
    xd = x0.clone().requires_grad_()
    upper_leaky_hard_sigmoid(xd, 0.1).backward(gu)
    torch.testing.assert_close(xc.grad, xd.grad)


def _separate_grad(x: torch.Tensor, gl: torch.Tensor, gu: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dx of gl·lower(x) + gu·upper(x) through the two separate functions."""
    xs = x.detach().clone().requires_grad_()
    torch.autograd.backward([lower_leaky_hard_sigmoid(xs, alpha), upper_leaky_hard_sigmoid(xs, alpha)], [gl, gu])
    return xs.grad


def test_fused_leaky_hard_sigmoids_equal_the_separate_ones_at_the_region_boundaries():
    # bug (e): the fused node gave the upper-leaky one's gradient 0 at exactly x = 0 (the separate one
    # passes it: its clamp includes 0), and all-zero rows make x = 0 common at step 0
    alpha = 0.1
    edges = torch.tensor([0.0, 0.0, -0.0, 1.0, 1.0, -2.0, -2.0, 3.0, 3.0, 0.5, float("inf"), -float("inf"), float("nan")])
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([edges, torch.randint(-2, 4, (400,), generator=gen).float() / 2])  # half-integers: many exact 0 and 1
    for trial in range(3):  # random upstream gradients of both signs, each x met with several
        gl, gu = torch.randn(2, *x.shape, generator=gen)
        xa = x.clone().requires_grad_()
        lower, upper = leaky_hard_sigmoids(xa, alpha)
        torch.testing.assert_close(lower, lower_leaky_hard_sigmoid(x, alpha), equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(upper, upper_leaky_hard_sigmoid(x, alpha), equal_nan=True, rtol=0, atol=0)
        torch.autograd.backward([lower, upper], [gl, gu])
        assert torch.equal(xa.grad, _separate_grad(x, gl, gu, alpha)), trial
    # hand-worked at x = 0 (gl = -2, gu = 0.5): the lower one's leak α·gl plus the whole gu; at x = 1
    # both pass; at x = 0 with gl > 0 the lower one passes nothing (its leak only raises x)
    xb = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    torch.autograd.backward(list(leaky_hard_sigmoids(xb, alpha)), [torch.tensor([-2.0, 3.0, -2.0]), torch.tensor([0.5, 0.5, 0.5])])
    torch.testing.assert_close(xb.grad, torch.tensor([-0.2 + 0.5, 0.5, -1.5]))


def test_fused_leaky_hard_sigmoids_under_vmap_equal_the_separate_ones():
    # the fused node relies on generate_vmap_rule (seeds trained at once vmap the SPD step): per
    # instance the vmapped gradient is the separate functions' one, boundaries included
    alpha = 0.05
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 4, (3, 64), generator=gen).float() / 2
    gl, gu = torch.randn(2, 3, 64, generator=gen)

    def fused_grad(xi: torch.Tensor, gli: torch.Tensor, gui: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(lambda t: sigmoids.leaky_hard_sigmoids(t, alpha), xi)[1]((gli, gui))[0]

    got = torch.func.vmap(fused_grad)(x, gl, gu)
    for i in range(3):
        assert torch.equal(got[i], _separate_grad(x[i], gl[i], gu[i], alpha)), i
    values = torch.func.vmap(lambda t: sigmoids.leaky_hard_sigmoids(t, alpha))(x)
    assert torch.equal(values[0], lower_leaky_hard_sigmoid(x, alpha)) and torch.equal(values[1], upper_leaky_hard_sigmoid(x, alpha))


def test_the_squashing_functions_live_in_a_leaf_module_re_exported_by_spd():
    import ast
    import pathlib

    import apd.methods.spd as spd

    for name in sigmoids.__all__:
        assert getattr(spd, name) is getattr(sigmoids, name)
    tree = ast.parse(pathlib.Path(sigmoids.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "apd"], imported


def test_ci_functions_are_per_subcomponent_where_they_should_be():
    g = torch.Generator().manual_seed(0)
    C, d = 4, 6
    inner, a = torch.randn(7, 3, C, 1), torch.randn(7, 3, d)
    mlp = MLPCI(C, [5], g)
    out = mlp(inner, a)
    assert out.shape == (7, 3, C)
    # subcomponent c's output depends on its own inner activation only
    bumped = inner.clone()
    bumped[..., 1, 0] += 1.0
    changed = (mlp(bumped, a) != out).any(dim=(0, 1))
    assert changed.tolist() == [False, True, False, False]
    # by hand for subcomponent 2: gelu(v w1 + b1) · w2 + b2
    W1, b1, W2, b2 = (p.detach() for p in mlp.parameters())
    v = inner[0, 0, 2, 0]
    expected = (torch.nn.functional.gelu(v * W1[2, 0] + b1[2]) * W2[2, :, 0]).sum() + b2[2, 0]
    assert out[0, 0, 2].item() == pytest.approx(expected.item(), rel=1e-5)
    for fn in (VectorMLPCI(C, d, [5], g), SharedMLPCI(C, d, [5, 3], g)):
        assert fn(inner, a).shape == (7, 3, C)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_delta_component_makes_the_unmasked_model_the_target_whatever_the_components():
    model = _mlp()
    cm = method_for(SPDConfig(C=3)).build(model, ["0", "2"])
    x = torch.randn(6, 5)
    ones = {n: torch.ones(6, 3) for n in cm.layer_names}
    with torch.no_grad():
        full = cm(x, masks=ones, weight_delta_masks={n: torch.ones(6) for n in cm.layer_names})
        torch.testing.assert_close(full, model(x))  # Σ P + 1·(W − Σ P) = W
        without = cm(x, masks=ones)
        assert not torch.allclose(without, model(x))  # random components alone miss W
        # r_Δ = 0 and masks 1: the components alone
        torch.testing.assert_close(cm(x, masks=ones, weight_delta_masks={n: torch.zeros(6) for n in cm.layer_names}), without)


class _Twice(nn.Module):
    """One Linear applied twice: its second call reads what its first wrote."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.sq, self.out = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.sq(torch.relu(self.sq(self.inp(x)))))


def test_precomputed_inner_activations_are_used_only_where_a_layer_reads_the_targets_input():
    model = _mlp()
    method = method_for(SPDConfig(C=3))
    cm = method.build(model, ["0", "2"])
    x = torch.randn(6, 5)
    ctx = method.step_context(cm, x, 0)
    assert set(ctx.inner_acts(["0", "2"])) == {"0"}  # all masked: only the first layer sees the target's input
    assert set(ctx.inner_acts(["2"])) == {"2"}  # masked alone: its input is the target's
    masks = {n: torch.rand(6, 3) for n in cm.layer_names}
    for masked in (["0", "2"], ["2"]):
        m = {n: masks[n] for n in masked}
        reused = cm(x, masks=m, inner_acts=ctx.inner_acts(masked))
        torch.testing.assert_close(reused, cm(x, masks=m))
        (g_reused,) = torch.autograd.grad(reused.sum(), cm.layers[masked[-1]].A, retain_graph=True)
        (g_fresh,) = torch.autograd.grad(cm(x, masks=m).sum(), cm.layers[masked[-1]].A)
        torch.testing.assert_close(g_reused, g_fresh)
    # inner activations of the wrong input shape are refused with the fix
    with pytest.raises(ValueError, match=r"precomputed inner activations have shape \(2, 3, 1\).*\(6, 3, 1\)"):
        cm(x, masks=masks, inner_acts={"0": ctx.inner["0"][:2]})
    # a layer called twice reads its own output the second time: never reused
    cm2 = method.build(_Twice(), ["inp", "sq", "out"])
    ctx2 = method.step_context(cm2, x, 0)
    assert ctx2.call_order == ("inp", "sq", "out") and ctx2.called_once == {"inp", "out"}
    assert ctx2.inner_acts(["sq"]) == {} and set(ctx2.inner_acts(["out"])) == {"out"}
    assert set(ctx2.inner_acts(["inp", "sq", "out"])) == {"inp"}
    calls: list[str] = []  # what the step context learns them from: the capture's record of every call
    with torch.no_grad(), cm2.capture(["out", "sq", "inp"], inputs=True, calls=calls) as a_in:
        cm2(x)
    assert calls == ["inp", "sq", "sq", "out"]
    with torch.no_grad():
        second_input = torch.relu(cm2.layers["sq"](cm2.layers["inp"](x)))
    torch.testing.assert_close(a_in["sq"], second_input)  # a layer called twice: its last call's input


def test_the_loss_terms_do_not_change_when_inner_activations_are_reused(monkeypatch):
    """Same random draws with and without the reuse: the same losses and the same gradients."""
    from apd.methods.spd import SPDStep

    method = method_for(SPDConfig(C=3, ci_masked_recon_coeff=1.0))
    cm = method.build(_Twice(), ["inp", "sq", "out"])
    x = torch.randn(8, 5)

    def run():
        torch.manual_seed(3)
        terms = method.loss_terms(cm, x, 0)
        grads = torch.autograd.grad(terms["total"], list(cm.trainable_parameters().values()))
        return {k: v.item() for k, v in terms.items()}, grads

    reused, g_reused = run()
    monkeypatch.setattr(SPDStep, "inner_acts", lambda self, masked: {})
    fresh, g_fresh = run()
    assert reused == pytest.approx(fresh, rel=1e-6)
    for a, b in zip(g_reused, g_fresh):
        torch.testing.assert_close(a, b)


def test_losses_by_hand_on_a_one_matrix_model():
    torch.manual_seed(1)
    lin = nn.Linear(3, 2, bias=False)
    cfg = SPDConfig(C=2, importance_minimality_coeff=0.5, pnorm=2.0, delta_component=False, faithfulness_coeff=1.0,
                    stochastic_recon_layerwise_coeff=None, faithfulness_warmup_steps=0)  # fmt: skip
    method = method_for(cfg)
    cm = method.build(nn.Sequential(lin), ["0"])
    x = torch.randn(4, 3)
    torch.manual_seed(7)
    terms = method.loss_terms(cm, x, 0)
    # recompute by hand with the same random draw
    torch.manual_seed(7)
    with torch.no_grad():
        layer = cm.layers["0"]
        v = x @ layer.A[:, 0].T  # (4, C) inner activations
        pre = ci_functions(cm).fn("0")(v[..., None], x)
        g = pre.clamp(0, 1)
        g_up = torch.where(pre > 1, 1 + 0.01 * (pre - 1), pre.clamp(0, 1))
        m = g + (1 - g) * torch.rand_like(g)
        W_masked = torch.einsum("bc,cdo->bdo", m, layer.B[:, :, 0, None] * layer.A[:, 0][:, None, :])
        out = torch.einsum("bdo,bo->bd", W_masked, x)
        recon = (out - lin(x)).pow(2).mean()
        imp = (g_up.pow(2)).mean(0).sum()
        faith = (lin.weight - (layer.B[:, :, 0].T @ layer.A[:, 0])).pow(2).sum() / lin.weight.pow(2).sum()  # relative (default)
    assert terms["stochastic_recon"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert terms["importance_minimality"].item() == pytest.approx(imp.item(), rel=1e-5)
    assert terms["faithfulness"].item() == pytest.approx(faith.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((faith + recon + 0.5 * imp).item(), rel=1e-5)
    assert terms["l0"].item() == pytest.approx((g > 0.1).float().sum(-1).mean().item())


def test_importance_minimality_sums_layers_and_components_and_averages_rows():
    ci = {"a": torch.tensor([[0.5, 1.0], [0.0, 1.0]]), "b": torch.tensor([[[1.0], [0.0]]])}  # b: one sample, 2 positions
    # a: means (0.25, 1) -> 1.25; b: mean over 2 positions 0.5 -> 0.5 ; p = 1
    assert importance_minimality_loss(ci, p=1.0, eps=0.0).item() == pytest.approx(1.75)
    assert importance_minimality_loss(ci, p=2.0, eps=0.0).item() == pytest.approx((0.125 + 1.0) + 0.5)
    # frequency term: each mean weighted by β·log2(1 + its sum)
    beta = importance_minimality_loss({"a": ci["a"]}, p=1.0, eps=0.0, beta=1.0).item()
    assert beta == pytest.approx(0.25 + 0.25 * math.log2(1.5) + 1.0 + 1.0 * math.log2(3.0))


def test_p_annealing():
    cfg = SPDConfig(steps=100, pnorm=2.0, pnorm_final=0.4, pnorm_anneal_start_frac=0.2, pnorm_anneal_end_frac=0.6)
    assert [annealed_p(cfg, s) for s in (0, 20, 40, 60, 99)] == pytest.approx([2.0, 2.0, 1.2, 0.4, 0.4])
    assert annealed_p(SPDConfig(pnorm=1.5), 10) == 1.5


def test_importance_minimality_decays_to_zero_at_the_end():
    cfg = SPDConfig(steps=101, importance_minimality_decay_start_frac=0.8)
    assert [minimality_scale(cfg, s) for s in (0, 80, 90, 95, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.0])
    assert minimality_scale(SPDConfig(steps=10), 9) == 1.0  # default: no decay
    # the loss term is scaled, the coefficient that multiplies it is not
    torch.manual_seed(3)
    cfg = SPDConfig(C=3, steps=11, importance_minimality_decay_start_frac=0.0, faithfulness_warmup_steps=0)
    method = method_for(cfg)
    cm = method.build(_mlp(), ["0"])
    x = torch.randn(8, 5)
    full, half = method.loss_terms(cm, x, 0), method.loss_terms(cm, x, 5)
    assert half["importance_minimality"].item() == pytest.approx(0.5 * full["importance_minimality"].item(), rel=1e-6)
    assert method.loss_terms(cm, x, 10)["importance_minimality"].item() == 0.0


def test_the_upper_leaky_causal_importances_use_the_runs_leaky_alpha():
    """Bug (b): the causal importances a user asks for (upper-leaky g⁺ included) come from the one CI
    path, squashed with the run's leaky_alpha (0.3 here), not a default 0.01: what the minimality loss
    trains on."""
    from apd.decomposition import Decomposition

    cfg = SPDConfig(C=4, leaky_alpha=0.3, ci_fn="shared_mlp", faithfulness_warmup_steps=0)
    method = method_for(cfg)
    model = _mlp()
    cm = method.build(model, ["0", "2"])
    with torch.no_grad():
        for fn in ci_functions(cm):
            fn.layers.net[-1].bias.copy_(torch.tensor([2.0, 1.5, 0.3, -1.0]))  # some above 1, where the slopes differ
    x = torch.randn(8, 5)
    with torch.no_grad(), cm.capture(cm.layer_names, inputs=True) as a_in:
        cm(x)
        pre = {n: ci_functions(cm).fn(n)(cm.layers[n].component_acts(a_in[n]), a_in[n]) for n in cm.layer_names}
    dec = Decomposition.from_component_model(cm, "spd", cfg, 0)
    upper, lower = dec.causal_importances(x, upper_leaky=True), dec.causal_importances(x)
    trained_on = method.step_context(cm, x, 0).ci_upper
    for n, p in pre.items():
        assert bool((p > 1).any()) and bool((p < 1).any())
        torch.testing.assert_close(upper[n], torch.where(p > 1, 1 + 0.3 * (p - 1), p.clamp(0, 1)))
        torch.testing.assert_close(upper[n], trained_on[n].detach())
        torch.testing.assert_close(lower[n], p.clamp(0, 1))


def test_a_method_without_causal_importances_says_where_its_masks_come_from():
    from apd import APDConfig

    method = method_for(APDConfig(C=2))
    cm = method.build(_mlp(), ["0", "2"])
    with pytest.raises(ValueError, match="APD learns no causal importances.*eval_masks"):
        method.causal_importances(cm, torch.randn(3, 5))
    with pytest.raises(ValueError, match="no causal-importance functions"):
        ci_functions(cm)


def test_ci_masks_from_the_component_model():
    """The causal importances g = clamp(pre-activation, 0, 1) of the CI functions on each layer's own
    input, the same by every route (the method, its eval masks, the step context), and
    cm(x, masks=g) runs every layer with the per-row weights Σ_c g_c U_c V_cᵀ."""
    method = method_for(SPDConfig(C=3))
    cm = method.build(_mlp(), ["0", "2"])
    x = torch.randn(6, 5)
    ci = method.causal_importances(cm, x)
    assert set(ci) == {"0", "2"} and ci["0"].shape == (6, 3) and bool(((ci["0"] >= 0) & (ci["0"] <= 1)).all())
    with torch.no_grad():
        lin0 = cm.layers["0"]
        a2 = torch.relu(x @ lin0.weight.T + lin0.bias)
        for n, a in (("0", x), ("2", a2)):
            v = a @ cm.layers[n].A[:, 0].T  # inner activations V_cᵀ a
            torch.testing.assert_close(ci[n], ci_functions(cm).fn(n)(v[..., None], a).clamp(0, 1))
        for other in (method.eval_masks(cm, x), method.step_context(cm, x, 0).ci):
            for n in ci:
                torch.testing.assert_close(other[n], ci[n])
        h = x
        for n in ("0", "2"):
            layer = cm.layers[n]
            W_rows = torch.einsum("bc,co,ci->boi", ci[n], layer.B[:, :, 0], layer.A[:, 0])
            h = torch.einsum("boi,bi->bo", W_rows, h) + layer.bias
            h = torch.relu(h) if n == "0" else h
        torch.testing.assert_close(cm(x, masks=ci), h)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ci_fn": "gru"}, "ci_fn='gru'"),
        ({"C": 0}, r"C=0"),
        ({"C_per_module": {"mlp_out": 0}}, r"C_per_module\['mlp_out'\]=0"),
        ({"importance_minimality_coeff": -1.0}, "importance_minimality_coeff"),
        ({"pnorm": 0.0}, r"pnorm=0.0"),
        ({"pnorm": 3.0}, r"\(0, 2\]"),
        ({"importance_minimality_decay_start_frac": 1.5}, "importance_minimality_decay_start_frac=1.5"),
        ({"ci_threshold": 1.0}, "ci_threshold"),
        ({"stochastic_recon_coeff": None, "stochastic_recon_layerwise_coeff": None}, "every reconstruction loss is off"),
        ({"delta_component": False, "faithfulness_coeff": None}, "faithfulness_coeff"),
        ({"output_loss": "xent"}, "output_loss"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SPDConfig(**kwargs)


def test_C_per_module_by_name_last_part_or_pattern_first_match_wins():
    names = ["layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out"]
    cfg = SPDConfig(C=9, C_per_module={"mlp_out": 3, "layers.1.*": 7})
    assert components_per_module(cfg, names) == {"layers.0.mlp_in": 9, "layers.0.mlp_out": 3,
                                                  "layers.1.mlp_in": 7, "layers.1.mlp_out": 3}  # fmt: skip
    assert components_per_module(SPDConfig(C=9), names) == 9
    with pytest.raises(ConfigError, match=r"key 'mlp_ot' matches no decomposed module; the modules are \['layers.0.mlp_in'"):
        components_per_module(SPDConfig(C_per_module={"mlp_ot": 3}), names)


def test_a_C_per_module_key_that_would_do_nothing_is_refused():
    # bug (c): a key matching only a tied second use (TMS's dec, tied to enc) was accepted and did
    # nothing (the use has its matrix's subcomponents); so was a key shadowed by an earlier one
    from apd.toy_models.tms import TMS, TMSConfig

    spd = lambda **kw: method_for(SPDConfig(C=4, **kw))  # noqa: E731
    tms = TMS(TMSConfig(n_features=5, n_hidden=2))
    with pytest.raises(ConfigError, match=r"key 'dec' matches only 'dec', the tied second use of 'enc' .* "
                                          r"set the key for the source matrix instead: C_per_module=\{'enc': 3\}$"):
        spd(C_per_module={"dec": 3}).build(tms, ["enc", "dec"])
    assert spd(C_per_module={"enc": 3}).build(tms, ["enc", "dec"]).C_per_module() == {"enc": 3, "dec": 3}
    assert spd(C_per_module={"*": 3}).build(tms, ["enc", "dec"]).C_per_module() == {"enc": 3, "dec": 3}  # matches enc too
    # a declared tie between plain nn.Linear layers
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 5))
    with torch.no_grad():
        mlp[2].weight.copy_(mlp[0].weight.T)
    with pytest.raises(ConfigError, match=r"key '2' matches only '2', the tied second use of '0'"):
        spd(C_per_module={"2": 2}).build(mlp, ["0", "2"], tied={"2": "0"})
    with pytest.raises(ConfigError, match=r"key '0' is shadowed by earlier keys on every matrix it matches \(\['0'\]\)"):
        spd(C_per_module={"*": 2, "0": 3}).build(_mlp(), ["0", "2"])
    assert spd(C_per_module={"0": 3, "*": 2}).build(_mlp(), ["0", "2"]).C_per_module() == {"0": 3, "2": 2}


def test_C_per_module_gives_each_matrix_its_own_number_through_training_and_reload(tmp_path):
    cfg = SPDConfig(C=4, C_per_module={"2": 2}, steps=20, lr=1e-2, log_every=10)
    dec = decompose(_mlp(), _data(), cfg, ["0", "2"], progress=False)
    w = dec.component_weights()
    assert w["0"].shape == (4, 4, 5) and w["2"].shape == (2, 3, 4)
    x = torch.randn(9, 5)
    ci = dec.causal_importances(x)
    assert ci["0"].shape == (9, 4) and ci["2"].shape == (9, 2)
    loaded = load_decomposition(dec.save(tmp_path))
    assert loaded.config.C_per_module == {"2": 2} and "C={'0': 4, '2': 2}" in repr(loaded)
    for n, g in loaded.causal_importances(x, _mlp()).items():
        torch.testing.assert_close(g, ci[n])


def test_a_module_spd_cannot_decompose_is_refused():
    with pytest.raises(ModuleSelectionError, match="cannot be decomposed"):
        decompose(_mlp(), lambda: torch.randn(8, 5), SPDConfig(C=2, steps=2), ["1"], progress=False)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(64, 5, generator=g)


def test_training_lowers_the_reconstruction_and_saves_the_ci_functions(tmp_path):
    cfg = SPDConfig(C=4, steps=80, lr=1e-2, log_every=10, importance_minimality_coeff=1e-3)
    logged = []
    dec = decompose(_mlp(), _data(), cfg, ["0", "2"], progress=False, callback=lambda s, t: logged.append(t))
    assert logged[-1]["stochastic_recon"] < logged[0]["stochastic_recon"]
    assert dec.method == "spd" and dec.component_weights()["0"].shape == (4, 4, 5)
    assert any(n.startswith("ci_fns.") for n in dec.params)
    loaded = load_decomposition(dec.save(tmp_path))
    x = torch.randn(9, 5)
    ours, theirs = loaded.causal_importances(x, _mlp()), dec.causal_importances(x)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n])
    assert "SPD" in repr(loaded) and "further trained tensors" in repr(loaded) and len(repr(loaded)) < 300


def test_seeds_at_once_equal_single_runs_fed_the_same_batches():
    """Deterministic losses (no random masks): each vmapped instance is exactly its single run,
    components and CI functions, warm-up and per-instance clipping included."""
    # faithfulness off: near Σ = W its gradient is rounding noise, which Adam scales up to lr-sized steps, so
    # summation order (vmapped or not) shows; the equality of the machinery is what is tested here
    cfg = SPDConfig(C=3, steps=12, lr=1e-2, log_every=4, faithfulness_warmup_steps=5, grad_clip_norm=0.5, faithfulness_coeff=None,
                    ci_masked_recon_coeff=1.0, stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None)  # fmt: skip
    batches = [torch.randn(32, 5, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    decs = decompose_seeds(_mlp(), batches, cfg, ["0", "2"], seeds=[3, 5], progress=False)
    for i, seed in enumerate([3, 5]):
        single = decompose(_mlp(), batches[i::2], SPDConfig(**(cfg.to_dict() | {"seed": seed})), ["0", "2"], progress=False)
        for n, p in single.params.items():
            torch.testing.assert_close(decs[i].params[n], p, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(decs[0].params["ci_fns.0.layers.net.0.W"], decs[1].params["ci_fns.0.layers.net.0.W"])


@pytest.mark.slow  # torch.compile: 24 s
def test_compiled_ci_functions_match_eager():
    """compile_ci=True runs the CI functions through torch.compile: the same training trajectory."""
    batches = [torch.randn(32, 5, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    decs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = SPDConfig(C=3, steps=6, lr=1e-2, log_every=1, compile_ci=compiled, faithfulness_warmup_steps=2)
        decs.append(decompose(_mlp(), batches, cfg, ["0", "2"], progress=False))
    eager, compiled = decs
    assert eager.history[-1]["total"] == pytest.approx(compiled.history[-1]["total"], rel=1e-4)
    for n, p in eager.params.items():
        torch.testing.assert_close(compiled.params[n], p, rtol=1e-4, atol=1e-6)


def test_resume_after_a_crash_is_exact(tmp_path):
    cfg = SPDConfig(C=3, steps=30, lr=1e-2, log_every=5, checkpoint_every=10)
    full = decompose(_mlp(), lambda: torch.randn(32, 5), cfg, ["0", "2"], progress=False)

    def crash(step, terms):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(_mlp(), lambda: torch.randn(32, 5), cfg, ["0", "2"], progress=False, checkpoint_dir=tmp_path, callback=crash)
    resumed = decompose(_mlp(), lambda: torch.randn(32, 5), cfg, ["0", "2"], progress=False, checkpoint_dir=tmp_path)
    for n, p in full.params.items():
        assert torch.equal(resumed.params[n], p), n


def test_loss_terms_of_a_token_model_per_position():
    """On token sequences every (sample, position) is a row: the minimality averages g⁺ over all of them,
    L0 counts per position, and with every mask and Δ-mask at 1 the model is the target."""
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    cfg = SPDConfig(C=3, output_loss="kl", ci_fn="shared_mlp")
    method = method_for(cfg)
    cm = method.build(emb, ["0", "1"])
    x = torch.randint(0, 7, (2, 5))
    terms = loss_terms(cm, x, cfg)
    assert set(terms) >= {"total", "stochastic_recon", "stochastic_recon_layerwise", "importance_minimality", "l0"}
    ci = method.causal_importances(cm, x)
    assert ci["0"].shape == (2, 5, 3) and ci["1"].shape == (2, 5, 3)
    up = method.causal_importances(cm, x, upper_leaky=True)
    assert terms["importance_minimality"].item() == pytest.approx(sum(g.sum(-1).mean().item() for g in up.values()), rel=1e-5)
    assert terms["l0"].item() == pytest.approx(sum((g > 0.1).float().sum(-1).mean().item() for g in ci.values()), rel=1e-6)
    with torch.no_grad():
        ones = {n: torch.ones(2, 5, 3) for n in ci}
        torch.testing.assert_close(cm(x, masks=ones, weight_delta_masks={n: torch.ones(2, 5) for n in ci}), emb(x))
        assert not torch.allclose(cm(x, masks=ones), emb(x), atol=1e-3)
