import math

import pytest
import torch

from apd.config import OutputLoss
from apd.config import FaithfulnessNorm
from apd.losses import act_recon_loss, faithfulness_loss, lp_sparsity_loss, minimality_loss, simplicity_loss
from apd.losses.lp_sparsity import lp_sparsity_per_component


def test_faithfulness_hand_worked():
    W = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[0.0], [3.0]])}
    summed = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0], [3.0]])}
    # squared errors: a -> 4, b -> 1; N = 2 + 2 = 4
    assert faithfulness_loss(W, summed).item() == pytest.approx(5 / 4)
    # relative: a -> 4 / ‖W_a‖² = 4 / 5, b -> 1 / 9, averaged over the 2 matrices
    assert faithfulness_loss(W, summed, FaithfulnessNorm.relative).item() == pytest.approx((4 / 5 + 1 / 9) / 2)
    # scale-free: the same relative error at 1000x smaller weights costs the same (entries: 1e-6 of it)
    small = ({n: w * 1e-3 for n, w in W.items()}, {n: w * 1e-3 for n, w in summed.items()})
    assert faithfulness_loss(*small, "relative").item() == pytest.approx((4 / 5 + 1 / 9) / 2)
    assert faithfulness_loss(*small).item() == pytest.approx(5 / 4 * 1e-6)
    # a zero weight matrix counts its squared distance alone
    assert faithfulness_loss({"z": torch.zeros(1, 2)}, {"z": torch.tensor([[1.0, 1.0]])}, "relative").item() == pytest.approx(2.0)


def test_spd_uses_the_relative_faithfulness_by_default_and_apd_the_papers():
    from apd import APDConfig, SPDConfig
    from apd.methods import method_for

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(8, 3)
    for cfg, norm in [(SPDConfig(C=3), FaithfulnessNorm.relative), (SPDConfig(C=3, faithfulness_norm="entries"), "entries"),
                      (APDConfig(C=3, topk=1.0), "entries")]:  # fmt: skip
        method = method_for(cfg)
        cm = method.build(model, ["0", "2"])
        with torch.no_grad():
            for p in cm.trainable_parameters().values():
                p.mul_(0.5)  # off the weights
        term = method.loss_terms(cm, x, step=0)["faithfulness"]
        assert term.item() == pytest.approx(faithfulness_loss(cm.target_weights(), cm.summed_weights(), norm).item(), rel=1e-6)


def test_minimality_mse_and_kl_hand_worked():
    t, m = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    assert minimality_loss(t, m, OutputLoss.mse).item() == pytest.approx((1 + 4) / 4)
    logits_t, logits_m = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    p = torch.tensor([0.25, 0.75])  # softmax of target logits; decomposed is uniform
    kl = (p * (p / 0.5).log()).sum().item()
    assert minimality_loss(logits_t, logits_m, OutputLoss.kl).item() == pytest.approx(kl, rel=1e-5)
    assert minimality_loss(logits_t, logits_t, OutputLoss.kl).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="shapes differ"):
        minimality_loss(t, m[:1])


