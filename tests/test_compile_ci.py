"""``SPDConfig.compile_ci``: off/on/auto (true/false of older configs read as on/off), and auto's
decision by run length at the first training step."""

import pytest
import torch
from torch import nn

import apd.methods.spd as spd
from apd import ConfigError, SPDConfig
from apd.methods import method_for
from apd.methods.spd import AUTO_COMPILE_ACTIVATION_STEPS, CompileCI, ci_functions


@pytest.mark.parametrize("value,member", [(True, CompileCI.on), (False, CompileCI.off), ("true", CompileCI.on),
                                          ("False", CompileCI.off), ("auto", CompileCI.auto), ("on", CompileCI.on)])  # fmt: skip
def test_compile_ci_reads_old_booleans_and_the_new_names(value, member):
    assert SPDConfig(compile_ci=value).compile_ci is member


def test_a_bad_compile_ci_names_the_choices():
    with pytest.raises(ConfigError, match="compile_ci='sometimes': expected one of 'off', 'on', 'auto'"):
        SPDConfig(compile_ci="sometimes")


def _compiled_marker(monkeypatch):
    """torch.compile replaced by a wrapper that records what it wraps and runs it eagerly (the
    decision is under test here, not inductor; tests/test_spd.py compiles for real)."""
    wrapped = []

    def fake_compile(fn):
        wrapped.append(fn)
        return fn

    monkeypatch.setattr(spd.torch, "compile", fake_compile)
    return wrapped


@pytest.mark.parametrize("steps,compiled", [(10, False), (10**9, True)])
def test_auto_compiles_the_ci_functions_only_when_the_run_is_long_enough(monkeypatch, steps, compiled):
    wrapped = _compiled_marker(monkeypatch)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    method = method_for(SPDConfig(C=3, steps=steps, compile_ci="auto", ci_hidden=[4]))
    cm = method.build(model, ["0", "2"])
    assert wrapped == []  # nothing decided before the first training step
    x = torch.randn(16, 5)
    with torch.no_grad():
        method.causal_importances(cm, x)  # evaluation does not decide
    method.causal_importances(cm, x)["0"].sum().backward()  # nor a user's gradient through g (a loaded decomposition)
    assert wrapped == [] and ci_functions(cm).auto_compile_steps == steps
    method.loss_terms(cm, x, 0)["total"].backward()
    # 16 rows · 3 subcomponents · 4 hidden per layer use, 2 uses: 384 activations a step
    assert (steps * 384 >= AUTO_COMPILE_ACTIVATION_STEPS) is compiled
    assert len(wrapped) == (2 if compiled else 0)
    assert ci_functions(cm).auto_compile_steps is None  # decided once
    method.loss_terms(cm, x, 1)
    assert len(wrapped) == (2 if compiled else 0)


def test_auto_leaves_other_ci_functions_and_seed_runs_eager(monkeypatch):
    wrapped = _compiled_marker(monkeypatch)
    model = nn.Sequential(nn.Linear(5, 4))
    method = method_for(SPDConfig(C=3, steps=10**12, compile_ci="auto", ci_fn="shared_mlp"))
    cm = method.build(model, ["0"])
    method.loss_terms(cm, torch.randn(8, 5), 0)["total"].backward()
    assert wrapped == []
    assert method_for(SPDConfig(compile_ci="auto")).vectorised().config.compile_ci is CompileCI.off
