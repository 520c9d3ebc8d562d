"""apd.baselines.convergence and the trainer's held-out curve: the rule on hand-made curves, training
that stops once its curve is flat (and warns at the step cap when it is not), and the curve's plot."""

import math
import warnings

import pytest
import torch

from apd.baselines import ConvergenceRule, SAETrainConfig, TopKSAE, TopKSAEConfig, train_sae, window_change


def test_window_change_is_the_fitted_slope_times_the_window_by_hand():
    # points at steps 10..100; the window of 20% holds steps >= 80: 80, 90, 100 with values 1, 2, 6.
    # least squares: slope = Σ(x - 90)(y - 3) / Σ(x - 90)² = (-10·-2 + 0 + 10·3) / 200 = 0.25 per step
    steps = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    values = [9, 9, 9, 9, 9, 9, 9, 1, 2, 6]
    assert window_change(steps, values, 0.2) == pytest.approx(0.25 * 0.2 * 100)
    assert math.isnan(window_change(steps, values, 0.2, min_points=4))  # only three points in the window
    assert window_change(steps, values, 0.05, min_points=1) != window_change(steps, values, 0.05, min_points=1)  # one point: no line


def test_a_flat_noisy_curve_converges_and_a_rising_one_does_not():
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(10, 1001, 10).float()
    noise = 0.002 * torch.randn(steps.shape, generator=g)
    rule = ConvergenceRule(window=0.2, tol=0.005)
    flat = 0.95 - 0.3 * torch.exp(-steps / 100) + noise  # saturated long before step 800
    rising = 0.80 + 0.0001 * steps + noise  # +0.02 over the last 200 steps
    assert rule.converged(steps, flat) and abs(rule.change(steps, flat)) < 0.005
    assert not rule.converged(steps, rising) and rule.change(steps, rising) == pytest.approx(0.02, abs=0.003)
    # the window's two end points alone would call this curve flat (a ramp that falls back at the
    # last point); the line fitted through every point of the window does not
    ramp = torch.cat([torch.full((79,), 0.90), torch.linspace(0.90, 0.95, 20), torch.tensor([0.90])])
    start = int((steps >= 800).nonzero()[0])
    assert abs(float(ramp[-1] - ramp[start])) < 0.005 and rule.change(steps, ramp) > 0.005 and not rule.converged(steps, ramp)
    assert not rule.converged([100.0, 200.0], [0.9, 0.9])  # too few points to tell


def test_bad_rules_and_configs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="window"):
        ConvergenceRule(window=0.0)
    with pytest.raises(ValueError, match="tol"):
        ConvergenceRule(tol=0.0)
    with pytest.raises(ValueError, match="eval_every"):
        SAETrainConfig(until_converged=True)
    with pytest.raises(ValueError, match="lr_schedule=constant"):
        SAETrainConfig(until_converged=True, eval_every=10, lr_schedule="cosine")
    with pytest.raises(ValueError, match="converge_window"):
        SAETrainConfig(converge_window=1.5)


def _dictionary_data():
    """Samples of two of 16 fixed directions in 8 dimensions, fresh every call."""
    D = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        return D[torch.randint(0, 16, (n, 2), generator=generator)].sum(dim=1)

    return draw


def test_training_stops_once_the_curve_is_flat_and_the_verdict_holds_on_its_curve():
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2))
    cfg = SAETrainConfig(steps=3000, batch_size=128, lr=1e-2, init_sample_size=256, eval_every=10, until_converged=True,
                         warmup_steps=20)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cap warning
        result = train_sae(sae, _dictionary_data(), cfg)
    assert result.converged is True and result.steps < 3000 and result.steps % 10 == 0
    assert result.curve["step"][-1] == result.steps and len(result.losses["loss"]) == result.steps
    # the verdict is the rule on the recorded curve, and one evaluation earlier it was not yet flat
    rule = cfg.convergence_rule
    steps, fvu = result.curve["step"], result.curve["fvu"]
    assert rule.converged(steps, fvu) and abs(result.curve_change) < cfg.converge_tol
    assert not (rule.converged(steps[:-1], fvu[:-1]) and cfg.window_clear(int(steps[-2])))
    assert fvu[-1] < 0.5 * fvu[0]  # it did learn the dictionary before stopping
    assert result.curve["l0"][-1] == pytest.approx(2)
    record = result.curve_record()
    assert record["converged"] is True and record["steps_trained"] == result.steps and len(record["curve"]["fvu"]) == len(steps)


def test_the_window_must_start_after_every_warm_up_and_resampling():
    cfg = SAETrainConfig(steps=1000, warmup_steps=10, sparsity_warmup_steps=200, resample_steps=[300], eval_every=10)
    assert cfg.last_schedule_step == 301
    assert not cfg.window_clear(376) and cfg.window_clear(377)  # 0.8 · 377 = 301.6 ≥ 301


def test_the_step_cap_warns_and_reports_not_converged():
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2))
    with pytest.warns(UserWarning, match="steps=40"):
        result = train_sae(sae, _dictionary_data(), steps=40, batch_size=256, lr=3e-3, init_sample_size=256, eval_every=2,
                           until_converged=True, converge_tol=1e-6)  # fmt: skip
    assert result.steps == 40 and result.converged is False and not math.isnan(result.curve_change)
    # report-only mode: same training, no stopping, the verdict in the result
    same = train_sae(TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2)), _dictionary_data(), steps=40, batch_size=256, lr=3e-3,
                     init_sample_size=256, eval_every=2, converge_tol=1e-6)  # fmt: skip
    assert same.converged is False and torch.equal(same.curve["fvu"], result.curve["fvu"])


def test_the_curve_does_not_change_the_training():
    data = _dictionary_data()
    kw = dict(steps=30, batch_size=128, lr=3e-3, init_sample_size=128)
    a, b = TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2)), TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2))
    train_sae(a, data, **kw)
    result = train_sae(b, data, eval_every=7, **kw)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert result.curve["step"].tolist() == [7, 14, 21, 28, 30]


def test_an_unknown_converge_metric_names_the_evaluation_metrics():
    with pytest.raises(ValueError, match="loss_recovered.*fvu"):
        train_sae(TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=2)), _dictionary_data(), steps=5, batch_size=64, init_sample_size=64,
                  eval_every=5, converge_metric="loss_recovered")  # fmt: skip
