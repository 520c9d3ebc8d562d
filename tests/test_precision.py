"""``MethodConfig.precision=bf16``: the training step's matmuls in bfloat16 (apd.precision), parameters,
optimiser state and evaluation in float32, results close to the float32 step's."""

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apd import APDConfig, ConfigError, Precision, SPDConfig, decompose_seeds
from apd.methods import method_for
from apd.optim import make_optimizer
from apd.precision import full_precision, step_autocast
from apd.targets import PRETRAINED_DIR, load_target
from apd.train import _factors, loss_terms, train_step
from experiments.schema import DecomposeApp

CONF = Path(__file__).resolve().parents[1] / "conf"

# The TMS 5-2 preset's method (conf/experiment/spd_tms_5_2.yaml), compile_ci off.
TMS_SPD = dict(C=20, ci_fn="mlp", ci_hidden=[16], importance_minimality_coeff=3e-3, pnorm=1.0, stochastic_recon_coeff=1.0,
               stochastic_recon_layerwise_coeff=1.0, lr=2e-3, lr_schedule="cosine", faithfulness_coeff=None)  # fmt: skip  (spd_tms_5_2)


@pytest.fixture(scope="module")
def tms_5_2():
    model, tcfg, _ = load_target(PRETRAINED_DIR / "tms_5_2.pt")
    return model, tcfg


def _terms_and_grads(cm, method, x, seed):
    """One step's loss terms and gradient as ``train_step`` computes them (its autocast region)."""
    for p in cm.trainable_parameters().values():
        p.grad = None
    torch.manual_seed(seed)
    terms = loss_terms(cm, x, method)  # the step's autocast region
    terms["total"].backward()
    grads = torch.cat([p.grad.flatten() for p in cm.trainable_parameters().values() if p.grad is not None])
    return {k: float(v.detach()) for k, v in terms.items()}, grads


def test_a_bf16_step_is_close_to_the_fp32_step_from_the_same_state_and_draws(tms_5_2):
    """TMS 5-2 after the faithfulness warm-up, batch 1024, same mask draws. Measured (2026-12-05): loss
    terms 1e-4 to 5e-4 relative off, gradient cosine 0.999999, relative error 1.4e-3; the step-to-step
    noise (other mask draws, fp32) is 5e-3 to 2e-2 relative and cosine 0.98."""
    model, tcfg = tms_5_2
    config = SPDConfig(**TMS_SPD)
    m32, m16 = method_for(config), method_for(dataclasses.replace(config, precision="bf16"))
    cm = m32.build(model, tcfg.modules())
    m32.warmup(_factors(cm, cm.trainable_parameters()), cm.target_weights())
    x = tcfg.batch(1024, torch.Generator().manual_seed(0))
    t32, g32 = _terms_and_grads(cm, m32, x, 0)
    t16, g16 = _terms_and_grads(cm, m16, x, 0)
    for k in ("total", "stochastic_recon", "stochastic_recon_layerwise", "importance_minimality"):
        assert t16[k] == pytest.approx(t32[k], rel=5e-3), k
    assert t16["total"] != t32["total"]  # the matmuls did run in bfloat16
    assert torch.cosine_similarity(g16, g32, 0) > 0.9999
    assert (g16 - g32).norm() / g32.norm() < 0.02
    assert g16.dtype == torch.float32


