"""SPD's step takes from the target pass what it already computed (the modules before a masked pass's
first masked layer, that layer's W a): the same losses and gradients as running every pass in full."""

import contextlib

import pytest
import torch
from torch import nn

from apd import ComponentModel, SPDConfig, decompose_seeds
from apd.methods import method_for
from apd.toy_models.lm import LMConfig, TransformerLM
from apd.toy_models.resid_mlp import ResidMLP, ResidMLPConfig
from apd.toy_models.tms import TMS, TMSConfig


def _full_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the reuse off: the step records no calls, so every masked pass runs the whole model."""
    monkeypatch.setattr(ComponentModel, "record_calls", lambda self: contextlib.nullcontext())


class _Double(nn.Module):
    def forward(self, x):
        return x.mul_(2)


class _InPlace(nn.Module):
    """Changes its first layer's output in place after it returned (doubles it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b, self.c = nn.Linear(5, 6, bias=False), _Double(), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(self.act(self.a(x)))))


class _Twice(nn.Module):
    """One Linear applied twice, between two others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.sq, self.out = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.sq(torch.relu(self.sq(self.inp(x)))))


def _case(name: str):
    """(model, modules, batch, config overrides) in float64."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # TMS draws its weights from the global generator
    if name == "resid_mlp_3":
        model = ResidMLP(ResidMLPConfig(n_features=12, d_embed=16, d_mlp=12, n_layers=3))
        x = (torch.rand(16, 12, generator=g) < 0.2) * torch.rand(16, 12, generator=g) * 2 - 1
        return model, ["layers.*.mlp_in", "layers.*.mlp_out"], x, {}
    if name == "tms_id":
        model = TMS(TMSConfig(n_features=5, n_hidden=2, identity=True))
        return model, ["enc", "hidden", "dec"], torch.rand(16, 5, generator=g), {}
    if name == "lm":
        model = TransformerLM(LMConfig(vocab_size=11, seq_len=6, d_model=8, n_heads=2, d_mlp=12))
        return model, ["mlp.up", "mlp.down"], torch.randint(0, 11, (3, 6), generator=g), {"output_loss": "kl", "ci_fn": "shared_mlp"}
    if name == "in_place":
        return _InPlace(), ["a", "b", "c"], torch.randn(16, 5, generator=g), {}
    if name == "twice":
        return _Twice(), ["inp", "sq", "out"], torch.randn(16, 5, generator=g), {}
    raise KeyError(name)


def _terms_and_grads(case: str):
    model, modules, x, extra = _case(case)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    method = method_for(SPDConfig(C=4, ci_masked_recon_coeff=1.0, n_mask_samples=2, **extra))
    cm = method.build(model, modules)
    cm.double()
    torch.manual_seed(3)
    terms = method.loss_terms(cm, x, 0)
    params = cm.trainable_parameters()
    grads = torch.autograd.grad(terms["total"], list(params.values()))
    return {k: v.item() for k, v in terms.items()}, dict(zip(params, grads))


@pytest.mark.parametrize("case", ["resid_mlp_3", "tms_id", "lm", "in_place", "twice"])
def test_reusing_the_target_pass_gives_the_same_losses_and_gradients(case, monkeypatch):
    reused, g_reused = _terms_and_grads(case)
    _full_passes(monkeypatch)
    full, g_full = _terms_and_grads(case)
    assert reused.keys() == full.keys() and reused["stochastic_recon_layerwise"] > 0
    assert reused == pytest.approx(full, rel=1e-12, abs=1e-15)
    for n in g_full:
        torch.testing.assert_close(g_reused[n], g_full[n], rtol=1e-10, atol=1e-14)


def test_reusable_modules_are_the_outermost_ones_called_once_before_the_first_masked_layer():
    method = method_for(SPDConfig(C=3))
    model, modules, x, _ = _case("resid_mlp_3")
    ctx = method.step_context(method.build(model, modules), x, 0)
    r = ctx.record
    assert set(r.reusable("layers.0.mlp_in")) == {"embed"}
    assert set(r.reusable("layers.0.mlp_out")) == {"embed", "layers.0.mlp_in", "layers.0.act"}
    assert set(r.reusable("layers.2.mlp_in")) == {"embed", "layers.0", "layers.1"}  # whole blocks, not their parts
    torch.testing.assert_close(r.reusable("layers.1.mlp_in")["layers.0"], ctx.cm.model.layers[0](x @ model.W_E.T))
    torch.testing.assert_close(r.reusable("layers.0.mlp_in")["embed"], x @ model.W_E.T)
    # a module called twice is never reused; one changed in place after it returned is not either
    ctx2 = method.step_context(method.build(_Twice(), ["inp", "sq", "out"]), x[:, :5], 0)
    assert set(ctx2.record.reusable("out")) == {"inp"} and ctx2.record.calls["sq"] == 2
    ctx3 = method.step_context(method.build(_InPlace(), ["a", "b", "c"]), x[:, :5], 0)
    assert set(ctx3.record.reusable("c")) == {"act", "b"}  # "a"'s output was overwritten in place
    assert not ctx3.record.unchanged("a")


def test_a_module_given_its_output_is_not_run_and_its_output_is_not_shared():
    model = _InPlace()
    cm = ComponentModel(model, ["b"], C=2, rank=1)
    x = torch.randn(4, 5)
    seen = []
    cm.model.a.register_forward_pre_hook(lambda mod, args: seen.append("a"))
    stand_in = torch.ones(4, 6)
    out = cm(x, reuse={"a": stand_in})
    torch.testing.assert_close(out, model.c(torch.tanh(model.b(2 * torch.ones(4, 6)))))
    torch.testing.assert_close(stand_in, torch.ones(4, 6))  # the module after it doubled a copy
    assert "forward" not in cm.model.a.__dict__  # restored
    cm(x)
    assert seen == ["a", "a"]  # its hooks still see the call (the output above shows that its forward did not run)


