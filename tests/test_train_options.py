"""Training options beyond the paper's recipe: the unpenalised fine-tune, the gradient-attribution mode."""

import pytest
import torch

from apd import APDConfig, ConfigError, decompose, load_decomposition
from apd.component_model import ComponentModel
from apd.metrics import tms_recovery
from apd.config import GradientMode
from apd.methods.apd import in_finetune, lr_for_step, topk_at_step
from apd.train import loss_terms
from apd.toy_models import TMS, TMSConfig, tms_batch, train_tms

TMS_CFG = dict(C=5, topk=0.211, batch_topk=True, simplicity_coeff=0.7, schatten_p=1.0, lr=3e-2, warmup_frac=0.05)


@pytest.fixture(scope="module")
def tms() -> TMS:
    torch.manual_seed(0)
    model = TMS(TMSConfig(n_features=5, n_hidden=2))
    train_tms(model, steps=5000, batch_size=1024, seed=0)
    return model


def _data(seed: int, batch: int = 2048):
    gen = torch.Generator().manual_seed(seed)
    return lambda: tms_batch(5, batch, 0.05, gen)


def test_finetune_phase_and_lr_by_step():
    cfg = APDConfig(steps=100, lr=1.0, lr_schedule="linear", finetune_frac=0.15)
    assert cfg.finetune_start == 85
    assert not in_finetune(84, cfg) and in_finetune(85, cfg) and in_finetune(99, cfg)
    assert lr_for_step(90, cfg) == pytest.approx(1 - 90 / 100)  # no finetune_lr: the main schedule goes on
    cfg = APDConfig(steps=100, lr=1.0, lr_schedule="linear", finetune_frac=0.15, finetune_lr=0.25)
    assert lr_for_step(84, cfg) == pytest.approx(1 - 84 / 100) and lr_for_step(85, cfg) == 0.25
    assert APDConfig(steps=100).finetune_start == 100  # default: no fine-tune


def test_loss_terms_in_the_finetune_drop_only_simplicity(tms):
    cfg = APDConfig(**TMS_CFG, steps=100, finetune_frac=0.1)
    cm = ComponentModel(tms, ["enc", "dec"], C=5)
    x = tms_batch(5, 512, 0.05, torch.Generator().manual_seed(0))
    full = loss_terms(cm, x, cfg, step=89)
    plain = loss_terms(cm, x, cfg, step=90)  # the fine-tune's first step
    assert "simplicity" in full and "simplicity" not in plain
    assert list(full) == ["total", "faithfulness", "minimality", "simplicity", "l0"]
    assert plain["total"].item() == pytest.approx((full["faithfulness"] + full["minimality"]).item(), rel=1e-6)
    assert full["total"].item() == pytest.approx((plain["total"] + 0.7 * full["simplicity"]).item(), rel=1e-6)


def test_finetune_logs_no_simplicity_and_uses_its_lr(tms):
    logged = []
    cfg = APDConfig(**TMS_CFG, steps=40, log_every=5, finetune_frac=0.25, finetune_lr=1e-3)
    decompose(tms, _data(0, 256), cfg, ["enc", "dec"], progress=False, callback=lambda s, t: logged.append(t))
    for t in logged:
        assert ("simplicity" in t) == (t["step"] < 30)
        assert (t["lr"] == 1e-3) == (t["step"] >= 30)


