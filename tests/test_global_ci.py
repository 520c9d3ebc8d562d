"""The global causal-importance function (apd.global_ci, ``ci_fn=global_mlp``)."""

import math

import pytest
import torch
from torch import nn

from apd import SPDConfig
from apd.ci_functions import CIFn, make_ci_fn
from apd.decomposition import load_decomposition
from apd.global_ci import GlobalMLPCI, rms_normalise
from apd.methods import method_for
from apd.methods.spd import CI_FNS, ci_functions
from apd.train import decompose


def _mlp_target() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).requires_grad_(False)


def _inputs(cm, x):
    with torch.no_grad(), cm.capture(cm.layer_names, inputs=True) as a_in:
        cm(x)
    return dict(a_in)


def test_one_network_reads_every_layers_input_and_gives_every_layers_C():
    method = method_for(SPDConfig(C=6, ci_fn="global_mlp", ci_hidden=[7], C_per_module={"2": 2}))
    cm = method.build(_mlp_target(), ["0", "2"])
    fns = ci_functions(cm)
    assert isinstance(fns, GlobalMLPCI)
    # input widths 5 + 4 concatenated, outputs 6 + 2; its parameters are the method module's
    assert fns.net[0].weight.shape == (7, 9) and fns.net[2].weight.shape == (8, 7)
    assert {n for n in cm.trainable_parameters() if n.startswith(CI_FNS)} == {
        f"{CI_FNS}.net.0.weight", f"{CI_FNS}.net.0.bias", f"{CI_FNS}.net.2.weight", f"{CI_FNS}.net.2.bias"}  # fmt: skip
    g = method.causal_importances(cm, torch.randn(10, 5))
    assert g["0"].shape == (10, 6) and g["2"].shape == (10, 2)
    assert all(((v >= 0) & (v <= 1)).all() for v in g.values())


def test_the_pre_activations_are_the_written_out_network():
    method = method_for(SPDConfig(C=3, ci_fn="global_mlp", ci_hidden=[5], leaky_alpha=0.0))
    cm = method.build(_mlp_target(), ["0", "2"])
    fns = ci_functions(cm)
    x = torch.randn(4, 5)
    a = _inputs(cm, x)
    z = torch.cat([a["0"] / a["0"].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(),
                   a["2"] / a["2"].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()], -1)  # fmt: skip
    h = z @ fns.net[0].weight.T + fns.net[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    pre = h @ fns.net[2].weight.T + fns.net[2].bias
    g, _ = method.importances_from_inputs(cm, a)
    torch.testing.assert_close(g["0"], pre[:, :3].clamp(0, 1))
    torch.testing.assert_close(g["2"], pre[:, 3:].clamp(0, 1))


def test_a_layers_importances_use_another_layers_input():
    """Perturbing only layer 2's input moves layer 0's g under global_mlp, and not under shared_mlp
    (the control: a per-layer function cannot see it). Rescaling an input changes nothing (RMS norm)."""
    x = torch.randn(16, 5)
    for kind, moves in (("global_mlp", True), ("shared_mlp", False)):
        method = method_for(SPDConfig(C=4, ci_fn=kind, ci_hidden=[8]))
        cm = method.build(_mlp_target(), ["0", "2"])
        with torch.no_grad():  # a bias in the last layer so that g is inside (0, 1), where it can move
            fn = ci_functions(cm) if kind == "global_mlp" else ci_functions(cm).fn("0").layers
            fn.net[-1].bias.fill_(0.5)
        a = _inputs(cm, x)
        g, _ = method.importances_from_inputs(cm, a)
        g_moved, _ = method.importances_from_inputs(cm, a | {"2": a["2"] + torch.randn_like(a["2"])})
        assert (g_moved["0"] - g["0"]).abs().max() > 1e-3 if moves else torch.equal(g_moved["0"], g["0"])
        if kind == "global_mlp":
            g_scaled, _ = method.importances_from_inputs(cm, a | {"2": 10 * a["2"]})
            torch.testing.assert_close(g_scaled["0"], g["0"], atol=1e-5, rtol=1e-5)


def test_rms_normalise_by_hand():
    torch.testing.assert_close(rms_normalise(torch.tensor([3.0, 4.0]), eps=0.0), torch.tensor([3.0, 4.0]) / math.sqrt(12.5))


def test_an_embedding_reads_its_inner_activations_per_position():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).requires_grad_(False)
    method = method_for(SPDConfig(C=5, ci_fn="global_mlp", ci_hidden=[6]))
    cm = method.build(target, ["0", "1"])
    assert ci_functions(cm).net[0].weight.shape == (6, 5 + 4)  # the embedding's C inner activations, the linear's 4 inputs
    g = method.causal_importances(cm, torch.randint(0, 7, (2, 3)))
    assert g["0"].shape == (2, 3, 5) and g["1"].shape == (2, 3, 5)


def test_layers_with_different_positions_are_refused_with_the_fix():
    fn = GlobalMLPCI({"a": (2, 3, False), "b": (2, 3, False)}, [4], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="per-layer ci_fn"):
        fn({"a": torch.randn(5, 3), "b": torch.randn(5, 2, 3)}, {})
    with pytest.raises(ValueError, match="not a per-layer function"):
        make_ci_fn(CIFn.global_mlp, 2, 3, [4], torch.Generator())


def test_trains_saves_and_loads_through_decompose(tmp_path):
    target = _mlp_target()
    cfg = SPDConfig(C=4, ci_fn="global_mlp", ci_hidden=[8], steps=15, lr=1e-2, log_every=5, faithfulness_warmup_steps=5)
    torch.manual_seed(1)
    dec = decompose(target, lambda: torch.randn(8, 5), cfg, modules=["0", "2"], progress=False)
    before = method_for(cfg).build(target, ["0", "2"]).trainable_parameters()
    assert any(not torch.equal(before[n], dec.params[n]) for n in dec.params if n.startswith(CI_FNS))  # the network trained
    loaded = load_decomposition(dec.save(tmp_path))
    assert loaded.config.ci_fn is CIFn.global_mlp
    x = torch.randn(9, 5)
    a, b = dec.causal_importances(x), loaded.causal_importances(x, target)
    assert set(a) == {"0", "2"} and all(torch.equal(a[n], b[n]) for n in a)


def test_compile_ci_off_and_auto_leave_the_global_function_eager():
    """``compile_ci`` is an Enum whose every member is truthy: only ``on`` compiles the global function."""
    for choice, compiled in (("off", False), ("auto", False), ("on", True)):
        cm = method_for(SPDConfig(C=3, ci_fn="global_mlp", compile_ci=choice)).build(_mlp_target(), ["0", "2"])
        assert ("forward" in cm.method_module(CI_FNS).__dict__) is compiled, choice