def test_seeds_at_once_train_the_same_with_and_without_the_reuse(monkeypatch):
    """Under vmap: a few steps of two seeds at once give the same factors either way."""
    from apd.methods.spd import SPD

    monkeypatch.setattr(SPD, "vmap_seeds", lambda self, device: True)
    model, modules, x, _ = _case("resid_mlp_3")
    cfg = SPDConfig(C=3, steps=3, faithfulness_warmup_steps=2, lr=1e-2)

    def run():
        torch.manual_seed(0)
        return decompose_seeds(model, lambda: x, cfg, modules, [0, 1], progress=False)

    reused = run()
    _full_passes(monkeypatch)
    full = run()
    for a, b in zip(reused, full):
        for n in a.params:
            torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-7)


def test_subset_routing_by_hand(monkeypatch):
    """Two layers, two inputs; the draws patched: input 0 routes only the second layer (k = 1), input 1
    both (k = 2). The one pass's loss is the MSE of per-input weights built by hand."""
    import apd.methods.spd as spd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    method = method_for(SPDConfig(C=2, layer_routing="uniform_k_subset", importance_minimality_coeff=None, faithfulness_coeff=None))
    cm = method.build(model, ["0", "1"]).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    r = {"0": torch.tensor([[0.3, 0.6], [0.1, 0.8]]), "1": torch.tensor([[0.5, 0.2], [0.9, 0.4]])}
    r_delta = {"0": torch.tensor([0.25, 0.75]), "1": torch.tensor([0.4, 0.6])}
    draws = iter([r["0"], r_delta["0"], r["1"], r_delta["1"],  # the stochastic masks, layer by layer
                  torch.tensor([0.2, 0.7]),  # k = floor(2u) + 1: 1, 2
                  torch.tensor([[0.9, 0.1], [0.3, 0.5]])])  # the order of the layers: input 0 takes layer 1 first
    monkeypatch.setattr(spd, "rand_rows", lambda like, binary=False: next(draws).to(like.dtype).expand_as(like).clone())
    terms = method.loss_terms(cm, x, 0)
    assert set(terms) == {"total", "stochastic_recon", "l0"}  # the layerwise loss is off: the one pass stands in for it
    ctx = method.step_context(cm, x, 0)  # the same causal importances (the draws above are used up)
    with torch.no_grad():
        P = cm.component_weights()  # [C, d_out, d_in]
        W = cm.target_weights()
        out = []
        for b, routed in enumerate([{"1"}, {"0", "1"}]):
            h = x[b]
            for n in ("0", "1"):
                if n in routed:
                    m = ctx.ci[n][b] + (1 - ctx.ci[n][b]) * r[n][b].double()
                    w = torch.einsum("c,coi->oi", m, P[n]) + r_delta[n][b].double() * (W[n] - P[n].sum(0))
                else:
                    w = W[n]
                h = w @ h
            out.append(h)
        target = model(x)
        want = (torch.stack(out) - target).pow(2).mean()
    assert terms["stochastic_recon"].item() == pytest.approx(want.item(), rel=1e-10)
    assert terms["total"].item() == pytest.approx(want.item(), rel=1e-10)


def test_subset_routes_draw_k_uniformly_then_a_uniform_subset():
    from apd.methods.spd import subset_routes

    torch.manual_seed(0)
    routes = subset_routes({n: torch.zeros(20_000) for n in "abc"})
    on = torch.stack([routes[n] for n in "abc"], -1)
    k = on.sum(-1)
    assert k.min() == 1 and k.max() == 3
    for j in (1, 2, 3):
        assert (k == j).float().mean().item() == pytest.approx(1 / 3, abs=0.015)
    # every layer equally often: E[k]/L = 2/3
    assert on.float().mean(0).tolist() == pytest.approx([2 / 3] * 3, abs=0.015)
    with pytest.raises(ValueError, match="different leading shapes"):
        subset_routes({"a": torch.zeros(4), "b": torch.zeros(4, 2)})


def test_seeds_at_once_one_after_another_equal_the_vmapped_instances(monkeypatch):
    """Seeds at once with their instances run one after another within the step (``vmap_seeds`` False)
    give, with deterministic losses, exactly what vmapping them gives."""
    from apd.methods.spd import SPD

    # faithfulness off: as in tests/test_spd.py's seeds-at-once test (Adam scales its rounding noise near Σ = W)
    cfg = SPDConfig(C=3, steps=6, lr=1e-2, faithfulness_warmup_steps=2, grad_clip_norm=0.5, ci_masked_recon_coeff=1.0, faithfulness_coeff=None,
                    stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None)  # fmt: skip
    model, modules, x, _ = _case("resid_mlp_3")
    assert method_for(cfg).vmap_seeds(torch.device("cpu"))  # the default: vmapped
    monkeypatch.setattr(SPD, "vmap_seeds", lambda self, device: False)
    looped = decompose_seeds(model, lambda: x, cfg, modules, [0, 1], progress=False)
    monkeypatch.setattr(SPD, "vmap_seeds", lambda self, device: True)
    vmapped = decompose_seeds(model, lambda: x, cfg, modules, [0, 1], progress=False)
    for a, b in zip(looped, vmapped):
        assert a.history[-1]["total"] == pytest.approx(b.history[-1]["total"], rel=1e-5)
        for n in a.params:
            torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-7)
