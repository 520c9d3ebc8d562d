"""VPD's adversarial masks (apd.pgd, apd.losses.adversarial_recon) against hand-worked values.

The toy: one bias-free linear map y = w·x with w = (2, 1, −1), decomposed into its three columns
(U_c V_cᵀ = w_c e_cᵀ), on x = (1, 1, 1). Under masks m = g + (1 − g)·r the output error is
e = Σ_c (1 − g_c)(1 − r_c) w_c and D = e² (MSE of one output). With g = (0, 0.5, 0), u = (1 − g)·w
= (2, 0.5, −1): e = 2(1 − r_1) + 0.5(1 − r_2) − (1 − r_3). The worst sources over [0, 1]³ are the
vertex r = (0, 0, 1): e = 2.5, D = 6.25 (the other sign's best vertex (1, 1, 0) gives only 1).
From r = 0.5 everywhere e = 0.75 > 0, so every sign-gradient step of s moves (r_1, r_2) down and
r_3 up: after k steps (before the box's faces) e = 0.75 + 3.5·s·k. The expectation under random
r ~ U(0, 1): E[e²] = (Σ u_c / 2)² + Σ u_c² / 12 = 0.5625 + 0.4375 = 1.0.
"""

import pytest
import torch
from torch import nn

from apd import SPDConfig
from apd.config import ConfigError
from apd.losses import LOSSES
from apd.methods import method_for
from apd.methods.spd import ci_functions
from apd.pgd import AdversarialForm, PersistentSources, adversarial_distance, ascend, attack_kl, attack_ladder, persistent_sources
from apd.train import decompose

W = torch.tensor([[2.0, 1.0, -1.0]])
G = torch.tensor([0.0, 0.5, 0.0])


def _toy(**overrides):
    """The hand-worked toy's component model, with its CI function pinned to output G exactly
    (shared_mlp with a zero last weight: g = clamp(bias))."""
    settings = dict(C=3, ci_fn="shared_mlp", delta_component=False, faithfulness_coeff=1.0, faithfulness_warmup_steps=0,
                    stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None, adversarial_recon_coeff=1.0,
                    adversarial_steps=2, adversarial_step_size=0.1)  # fmt: skip
    cfg = SPDConfig(**(settings | overrides))
    target = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        target[0].weight.copy_(W)
    target.requires_grad_(False)
    method = method_for(cfg)
    cm = method.build(target, ["0"])
    layer = cm.layers["0"]
    with torch.no_grad():
        layer.A.copy_(torch.eye(3)[:, None, :])  # V_c = e_c
        layer.B.copy_(W.T[:, :, None])  # U_c = w_c
        last = ci_functions(cm).fn("0").layers.net[-1]
        last.weight.zero_()
        last.bias.copy_(G)
    return method, cm


def test_the_toys_causal_importances_are_pinned():
    method, cm = _toy()
    torch.testing.assert_close(method.causal_importances(cm, torch.ones(1, 3))["0"], G[None])


def test_ascent_hand_worked_steps_projection_and_the_worst_vertex():
    _, cm = _toy()
    x = torch.ones(1, 3)
    target = cm(x)
    ci = {"0": G[None]}
    start = {"0": torch.full((1, 3), 0.5)}
    for k, s in [(0, 0.1), (1, 0.1), (2, 0.1), (2, 0.2)]:
        r, rd = ascend(cm, x, target, ci, start, None, n_steps=k, step_size=s, kind="mse")
        torch.testing.assert_close(r["0"], torch.tensor([[0.5 - s * k, 0.5 - s * k, 0.5 + s * k]]))
        d = adversarial_distance(cm, x, target, ci, r, rd, "mse")
        assert float(d.detach()) == pytest.approx((0.75 + 3.5 * s * k) ** 2, rel=1e-5)
        assert rd is None
    # 7 steps of 0.1 overshoot the box from 0.5: projected onto the faces, the worst vertex (0, 0, 1)
    r, _ = ascend(cm, x, target, ci, start, None, n_steps=7, step_size=0.1, kind="mse")
    torch.testing.assert_close(r["0"], torch.tensor([[0.0, 0.0, 1.0]]))
    assert float(adversarial_distance(cm, x, target, ci, r, None, "mse").detach()) == pytest.approx(6.25)
    torch.testing.assert_close(start["0"], torch.full((1, 3), 0.5))  # the given sources are not changed