def test_resume_across_the_finetune_boundary_is_exact(tms, tmp_path):
    cfg = APDConfig(**TMS_CFG, steps=40, log_every=5, checkpoint_every=10, finetune_frac=0.5, finetune_lr=1e-2)
    data = lambda: tms_batch(5, 256, 0.05)  # noqa: E731  (global RNG: restored on resume)
    full = decompose(tms, data, cfg, ["enc", "dec"], progress=False)

    def crash(step, terms):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(tms, data, cfg, ["enc", "dec"], progress=False, checkpoint_dir=tmp_path, callback=crash)
    assert load_decomposition(tmp_path).step == 20  # the fine-tune starts at step 20
    resumed = decompose(tms, data, cfg, ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(resumed.A["enc"], full.A["enc"]) and torch.equal(resumed.B["enc"], full.B["enc"])
    assert resumed.history == full.history


@pytest.mark.slow  # two 3000-step runs: 62 s
def test_finetune_removes_the_shrinkage(tms):
    """The Schatten penalty shrinks each recovered column (ML2R ≈ 0.9); without it for the last
    steps the active component grows back to the target's norm."""
    base = dict(TMS_CFG, init_scale=0.1, steps=3000, seed=0)
    shrunk = decompose(tms, _data(1, 512), APDConfig(**base), ["enc", "dec"], progress=False)
    tuned = decompose(tms, _data(1, 512), APDConfig(**base, finetune_frac=0.2), ["enc", "dec"], progress=False)
    before = tms_recovery(tms.W, shrunk.component_weights()["enc"])
    after = tms_recovery(tms.W, tuned.component_weights()["enc"])
    assert before["ml2r"] < 0.93 and after["ml2r"] > 0.98, (before, after)
    # the fine-tune keeps the recovered directions (one-to-one at cos 0.99 is tested on the full
    # preset in tests/test_experiments.py; this run is shortened)
    assert after["n_recovered_0.9"] == 5 and after["mmcs"] >= before["mmcs"] - 0.01, (before, after)


@pytest.mark.parametrize("mode", ["hidden", "jacfwd", "per_sample"])
def test_gradient_mode_gives_the_same_losses(tms, mode):
    cm = ComponentModel(tms, ["enc", "dec"], C=5, init_scale=0.3)
    x = tms_batch(5, 512, 0.05, torch.Generator().manual_seed(0))
    default = loss_terms(cm, x, APDConfig(**TMS_CFG))
    chosen = loss_terms(cm, x, APDConfig(**TMS_CFG, gradient_mode=mode))
    assert chosen["l0"] == default["l0"]
    torch.testing.assert_close(chosen["total"], default["total"])


def test_gradient_mode_config():
    assert APDConfig(gradient_mode="hidden").gradient_mode is GradientMode.hidden
    assert APDConfig().gradient_mode is None
    with pytest.raises(ConfigError, match="attribution='gradient' only"):
        APDConfig(attribution="activation", gradient_mode="hidden")
    with pytest.raises(ConfigError, match="'per_sample', 'hidden'"):
        APDConfig(gradient_mode="fast")


def test_topk_schedule_moves_k_linearly_then_holds():
    config = APDConfig(C=10, topk=2.0, topk_start=6.0, topk_anneal_frac=0.5, steps=100)
    assert [topk_at_step(s, config) for s in (0, 25, 50, 99)] == [6.0, 4.0, 2.0, 2.0]
    assert topk_at_step(10, APDConfig(C=10, topk=2.0, steps=100)) == 2.0  # no schedule
    with pytest.raises(ConfigError, match="topk_start=12.0"):
        APDConfig(C=10, topk=2.0, topk_start=12.0)
    with pytest.raises(ConfigError, match="batch_topk=True"):
        APDConfig(C=10, topk=2.0, topk_start=4.0, batch_topk=False)


@pytest.mark.parametrize("method", [pytest.param("apd", marks=pytest.mark.slow), "spd"])  # torch.compile: 10 s, 6 s
def test_compiled_loss_matches_eager(method):
    """compile=True runs the loss terms through torch.compile: the same training trajectory. SPD's
    masked passes reuse the target pass's outputs by swapping module forwards, which crashed in a
    compiled frame (AttributeError from torch.nn.Module.__delattr__); under compile they run in full."""
    from torch import nn

    from apd import SPDConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    decs = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(1)
        if method == "apd":
            cfg = APDConfig(C=4, rank=1, topk=1.5, simplicity_coeff=0.5, schatten_p=0.9, lr=1e-2, steps=6, compile=compiled)
        else:
            cfg = SPDConfig(C=8, lr=1e-2, steps=6, compile=compiled)
        torch.manual_seed(2)  # SPD's stochastic masks draw from the global generator
        with torch._inductor.config.patch(fallback_random=True):  # compiled random draws as eager ones (SPD's masks)
            decs.append(decompose(model, lambda: torch.randn(64, 6, generator=gen), cfg, ["0", "2"], progress=False))
    eager, compiled = decs
    assert eager.history[-1]["total"] == pytest.approx(compiled.history[-1]["total"], rel=1e-4)
    for n in eager.A:
        torch.testing.assert_close(compiled.A[n], eager.A[n], rtol=1e-4, atol=1e-6)


def test_compile_is_refused_by_decompose_seeds():
    from torch import nn

    from apd import decompose_seeds

    cfg = APDConfig(C=2, steps=2, compile=True)
    with pytest.raises(ConfigError, match="compile"):
        decompose_seeds(nn.Sequential(nn.Linear(3, 2)), lambda: torch.randn(4, 3), cfg, ["0"], [0, 1], progress=False)


def test_unit_norm_A_projects_the_gradient_then_renormalises():
    """One SGD step with unit_norm_A: A moves along the gradient with its component parallel to each
    (unit) row removed, then each row is rescaled to unit norm; without the projection the step differs."""
    from torch import nn

    from apd.methods import method_for
    from apd.train import train_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    cfg = APDConfig(C=3, rank=1, topk=2.0, unit_norm_A=True, lr=0.5, optimizer="sgdw", steps=5)
    method = method_for(cfg)
    cm = method.build(model, ["0", "2"])
    method.prepare(cm)
    A0 = {n: cm.layers[n].A.detach().clone() for n in cm.matrix_names}
    torch.testing.assert_close(A0["0"].norm(dim=-1), torch.ones(3, 1))
    x = torch.randn(32, 6)
    grads = {}
    hooks = [cm.layers[n].A.register_hook(lambda g, n=n: grads.__setitem__(n, g.clone())) for n in cm.matrix_names]
    opt = torch.optim.SGD(list(cm.trainable_parameters().values()), lr=0.5)
    train_step(cm, opt, x, method, 0)
    for h in hooks:
        h.remove()
    for n in cm.matrix_names:
        a, g = A0[n], grads[n]
        projected = g - (g * a).sum(-1, keepdim=True) * a
        stepped = a - 0.5 * projected
        expected = stepped / stepped.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(cm.layers[n].A.detach(), expected, rtol=1e-5, atol=1e-6)
        unprojected = (a - 0.5 * g) / (a - 0.5 * g).norm(dim=-1, keepdim=True)
        assert not torch.allclose(unprojected, expected, atol=1e-4)
