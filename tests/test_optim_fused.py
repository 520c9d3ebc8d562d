"""``make_optimizer``'s fused Adam/AdamW: the plain optimiser's updates (to rounding), and state
that plain and fused optimisers load from each other (checkpoints)."""

import copy

import pytest
import torch

from apd.optim import make_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in ((3, 4), (5,), (2, 1, 6))]


def _steps(opt, params, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("name,plain", [("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
                                        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))])  # fmt: skip
def test_fused_adam_makes_the_plain_updates_and_shares_its_state(name, plain):
    ours, ref = _params(), _params()
    opt = make_optimizer(name, ours, 1e-2)
    assert opt.defaults["fused"] is True
    ref_opt = plain(ref)
    _steps(opt, ours, 7)
    _steps(ref_opt, ref, 7)
    assert not torch.equal(ours[0], _params()[0])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a plain optimiser's state (an older checkpoint) continues in the fused one, and the other way
    resumed = [p.detach().clone().requires_grad_() for p in ref]
    opt2 = make_optimizer(name, resumed, 1e-2)
    opt2.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as through a checkpoint file
    _steps(opt2, resumed, 3, seed=2)
    _steps(ref_opt, ref, 3, seed=2)
    for a, b in zip(resumed, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    back = plain([p.detach().clone().requires_grad_() for p in resumed])
    back.load_state_dict(copy.deepcopy(opt2.state_dict()))
    assert back.state_dict()["state"][0]["step"].item() == 10


def test_integer_parameters_fall_back_to_the_plain_optimiser():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    assert make_optimizer("adam", [p], 1e-3).defaults["fused"] is None