def test_the_training_loss_persists_its_sources_across_steps_hand_worked():
    """adversarial_steps=2 of 0.1 per training step, from r = 0.5: the loss after 2, 4, then 6 ascent
    steps (the last two projected onto the vertex), each step starting where the last one ended."""
    method, cm = _toy()
    x = torch.ones(1, 3)
    state = persistent_sources(cm)
    state.sources = {"0": torch.full((1, 3), 0.5)}
    expected = [(0.75 + 3.5 * 0.2) ** 2, (0.75 + 3.5 * 0.4) ** 2, 6.25]
    sources = [[0.3, 0.3, 0.7], [0.1, 0.1, 0.9], [0.0, 0.0, 1.0]]
    for step, (want, r) in enumerate(zip(expected, sources)):
        ctx = method.step_context(cm, x, step)
        loss = LOSSES["adversarial_recon"].fn(ctx)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
        torch.testing.assert_close(state.sources["0"], torch.tensor([r]))
        assert not state.sources["0"].requires_grad
    # the gradient reaches the CI function with the sources held at (0, 0, 1): dD/dg_2 = 2e·(−w_2)(1 − r_2) = −5
    loss.backward()
    bias_grad = ci_functions(cm).fn("0").layers.net[-1].bias.grad
    assert float(bias_grad[1]) == pytest.approx(-5.0, rel=1e-5)
    assert cm.layers["0"].B.grad is not None and cm.layers["0"].B.grad.abs().sum() > 0


def test_the_adversarial_loss_exceeds_the_stochastic_loss_at_the_same_g():
    """On the toy the random-mask expectation is 1.0; the adversary's value after one training step
    (2 ascent steps of 0.5 from random sources) must be at least that, and the stochastic loss of
    the same step context (many samples) must agree with the expectation."""
    method, cm = _toy(adversarial_step_size=0.5, stochastic_recon_coeff=1.0, n_mask_samples=4000)
    torch.manual_seed(0)
    x = torch.ones(64, 3)  # 64 rows: 64 independent persistent sources
    ctx = method.step_context(cm, x, 0)
    stochastic = float(LOSSES["stochastic_recon"].fn(ctx).detach())
    assert stochastic == pytest.approx(1.0, abs=0.02)
    adversarial = float(LOSSES["adversarial_recon"].fn(ctx).detach())
    assert adversarial >= stochastic
    # 2 sign steps of 0.5 take every row to a vertex: (0, 0, 1) (D = 6.25) from a start with e > 0, else (1, 1, 0) (D = 1)
    r = persistent_sources(cm).sources["0"]
    rows = list(map(tuple, r.tolist()))
    assert set(rows) <= {(0.0, 0.0, 1.0), (1.0, 1.0, 0.0)}
    n_worst = rows.count((0.0, 0.0, 1.0))
    assert adversarial == pytest.approx((6.25 * n_worst + 1.0 * (64 - n_worst)) / 64)


def test_the_layerwise_form_is_the_mean_of_each_layer_attacked_alone():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).requires_grad_(False)
    cfg = SPDConfig(C=5, adversarial_recon_coeff=1.0, adversarial_form="layerwise", adversarial_steps=3,
                    adversarial_step_size=0.2, faithfulness_warmup_steps=0)  # fmt: skip
    method = method_for(cfg)
    cm = method.build(target, ["0", "1"])
    x = torch.randn(8, 3)
    ctx = method.step_context(cm, x, 0)
    state = persistent_sources(cm)
    start_r, start_d = state.get(ctx.ci, True)
    start_r, start_d = dict(start_r), dict(start_d)
    loss = float(LOSSES["adversarial_recon"].fn(ctx).detach())
    each = []
    for n in ("0", "1"):
        r, rd = ascend(cm, x, ctx.target_out, ctx.ci, {n: start_r[n]}, {n: start_d[n]}, n_steps=3, step_size=0.2, kind="mse")
        torch.testing.assert_close(state.sources[n], r[n])
        torch.testing.assert_close(state.delta_sources[n], rd[n])
        each.append(float(adversarial_distance(cm, x, ctx.target_out, ctx.ci, r, rd, "mse").detach()))
    assert loss == pytest.approx(sum(each) / 2, rel=1e-5)
    assert each[0] != each[1]


def test_persistent_sources_restart_where_the_batch_shape_changes():
    state = PersistentSources()
    g = torch.zeros(4, 3)
    r, rd = state.get({"a": g}, True)
    assert r["a"].shape == (4, 3) and rd["a"].shape == (4,) and ((0 <= r["a"]) & (r["a"] <= 1)).all()
    again, _ = state.get({"a": g}, True)
    assert again["a"] is r["a"]
    short, _ = state.get({"a": torch.zeros(2, 3)}, True)
    assert short["a"].shape == (2, 3)
    loaded = PersistentSources()
    loaded.load_state_dict(state.state_dict())
    torch.testing.assert_close(loaded.sources["a"], state.sources["a"])
    torch.testing.assert_close(loaded.delta_sources["a"], state.delta_sources["a"])


@pytest.mark.parametrize(("field", "value", "words"), [
    ("adversarial_steps", 0, "whole number of ascent steps >= 1"), ("adversarial_steps", 1.5, "whole number"),
    ("adversarial_step_size", 0.0, "(0, 1]"), ("adversarial_step_size", 1.5, "(0, 1]"),
    ("adversarial_form", "sideways", "adversarial_form"),
])  # fmt: skip
def test_bad_adversarial_settings_are_refused_by_name(field, value, words):
    with pytest.raises((ConfigError, ValueError)) as e:
        SPDConfig(adversarial_recon_coeff=1.0, **{field: value})
    assert field in str(e.value) or words in str(e.value)


