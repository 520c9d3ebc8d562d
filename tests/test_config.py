import io
import math

import pytest
import torch

from apd import OPTIMIZERS, APDConfig, Attribution, ConfigError, LRSchedule
from apd.optim import lr_at_step, make_optimizer


def test_strings_become_enums():
    cfg = APDConfig(attribution="ablation", lr_schedule="cosine", optimizer="AdamW")
    assert cfg.attribution is Attribution.ablation and cfg.lr_schedule is LRSchedule.cosine and cfg.optimizer == "adamw"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"C": 0}, "C=0"),
        ({"C": 4, "topk": 5}, "k cannot exceed"),
        ({"topk": 1.5, "batch_topk": False}, "batch_topk=True"),
        ({"minimality_coeff": -1.0}, "minimality_coeff"),
        ({"simplicity_coeff": float("nan")}, "simplicity_coeff"),
        ({"schatten_p": 0.0}, r"\(0, 2\]"),
        ({"schatten_p": 2.5}, r"\(0, 2\]"),
        ({"attribution": "saliency"}, "'gradient', 'ablation', 'activation'"),
        ({"lr_schedule": "step"}, "'constant', 'cosine', 'quarter_cosine', 'linear'"),
        ({"topk": "abc"}, r"APDConfig.topk='abc': expected a number or None"),
        ({"C": 2.5}, r"APDConfig.C=2.5: expected a whole number"),
        ({"batch_topk": "yes"}, "expected true/false"),
        ({"optimizer": "sgdd"}, "choose one of"),
        ({"optimizer": "Lookahead"}, "cannot be saved"),
        ({"topk": None}, "lp_sparsity_coeff"),
        ({"act_recon_coeff": 1.0}, "act_recon_modules"),
        ({"warmup_frac": 1.0}, "warmup_frac"),
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"finetune_frac": 1.0}, r"finetune_frac=1.0: must lie in \[0, 1\)"),
        ({"finetune_frac": -0.1}, "finetune_frac"),
        ({"finetune_lr": 0.0}, "finetune_lr=0.0: must be > 0"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        APDConfig(**kwargs)


def test_round_trip_and_unknown_keys():
    cfg = APDConfig(C=7, topk=1.28, attribution="activation", act_recon_coeff=1.0, act_recon_modules=["act"])
    assert APDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown APDConfig field"):
        APDConfig.from_dict({**cfg.to_dict(), "topK": 2})


def test_lr_schedule_shapes():
    args = dict(steps=100, lr=1.0, warmup_frac=0.1)
    assert lr_at_step(0, schedule=LRSchedule.constant, **args) == pytest.approx(0.1)
    assert lr_at_step(9, schedule=LRSchedule.constant, **args) == pytest.approx(1.0)
    assert lr_at_step(50, schedule=LRSchedule.constant, **args) == 1.0
    assert lr_at_step(10, schedule=LRSchedule.cosine, **args) == pytest.approx(1.0)
    assert lr_at_step(55, schedule=LRSchedule.cosine, **args) == pytest.approx(0.5)
    assert lr_at_step(55, schedule=LRSchedule.linear, **args) == pytest.approx(0.5)
    assert lr_at_step(99, schedule=LRSchedule.linear, **args) == pytest.approx(1 / 90)
    # the reference APD code's cosine: cos(π/2 · s/(S-1)) over the S = 90 steps after the warm-up
    assert lr_at_step(10, schedule=LRSchedule.quarter_cosine, **args) == pytest.approx(1.0)
    assert lr_at_step(10 + 89 * 2 // 3, schedule=LRSchedule.quarter_cosine, **args) == pytest.approx(math.cos(math.pi / 2 * 59 / 89))
    assert lr_at_step(99, schedule=LRSchedule.quarter_cosine, **args) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_offered_optimizer_steps_and_checkpoints(name):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = make_optimizer(name, [p], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = make_optimizer(name, [p], lr=1e-2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.state_dict()["param_groups"][0]["lr"] == pytest.approx(1e-2)
