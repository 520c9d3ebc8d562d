"""The rebuilt goodfire-ai/spd step (benchmarks/reference_spd.py) computes the toolkit's SPD loss terms.

From the same state and the same random draws (the toolkit's ``rand_rows`` recorded and replayed),
each loss term of the reference's step equals the toolkit's to float rounding, on small versions of
the benchmark's cases; on an untied target the gradients agree too. The benchmark group
``spd_vs_reference`` (benchmarks/test_spd_reference.py) times the two steps against each other.
"""

import pytest
import torch

from apd import SPDConfig
from apd.methods import method_for
from apd.targets import PRETRAINED_DIR, LMTargetConfig, get_target, load_target
from benchmarks.reference_spd import (
    ReferenceSPD,
    paired_loss_terms,
    reference_loss_terms,
    reference_optimizer,
    reference_train_step,
)

TERMS = ("stochastic_recon", "stochastic_recon_layerwise", "importance_minimality", "total")
CASES = {  # small versions of the presets: (target, SPDConfig kwargs, batch); the LM's hidden width 128 = its d_model (a square CI weight)
    "tms_5_2": ("tms_5_2", dict(C=20, pnorm=1.0, importance_minimality_coeff=3e-3), 64),
    "tms_5_2_id": ("tms_5_2_id", dict(C=20, pnorm=1.0, importance_minimality_coeff=3e-3), 64),
    "resid_mlp_1": ("resid_mlp_1", dict(C=30, pnorm=2.0, importance_minimality_coeff=1e-5, n_mask_samples=2), 32),
    "lm_1l": ("lm_1l", dict(C=32, ci_fn="shared_mlp", ci_hidden=[128], output_loss="kl", importance_minimality_coeff=1e-3,
                            pnorm=2.0, pnorm_final=1.0, pnorm_anneal_end_frac=0.8, steps=100), 2),
}  # fmt: skip


def _build(case: str, **extra):
    name, kwargs, batch = CASES[case]
    if name == "lm_1l":
        tcfg = LMTargetConfig()
        model, _ = get_target(tcfg)
    else:
        model, tcfg, _ = load_target(PRETRAINED_DIR / f"{name}.pt")
    method = method_for(SPDConfig(**{"faithfulness_coeff": None, **kwargs, **extra}))  # as the presets
    cm = method.build(model, tcfg.modules())
    x = tcfg.batch(batch, torch.Generator().manual_seed(0))
    return cm, method, ReferenceSPD.from_toolkit(cm, method, model), x


@pytest.mark.parametrize("case", list(CASES))
def test_reference_step_computes_the_toolkits_loss_terms(case):
    cm, method, ref, x = _build(case)
    step = 50 if case == "lm_1l" else 0  # the LM at half-way through its p annealing (p = 1.375)
    ours, theirs = paired_loss_terms(cm, method, ref, x, step)
    for term in TERMS:
        assert theirs[term] == pytest.approx(ours[term], rel=1e-5), term
    assert ours["stochastic_recon"] > 1e-6 and ours["stochastic_recon_layerwise"] > 1e-6  # not a trivial 0 = 0


def test_fresh_draws_give_another_loss():
    """The agreement above rests on replaying the toolkit's draws: with its own draws the reference's
    reconstruction terms differ (so the comparison can fail)."""
    cm, method, ref, x = _build("resid_mlp_1")
    ours, _ = paired_loss_terms(cm, method, ref, x)
    fresh = reference_loss_terms(ref, x, 0, method.config)
    assert float(fresh["stochastic_recon"].detach()) != pytest.approx(ours["stochastic_recon"], rel=1e-3)
    assert float(fresh["importance_minimality"].detach()) == pytest.approx(ours["importance_minimality"], rel=1e-5)  # no draws in it


def test_reference_gradients_match_the_toolkits_on_an_untied_target():
    """Residual MLP (no tied matrices): the gradients of V, U and the CI functions are the toolkit's
    of Aᵀ, Bᵀ and its CI functions."""
    from apd.methods.spd import ci_functions

    cm, method, ref, x = _build("resid_mlp_1")
    ours, theirs = paired_loss_terms(cm, method, ref, x, tensors=True)
    ours["total"].backward()
    theirs["total"].backward()
    for n in cm.matrix_names:
        layer, comp = cm.layers[n], ref.components[n]
        torch.testing.assert_close(comp.V.grad, layer.A.grad[:, 0, :].T, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(comp.U.grad, layer.B.grad[:, :, 0], rtol=1e-4, atol=1e-9)
        theirs_ci = [p.grad for p in ref.ci_fns[n].parameters()]
        ours_ci = [p.grad for p in ci_functions(cm).fn(n).parameters()]
        for g_ref, g_ours in zip(theirs_ci, ours_ci):
            torch.testing.assert_close(g_ref, g_ours, rtol=1e-4, atol=1e-9)


def test_reference_step_trains():
    """A few reference steps lower its loss (its optimiser and backward are wired up)."""
    cm, method, ref, x = _build("tms_5_2", lr=1e-2, steps=40)
    opt = reference_optimizer(ref, method.config.lr)
    torch.manual_seed(0)
    first = [reference_train_step(ref, opt, x, s, method.config) for s in range(3)]
    for s in range(3, 30):
        reference_train_step(ref, opt, x, s, method.config)
    last = [reference_train_step(ref, opt, x, s, method.config) for s in range(30, 33)]
    assert sum(last) < 0.8 * sum(first)
