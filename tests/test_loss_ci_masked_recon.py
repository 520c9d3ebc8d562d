"""The CI-masked reconstruction loss of SPD, by hand, and switched on by its coefficient alone."""

import pytest
import torch
from torch import nn

from apd import SPDConfig
from apd.methods import method_for


def test_ci_masked_recon_is_the_output_distance_under_the_causal_importances():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    cfg = SPDConfig(C=5, ci_masked_recon_coeff=2.0, stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None,
                    faithfulness_coeff=None)
    method = method_for(cfg)
    cm = method.build(model, ["0", "2"])
    x = torch.randn(16, 4)
    terms = method.loss_terms(cm, x, step=0)
    with torch.no_grad():
        expected = (cm(x, masks=method.causal_importances(cm, x)) - model(x)).pow(2).mean()
    assert terms["ci_masked_recon"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(2.0 * expected.item() + 1e-3 * terms["importance_minimality"].item(), rel=1e-6)
    assert "ci_masked_recon" not in method_for(SPDConfig()).loss_terms(cm, x, step=0)  # off by default