def test_the_adversarial_loss_alone_is_a_reconstruction_loss():
    SPDConfig(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None, adversarial_recon_coeff=1.0)
    with pytest.raises(ConfigError, match="every reconstruction loss is off"):
        SPDConfig(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None)


def test_seeds_trained_at_once_are_refused_with_the_fix():
    from apd.train import decompose_seeds

    target = nn.Sequential(nn.Linear(3, 2)).requires_grad_(False)
    cfg = SPDConfig(C=2, steps=2, adversarial_recon_coeff=1.0, faithfulness_warmup_steps=0)
    with pytest.raises(ConfigError, match="train each seed on its own"):
        decompose_seeds(target, lambda: torch.randn(4, 3), cfg, modules=["0"], seeds=[0, 1], progress=False)


def test_a_resumed_run_continues_with_its_saved_sources_exactly(tmp_path):
    """The persistent sources travel in the checkpoint: a run stopped after its step-5 checkpoint and
    resumed ends with the same components, and the same adversarial losses, as an uninterrupted one."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).requires_grad_(False)
    cfg = SPDConfig(C=4, steps=10, lr=1e-2, log_every=1, adversarial_recon_coeff=1.0, faithfulness_warmup_steps=2,
                    checkpoint_every=5)  # fmt: skip

    def data():
        return torch.randn(6, 5)

    torch.manual_seed(1)
    full = decompose(target, data, cfg, modules=["0", "2"], progress=False)

    class Stop(Exception):
        pass

    def stop(step, terms):
        if step == 6:
            raise Stop

    torch.manual_seed(1)
    with pytest.raises(Stop):
        decompose(target, data, cfg, modules=["0", "2"], checkpoint_dir=tmp_path, callback=stop, progress=False)
    from apd.checkpoint import read_checkpoint

    saved = read_checkpoint(tmp_path / "checkpoint.pt")
    assert saved.step == 5 and set(saved.method_state[0]) == {"sources.0", "sources.2", "delta_sources.0", "delta_sources.2"}
    resumed = decompose(target, data, cfg, modules=["0", "2"], checkpoint_dir=tmp_path, progress=False)
    assert [h["adversarial_recon"] for h in resumed.history] == [h["adversarial_recon"] for h in full.history]
    for k in full.params:
        torch.testing.assert_close(resumed.params[k], full.params[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the evaluation attack
def test_the_attack_on_the_toy_hand_worked():
    """Shared over the batch, from the seeded random start: 0 steps is D at that start; enough steps
    reach the worst vertex's 6.25 on rows of x = (1, 1, 1) (a start with e > 0 is what seed 0 draws)."""
    _, cm = _toy()
    x = torch.ones(3, 3)
    ci = {"0": G.expand(3, 3)}
    r0 = torch.rand((1, 3), generator=torch.Generator().manual_seed(0))
    e0 = float(((1 - G) * W[0] * (1 - r0[0])).sum())
    assert e0 > 0
    assert attack_kl(cm, x, ci=ci, n_steps=0, seed=0) == pytest.approx(e0**2, rel=1e-5)
    assert attack_kl(cm, x, ci=ci, n_steps=20, step_size=0.1, seed=0) == pytest.approx(6.25)
    assert attack_kl(cm, x, ci=ci, n_steps=1, step_size=0.1, seed=0) == pytest.approx((e0 + 0.35) ** 2, rel=1e-5)


def test_the_attack_on_a_trained_decomposition_beats_random_sources_and_grows_with_its_steps():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).requires_grad_(False)
    cfg = SPDConfig(C=8, steps=30, lr=1e-2, log_every=10, faithfulness_warmup_steps=20)
    dec = decompose(target, lambda: torch.randn(16, 6), cfg, modules=["0", "2"], progress=False)
    x = torch.randn(64, 6)
    random = attack_kl(dec, x, n_steps=0, seed=3)
    ladder = attack_ladder(dec, x, steps=(0, 1, 2, 5, 20), seed=3)
    assert ladder[0] == pytest.approx(random)
    values = list(ladder.values())
    assert all(b >= a for a, b in zip(values, values[1:])), ladder
    assert ladder[20] > 1.5 * random
    # per-row sources are a stronger adversary than shared ones (more freedom), from the same seed
    assert attack_kl(dec, x, n_steps=20, seed=3, shared_over_batch=False) >= ladder[20]
    assert attack_kl(dec, x, n_steps=20, seed=3, form=AdversarialForm.layerwise) > 0


def test_the_attack_refuses_bad_arguments_with_the_fix():
    _, cm = _toy()
    x = torch.ones(1, 3)
    with pytest.raises(ValueError, match="needs its causal importances"):
        attack_kl(cm, x)
    with pytest.raises(ValueError, match="n_steps"):
        attack_kl(cm, x, ci={"0": G[None]}, n_steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        attack_kl(cm, x, ci={"0": G[None]}, step_size=0)
