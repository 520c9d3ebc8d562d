"""TMS metrics by hand: near-zero columns never win the best cosine; the identity of + ID."""

import pytest
import torch

from apd.metrics.tms import identity_recovery, tms_recovery


def test_a_near_zero_column_never_takes_a_features_best_cosine():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    P = torch.zeros(3, 2, 2)
    P[0] = W * torch.tensor([0.999, 1.0])  # component 0 holds both features (feature 0 slightly off)
    P[0, 1, 0] = 0.02
    P[1, :, 0] = torch.tensor([1e-6, 0.0])  # a dead component pointing exactly along feature 0
    out = tms_recovery(W, P)
    assert out["ml2r"] > 0.99  # without the guard: feature 0's best "match" is the dead one, ML2R ≈ 0.5
    assert out["mmcs"] < 1.0


def test_identity_recovered_as_two_pieces_that_sum_to_it():
    e = torch.eye(2)
    P = torch.zeros(4, 2, 2)
    P[0], P[1] = torch.outer(e[0], e[0]), torch.outer(e[1], e[1])
    ci = torch.tensor([[1.0, 0.0, 0, 0], [0.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])  # 3 features; each piece on for 2
    out = identity_recovery(P, ci, tau=0.1)
    assert out["id_recovered"] == 1 and out["id_n_alive"] == 2 and out["id_n_always_on"] == 0
    assert out["id_on_fraction"] == pytest.approx(4 / 6) and out["id_cos"] == pytest.approx(1.0)
    ci[0, 2] = 0.5  # a third piece alive: not one rank-2 mechanism any more
    assert identity_recovery(P, ci, tau=0.1)["id_recovered"] == 0
    ci[0, 2] = 0.0
    P[1] *= 0.5  # two pieces again, but they no longer sum to the identity
    assert identity_recovery(P, ci, tau=0.1)["id_recovered"] == 0