def test_simplicity_hand_worked():
    # one matrix, C = 2 components of rank m = 2
    A = {"w": torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])}  # (C, m, d_in): row norms² 25, 1 | 1, 0
    B = {"w": torch.tensor([[[1.0, 0.0]], [[2.0, 5.0]]])}  # (C, d_out=1, m): col norms² 1, 0 | 4, 25
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # component terms with p = 1: c0 = sqrt(25·1) + sqrt(1·0) = 5; c1 = sqrt(1·4) + sqrt(0·25) = 2
    # Σ_b Σ_c s·term = 5 + (5 + 2) + 0 = 12; N = 2 weights, batch 3 -> 12 / 6
    assert simplicity_loss(A, B, mask, p=1.0, n_weights=2, eps=0.0).item() == pytest.approx(2.0)
    # p = 0.5: c0 = 25**0.25 = sqrt5, c1 = 4**0.25 = sqrt2
    expected = (2 * math.sqrt(5) + math.sqrt(2)) / 6
    assert simplicity_loss(A, B, mask, p=0.5, n_weights=2, eps=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_simplicity_gradient_is_finite_at_zero_with_eps():
    A = {"w": torch.zeros(2, 1, 3, requires_grad=True)}
    B = {"w": torch.zeros(2, 3, 1, requires_grad=True)}
    simplicity_loss(A, B, torch.ones(4, 2), p=0.9, n_weights=9).backward()
    assert torch.isfinite(A["w"].grad).all() and torch.isfinite(B["w"].grad).all()


def test_act_recon_and_lp_hand_worked():
    t = {"h1": torch.tensor([[1.0, 1.0]]), "h2": torch.tensor([[0.0]])}
    m = {"h1": torch.tensor([[0.0, 1.0]]), "h2": torch.tensor([[2.0]])}
    assert act_recon_loss(t, m).item() == pytest.approx((0.5 + 4.0) / 2)
    with pytest.raises(ValueError):
        act_recon_loss(t, {"h1": m["h1"]})
    attr = torch.tensor([[4.0, 0.0, 1.0], [9.0, 1.0, 0.0]])
    # |A_c|^p with A_c = sqrt(attribution) (the attributions are sums of squares): p = 1 penalises |A|, not A²
    assert lp_sparsity_loss(attr, p=1.0, eps=0.0).item() == pytest.approx(((2 + 0 + 1) + (3 + 1 + 0)) / 2)
    assert lp_sparsity_loss(attr, p=0.5, eps=0.0).item() == pytest.approx(((2**0.5 + 0 + 1) + (3**0.5 + 1 + 0)) / 2)
    assert lp_sparsity_loss(attr, p=2.0, eps=0.0).item() == pytest.approx((5 + 10) / 2)  # p = 2: the attribution itself


def test_default_eps_is_negligible_and_eps_enters_inside_the_power():
    from apd.losses.importance_minimality import importance_minimality_loss

    zeros = torch.zeros(3, 2)
    assert importance_minimality_loss({"a": zeros}, p=1.0).item() < 1e-9
    assert lp_sparsity_loss(zeros, p=2.0).item() < 1e-9
    assert lp_sparsity_per_component(zeros, p=2.0).max().item() < 1e-9
    A, B = {"w": torch.zeros(2, 1, 3)}, {"w": torch.zeros(2, 3, 1)}
    assert simplicity_loss(A, B, torch.ones(4, 2), p=2.0, n_weights=9).item() < 1e-9
    # ε = 1: (A + 1)^{p/2} per component; rows (4 + 1)^1 + (0 + 1)^1 = 6 and (0 + 1) + (3 + 1) = 5
    attr = torch.tensor([[4.0, 0.0], [0.0, 3.0]])
    assert lp_sparsity_loss(attr, p=2.0, eps=1.0).item() == pytest.approx((6 + 5) / 2)
    assert importance_minimality_loss({"a": attr}, p=2.0, eps=1.0).item() == pytest.approx((25 + 1) / 2 + (1 + 16) / 2)


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_importance_minimality_gradient_is_p_g_to_the_p_minus_1_over_rows(p):
    """d/dg of Σ_c mean_rows (g + ε)^p is p (g + ε)^(p−1) / rows, by hand (p 1 takes a path without pow)."""
    from apd.losses.importance_minimality import importance_minimality_loss

    g = torch.tensor([[0.5, 0.0, 2.0], [1.5, 0.25, 1.0]], dtype=torch.float64, requires_grad=True)
    eps = 0.1
    importance_minimality_loss({"a": g}, p=p, eps=eps).backward()
    torch.testing.assert_close(g.grad, p * (g.detach() + eps) ** (p - 1) / 2)


def test_per_position_rows_of_simplicity_and_lp():
    """[B, T, C] masks and attributions: every (sample, position) is a row, with T != C."""
    A = {"w": torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])}  # (C=2, m=1, d_in=2): ‖A‖² 25, 1
    B = {"w": torch.tensor([[[1.0]], [[2.0]]])}  # (C, d_out=1, m): ‖B‖² 1, 4 -> terms (p = 1) 5, 2
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])  # B = 1, T = 3
    # Σ rows·terms = 5 + 7 + 2 = 14 over N = 2 weights and 3 rows
    assert simplicity_loss(A, B, mask, p=1.0, n_weights=2, eps=0.0).item() == pytest.approx(14 / 6)
    attr = torch.tensor([[[4.0, 0.0], [1.0, 9.0], [0.0, 0.0]]])  # rows: 2, 1 + 3, 0
    assert lp_sparsity_loss(attr, p=1.0, eps=0.0).item() == pytest.approx(6 / 3)


def test_act_recon_says_which_activations_differ():
    with pytest.raises(ValueError, match=r"activation sets differ or are empty: \['h1', 'h2'\] vs \['h1'\]"):
        act_recon_loss({"h1": torch.zeros(1), "h2": torch.zeros(1)}, {"h1": torch.zeros(1)})