def test_the_faithfulness_term_of_a_bf16_step_is_the_float32_one(tms_5_2):
    """SPD's default faithfulness coefficient (1e6) would chase bfloat16 rounding of Σ_c P_c (2^-8 of W):
    the term is computed in float32 inside the bf16 step, so it equals the fp32 step's to rounding."""
    model, tcfg = tms_5_2
    config = SPDConfig(C=20, faithfulness_coeff=1e6)
    m32, m16 = method_for(config), method_for(dataclasses.replace(config, precision="bf16"))
    cm = m32.build(model, tcfg.modules())
    m32.warmup(_factors(cm, cm.trainable_parameters()), cm.target_weights())
    x = tcfg.batch(256, torch.Generator().manual_seed(0))
    t32, _ = _terms_and_grads(cm, m32, x, 0)
    t16, _ = _terms_and_grads(cm, m16, x, 0)
    assert t32["faithfulness"] > 0 and t16["faithfulness"] == pytest.approx(t32["faithfulness"], rel=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what it would be in bfloat16
        rounded = sum(((w - cm.summed_weights()[n].float()) ** 2).sum() for n, w in cm.target_weights().items())
    assert float(rounded) / cm.n_weights() != pytest.approx(t32["faithfulness"], rel=1e-2)


def test_bf16_changes_only_the_matmuls_of_the_step():
    """Inside the step: a product in bfloat16, the region asked back in float32 exact; outside: nothing."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with step_autocast(SPDConfig(precision="bf16")):
        assert (a @ b).dtype == torch.bfloat16
        with full_precision():
            assert torch.equal(a @ b, a @ b) and (a @ b).dtype == torch.float32
    with step_autocast(SPDConfig()):
        assert (a @ b).dtype == torch.float32


def test_train_step_keeps_parameters_gradients_and_optimiser_state_float32_and_evaluation_unchanged(tms_5_2):
    model, tcfg = tms_5_2
    x = tcfg.batch(256, torch.Generator().manual_seed(0))
    results = {}
    for precision in ("fp32", "bf16"):
        method = method_for(SPDConfig(**TMS_SPD, precision=precision))
        cm = method.build(model, tcfg.modules())
        opt = make_optimizer("adam", cm.trainable_parameters().values(), 1e-3)
        torch.manual_seed(0)
        terms = train_step(cm, opt, x, method, 0)
        params = cm.trainable_parameters()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params.values() if p.grad is not None)
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point() and v.dim())
        results[precision] = float(terms["total"].detach()), method.eval_masks(cm, x)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=5e-3)  # the step ran in bfloat16
    for n in g32:  # evaluation is float32 either way: after one step from the same start, the same to Adam's update
        assert g16[n].dtype == torch.float32
        torch.testing.assert_close(g16[n], g32[n], atol=2e-3, rtol=0)


def test_apd_steps_in_bf16_too():
    model, tcfg, _ = load_target(PRETRAINED_DIR / "tms_5_2.pt")
    x = tcfg.batch(256, torch.Generator().manual_seed(0))
    totals = []
    for precision in ("fp32", "bf16"):
        method = method_for(APDConfig(C=5, topk=0.211, batch_topk=True, precision=precision))
        cm = method.build(model, tcfg.modules())
        opt = make_optimizer("adam", cm.trainable_parameters().values(), 1e-3)
        totals.append(float(train_step(cm, opt, x, method, 0)["total"]))
    assert totals[1] != totals[0] and totals[1] == pytest.approx(totals[0], rel=2e-2)


def test_seeds_at_once_in_bf16_match_their_fp32_run_closely(tms_5_2):
    """The vmapped path runs in bfloat16 too: the same seeds and batches, histories close but not equal."""
    model, tcfg = tms_5_2
    batches = [tcfg.batch(256, torch.Generator().manual_seed(i)) for i in range(20)]
    hist = {}
    for precision in ("fp32", "bf16"):
        cfg = SPDConfig(**{**TMS_SPD, "lr": 1e-2}, steps=10, log_every=9, precision=precision, faithfulness_warmup_steps=20)
        decs = decompose_seeds(model, batches, cfg, tcfg.modules(), seeds=[0, 1], progress=False)
        hist[precision] = [d.history[-1] for d in decs]
        assert all(p.dtype == torch.float32 for d in decs for p in d.params.values())
    for h32, h16 in zip(hist["fp32"], hist["bf16"]):
        assert h16["total"] != h32["total"] and h16["total"] == pytest.approx(h32["total"], rel=0.05)


def test_tms_5_2_in_bf16_recovers_every_feature_through_hydra():
    """``method.precision=bf16`` from the command line; a short run of the TMS 5-2 preset (1000 steps
    of 256, 6 s of CPU) finds all five directions. Measured (2026-12-05): every feature at cos > 0.9,
    MMCS 0.983, L0 0.97, CI-masked recon MSE 7.9e-4; the same run in fp32 0.982, 0.97, 7.9e-4."""
    from apd.experiment import run_decompose

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="decompose", overrides=["experiment=spd_tms_5_2", "method.precision=bf16", "steps=1000",
                                                          "batch_size=256", "n_eval=1000", "method.compile_ci=off"])  # fmt: skip
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, DecomposeApp) and app.method.precision is Precision.bf16
    with tempfile.TemporaryDirectory() as d:
        m = run_decompose(app, d, progress=False).metrics
    assert m["n_recovered_0.9"] == 5 and m["mmcs"] > 0.97 and m["l0"] < 1.5, m


def test_the_precision_round_trips_and_old_configs_load_as_fp32():
    cfg = SPDConfig(precision="bf16")
    assert cfg.precision is Precision.bf16 and cfg.to_dict()["precision"] == "bf16"
    assert SPDConfig.from_dict(cfg.to_dict()) == cfg
    old = SPDConfig().to_dict()
    del old["precision"]  # a config saved before the field existed
    assert SPDConfig.from_dict(old).precision is Precision.fp32


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"precision": "fp16"}, r"SPDConfig.precision='fp16': expected one of 'fp32', 'bf16'"),
    ({"precision": "bf16", "device": "mps"}, r"precision=bf16 with device='mps'.*use precision=fp32"),
])  # fmt: skip
def test_a_bad_precision_is_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SPDConfig(**kwargs)



def test_the_target_pass_and_the_causal_importances_stay_float32_in_a_bf16_step(tms_5_2):
    """SPD's target outputs (what every reconstruction compares with) are the float32 ones exactly, and
    g (the masks, their draws, the minimality loss) is float32 even where the CI function is a matmul."""
    model, tcfg = tms_5_2
    x = tcfg.batch(64, torch.Generator().manual_seed(0))
    for ci_fn in ("mlp", "shared_mlp"):
        method = method_for(SPDConfig(**{**TMS_SPD, "ci_fn": ci_fn}, precision="bf16"))
        cm = method.build(model, tcfg.modules())
        with torch.no_grad():
            expected = cm(x)
        with step_autocast(method.config):
            ctx = method.step_context(cm, x, 0)
        assert ctx.target_out.dtype == torch.float32 and torch.equal(ctx.target_out, expected)
        assert all(g.dtype == torch.float32 for g in [*ctx.ci.values(), *ctx.ci_upper.values()]), ci_fn


def test_attention_runs_in_float32_on_the_bf16_projections_in_a_cpu_bf16_step():
    """Under CPU bfloat16 autocast the toy LMs' attention core takes the projections' bfloat16 outputs
    in float32 (torch's bf16 CPU attention is much slower); the result is exactly that computation,
    and not the bf16 attention's (which rounds differently); outside autocast nothing changes."""
    import torch.nn.functional as F

    from apd.toy_models.lm import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False)
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        q, k, v = (p(x).view(2, 16, 4, 8).transpose(1, 2) for p in (attn.q, attn.k, attn.v))
        bf16_core = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert q.dtype == torch.bfloat16 and bf16_core.dtype == torch.bfloat16
    fp32_core = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.o(fp32_core.transpose(1, 2).reshape(2, 16, 32))
        via_bf16_core = attn.o(bf16_core.transpose(1, 2).reshape(2, 16, 32))
    assert torch.equal(out, expected)
    assert not torch.equal(out, via_bf16_core)
    ref = attn(x)  # fp32, no autocast: the plain attention
    q, k, v = (p(x).view(2, 16, 4, 8).transpose(1, 2) for p in (attn.q, attn.k, attn.v))
    plain = attn.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32))
    assert ref.dtype == torch.float32 and torch.equal(ref, plain)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 projections: close to fp32