def test_a_registered_loss_is_recorded_ordered_and_needs_its_coefficient(monkeypatch):
    """register_loss records name, function, order (100 by default) and captured modules; losses_for
    keeps the named losses (a method's ``loss_names``) with a positive coefficient, by (order, name);
    a duplicate name, an unknown name and a loss whose config lacks ``<name>_coeff`` are refused."""
    from apd import SPDConfig
    from apd.losses import LOSSES, losses_for, register_loss
    from apd.methods import SPD

    monkeypatch.setattr("apd.losses.registry.LOSSES", dict(LOSSES))  # registrations below stay in this test
    from apd.losses import registry

    def captures(config):
        return ["fc*"]

    def fn(ctx):
        return torch.tensor(1.0)

    assert register_loss("zz_test", captures=captures)(fn) is fn
    loss = registry.LOSSES["zz_test"]
    assert (loss.name, loss.fn, loss.order, loss.captures) == ("zz_test", fn, 100, captures)
    with pytest.raises(ValueError, match=r"a loss named 'zz_test' is already registered \(by tests.test_losses\); pick another name"):
        register_loss("zz_test")(fn)
    with pytest.raises(TypeError, match="the loss 'zz_test' is summed by SPDConfig's method but the config has no field zz_test_coeff"):
        registry.losses_for([*SPD.loss_names, "zz_test"], SPDConfig())
    with pytest.raises(ValueError, match=r"no loss is registered under \['zz_nope'\]"):
        registry.losses_for(["zz_nope"], SPDConfig())
    del registry.LOSSES["zz_test"]
    names = [l.name for l in registry.losses_for(SPD.loss_names, SPDConfig(faithfulness_coeff=1.0, ci_masked_recon_coeff=0.5))]
    assert names == ["faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "ci_masked_recon", "importance_minimality"]
    assert [l.name for l in losses_for(SPD.loss_names, SPDConfig())] == ["faithfulness", "stochastic_recon", "stochastic_recon_layerwise",
                                                                     "importance_minimality"]


def test_kl_of_sequence_logits_sums_over_the_vocabulary_and_averages_over_positions():
    """[B, T, V] logits: KL(softmax(target) ‖ softmax(out)) per position over the last dimension, then
    the mean over (sample, position). Position 0: p = (1/4, 3/4) against uniform; position 1: equal."""
    from apd.losses.distance import output_distance

    target = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])  # B = 1, T = 2, V = 2
    out = torch.tensor([[[5.0, 5.0], [1.0, 2.0]]])
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert output_distance(target, out, OutputLoss.kl).item() == pytest.approx(kl0 / 2, rel=1e-5)
    # V = 3 != T = 2: a softmax over the wrong dimension gives another number
    t3 = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]]])
    o3 = torch.zeros(1, 2, 3)
    p = torch.tensor([0.25, 0.25, 0.5])
    kl = float((p * (p * 3).log()).sum())
    assert output_distance(t3, o3, OutputLoss.kl).item() == pytest.approx(kl / 2, rel=1e-5)


def test_apd_loss_terms_read_the_step_act_recon_and_lp_by_hand():
    """APD in L_p mode (masks all 1): act_recon is the MSE of the captured hidden layer between the target
    and Σ_c P_c; lp_sparsity is L_p of the step's attributions at the configured p; every registered
    APD term is in the total with its coefficient."""
    from torch import nn

    from apd import APDConfig
    from apd.methods import method_for
    from apd.methods.apd import attributions_for

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = APDConfig(C=3, rank=1, topk=None, lp_sparsity_coeff=0.3, lp_sparsity_p=0.7, act_recon_coeff=0.4,
                    act_recon_modules=["1"], simplicity_coeff=0.2)  # fmt: skip
    method = method_for(cfg)
    cm = method.build(model, ["0", "2"])
    x = torch.randn(5, 3)
    terms = method.loss_terms(cm, x, 0, capture=method.capture_names(cm))
    assert set(terms) == {"total", "faithfulness", "minimality", "simplicity", "act_recon", "lp_sparsity", "l0"}
    with torch.no_grad():
        P = cm.summed_weights()
        hidden = torch.relu(x @ model[0].weight.T + model[0].bias)
        hidden_sum = torch.relu(x @ P["0"].T + model[0].bias)
        out_sum = hidden_sum @ P["2"].T + model[2].bias
        attr = attributions_for(cm, x, cfg)
    assert method.capture_names(cm) == ["1"]
    assert terms["act_recon"].item() == pytest.approx(((hidden - hidden_sum) ** 2).mean().item(), rel=1e-5)
    assert terms["minimality"].item() == pytest.approx(((model(x) - out_sum) ** 2).mean().item(), rel=1e-5)
    assert terms["lp_sparsity"].item() == pytest.approx(lp_sparsity_loss(attr, p=0.7).item(), rel=1e-5)
    weighted = {"faithfulness": 1.0, "minimality": 1.0, "simplicity": 0.2, "act_recon": 0.4, "lp_sparsity": 0.3}
    assert terms["total"].item() == pytest.approx(sum(c * terms[n].item() for n, c in weighted.items()), rel=1e-6)
