"""The 4-layer Llama-style LM target (``lm_4l``): the model, the shipped weights and VPD's table."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apd.baselines import load_sae, module_loss_recovered
from apd.checkpoint import safe_load
from apd.compare.lm_layers import decomposition_layer_scores, mlp_modules
from apd.evaluation import EvalContext
from apd.methods import method_for
from apd.methods.spd import CI_FNS, SPDConfig
from apd.targets import CHECK_BATCH, PRETRAINED_DIR, MultiLMTargetConfig, get_target, load_target, vpd_table, vpd_table_markdown
from apd.toy_models.lm import lm_loss
from apd.toy_models.lm_multi import BLOCK_MATRICES, MultiLayerLM, MultiLMConfig

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = PRETRAINED_DIR / "lm_4l.pt"


def _zeroed(model: MultiLayerLM, layers: set[int]) -> MultiLayerLM:
    """A copy with every decomposed matrix of ``layers`` set to zero."""
    z = copy.deepcopy(model)
    with torch.no_grad():
        for i in layers:
            for name in z.matrix_names(i):
                z.get_submodule(name).weight.zero_()
    return z


def test_skipping_a_block_is_zeroing_its_six_matrices() -> None:
    model = MultiLayerLM(MultiLMConfig(vocab_size=11, seq_len=9, n_layers=3, d_model=8, n_heads=2, d_mlp=12))
    x = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0))
    assert model.matrix_names(1) == [f"layers.1.{m}" for m in BLOCK_MATRICES]
    with torch.no_grad():
        full = model(x)
        for skip in ({0}, {2}, {0, 1, 2}):
            torch.testing.assert_close(model(x, skip=skip), _zeroed(model, skip)(x))
            assert not torch.allclose(model(x, skip=skip), full)
        # every block skipped: the logits depend on the current token and position only
        x2 = x.clone()
        x2[:, 0] = (x2[:, 0] + 1) % 11
        torch.testing.assert_close(model(x, skip={0, 1, 2})[:, 1:], model(x2, skip={0, 1, 2})[:, 1:])
    with pytest.raises(ValueError, match="exceeds the model's seq_len=9"):
        model(torch.zeros(1, 10, dtype=torch.long))


# --- VPD's table on a tiny hand-checkable case ----------------------------------------------------

TINY = MultiLMTargetConfig(name="lm_tiny", seq_len=16, n_layers=3, d_model=8, n_heads=2, d_mlp=16)


def _tiny_target() -> MultiLayerLM:
    """TINY untrained, its weights scaled up so that every block changes the loss clearly."""
    target = TINY.build().eval()
    with torch.no_grad():
        for n, p in target.named_parameters():
            if "norm" not in n:
                p.mul_(15)
    return target


def _exact_decomposition(target: MultiLayerLM):
    """An SPD component model of every matrix whose rank-one subcomponents sum exactly to the weight (an
    SVD), and whose CI functions output a constant pre-activation set per test (weights zeroed)."""
    method = method_for(SPDConfig(C=8, C_per_module={"mlp.up": 8, "mlp.down": 8}, ci_fn="shared_mlp", ci_hidden=[4]))
    cm = method.build(target, TINY.modules())
    with torch.no_grad():
        for n in cm.matrix_names:
            layer = cm.layers[n]
            U, S, Vh = torch.linalg.svd(layer.target_weight(), full_matrices=False)  # rank 8 = C
            layer.A.copy_((S.sqrt()[:, None] * Vh)[:, None, :])  # [C, 1, d_in]
            layer.B.copy_((U * S.sqrt()).T[:, :, None])  # [C, d_out, 1]
            torch.testing.assert_close(layer.summed_weight(), layer.target_weight(), atol=1e-6, rtol=1e-5)
        for fn in cm.method_module(CI_FNS):
            fn.layers.net[-1].weight.zero_()
    return method, cm


def _set_ci(cm, method, values: dict[str, float]) -> None:
    """Every subcomponent of a matrix gets g = its value in ``values`` (by layer prefix), else g = 1."""
    fns = cm.method_module(CI_FNS)
    with torch.no_grad():
        for n in cm.matrix_names:
            value = next((v for k, v in values.items() if n.startswith(k)), 1.0)
            fns[fns.position[n]].layers.net[-1].bias.fill_(value if 0 < value < 1 else (10.0 if value >= 1 else -10.0))


def _table(target, cm, method, n_eval=4, seed=0) -> dict[str, float]:
    ctx = EvalContext(target, TINY, None, cm, method, n_eval, seed, torch.device("cpu"))  # type: ignore[arg-type]
    return vpd_table(TINY, ctx)


def _xy(n_eval=4, seed=0):
    # vpd_table's windows: the same generator seed and draw
    w = TINY.windows("heldout", n_eval, torch.Generator().manual_seed(seed + 40_000), length=TINY.seq_len + 1)
    return w[:, :-1], w[:, 1:]


def test_vpd_table_with_every_mask_one_is_the_target_and_zero_ablation_is_zeroed_matrices() -> None:
    target = _tiny_target()
    method, cm = _exact_decomposition(target)
    _set_ci(cm, method, {})  # g = 1 everywhere
    t = _table(target, cm, method)
    x, y = _xy()
    with torch.no_grad():
        ce = float(lm_loss(target(x), y))
        ablated = [float(lm_loss(_zeroed(target, {i})(x), y)) for i in range(3)]
        all_zero = float(lm_loss(_zeroed(target, {0, 1, 2})(x), y))
    assert t["vpd/ce_target"] == pytest.approx(ce, rel=1e-6)
    # Σ components = W: unmasked, CI-masked (g = 1), stochastic (1 + 0·r) and rounded masks are the target
    for key in ("ce_unmasked", "ce_ci_masked", "ce_stochastic", "ce_rounded_gt0", "ce_rounded_gt0.5"):
        assert t[f"vpd/{key}"] == pytest.approx(ce, abs=1e-5), key
    assert t["vpd/ce_all_ablated"] == pytest.approx(all_zero, abs=1e-5)
    for i in range(3):
        assert t[f"vpd/ce_layer_ablated/{i}"] == pytest.approx(ablated[i], abs=1e-5)
        assert abs(t[f"vpd/ce_layer_ablated/{i}"] - ce) > 0.01  # each block changes the output
        assert t[f"vpd/loss_recovered_layer/{i}"] == pytest.approx(1.0, abs=1e-3)
        assert t[f"vpd/l0_layer/{i}"] == 6 * 8 and t[f"vpd/alive_layer/{i}"] == 6 * 8
    assert t["vpd/l0/layers.0.attn.q"] == 8 and t["vpd/n_eval_tokens"] == 4 * 16


def test_vpd_table_rounds_masks_at_zero_and_one_half() -> None:
    target = _tiny_target()
    method, cm = _exact_decomposition(target)
    _set_ci(cm, method, {"layers.0.": 0.0, "layers.1.": 0.3})  # g = 0 in layer 0, 0.3 in layer 1, 1 in layer 2
    t = _table(target, cm, method)
    x, y = _xy()
    with torch.no_grad():
        skip0 = float(lm_loss(target(x, skip={0}), y))
        skip01 = float(lm_loss(target(x, skip={0, 1}), y))
        ce = float(lm_loss(target(x), y))
    assert t["vpd/ce_rounded_gt0"] == pytest.approx(skip0, abs=1e-5)  # layer 1's g = 0.3 rounds to 1
    assert t["vpd/ce_rounded_gt0.5"] == pytest.approx(skip01, abs=1e-5)  # and to 0 at 0.5
    assert t["vpd/ce_unmasked"] == pytest.approx(ce, abs=1e-5)  # masks of 1 whatever g is
    # layer 0 masked with g = 0 is its zero-ablation: nothing recovered; layer 2 (g = 1) all of it
    assert t["vpd/ce_layer_masked/0"] == pytest.approx(t["vpd/ce_layer_ablated/0"], abs=1e-6)
    assert t["vpd/loss_recovered_layer/0"] == pytest.approx(0.0, abs=1e-4)
    assert t["vpd/loss_recovered_layer/2"] == pytest.approx(1.0, abs=1e-3)
    assert t["vpd/l0_layer/0"] == 0 and t["vpd/alive_layer/0"] == 0  # g = 0 <= τ = 0.1
    assert t["vpd/l0_layer/1"] == 48 and t["vpd/alive/layers.1.mlp.down"] == 8  # g = 0.3 > τ
    md = vpd_table_markdown(t)
    assert "| 0 | 0.0 | 0 |" in md and f"{t['vpd/ce_rounded_gt0.5']:.4f}" in md and "| layers.2.mlp.up | 8.00 | 8 |" in md
    with pytest.raises(ValueError, match="no VPD table"):
        vpd_table_markdown({"l0": 3.0})


def test_vpd_table_in_chunks_is_the_table_in_one_batch() -> None:
    """Per-token g (random CI functions): one window at a time gives every mean, L0 and alive count of the
    one-batch table (the stochastic draw differs: r is drawn chunk by chunk)."""
    target = _tiny_target()
    method, cm = _exact_decomposition(target)
    with torch.no_grad():
        for fn in cm.method_module(CI_FNS):
            fn.layers.net[-1].weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(5))
    ctx = EvalContext(target, TINY, None, cm, method, 4, 0, torch.device("cpu"))  # type: ignore[arg-type]
    whole, parts = vpd_table(TINY, ctx), vpd_table(TINY, ctx, chunk=1)
    assert set(whole) == set(parts)
    assert 0 < whole["vpd/l0_layer/1"] < 48 and whole["vpd/alive_layer/1"] > whole["vpd/l0_layer/1"]  # g varies per token
    for k in whole:
        if k != "vpd/ce_stochastic":
            assert parts[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-5), k  # float32 sums in another order


# --- per-layer MLP replacements: SPD's side of experiments.layer_transcoders ------------------


def test_mlp_modules_group_each_layers_mlp_matrices_and_refuse_a_run_without_mlps() -> None:
    names = MultiLayerLM(MultiLMConfig(vocab_size=5, seq_len=4, n_layers=2, d_model=4, n_heads=2, d_mlp=4)).matrix_names()
    assert mlp_modules(names) == {"layers.0.mlp": ["layers.0.mlp.up", "layers.0.mlp.down"],
                                  "layers.1.mlp": ["layers.1.mlp.up", "layers.1.mlp.down"]}  # fmt: skip
    with pytest.raises(ValueError, match="no decomposed matrix lies in a module named 'mlp'"):
        mlp_modules(["layers.0.attn.q", "layers.0.attn.k"])


def test_decomposition_layer_scores_by_hand_on_an_exact_decomposition() -> None:
    """Σ subcomponents = W (an SVD), g set by hand: g = 1 is the target (all recovered), g = 0 the MLP
    zeroed (nothing), g = 0.5 halves both MLP matrices (worked out on a copy with the weights halved;
    thresholded at τ = 0.1 it is g = 1 again); the zeroed MLP is the transcoder side's ablation too."""
    target = _tiny_target()
    method, cm = _exact_decomposition(target)
    x, y = _xy()
    w = torch.cat([x, y[:, -1:]], dim=1)

    def loss_fn(m, batch):
        return lm_loss(m(batch[:, :-1]), batch[:, 1:])

    mlp = ["layers.2.mlp.up", "layers.2.mlp.down"]
    with torch.no_grad():
        clean = float(lm_loss(target(x), y))
        half = copy.deepcopy(target)
        for n in mlp:
            half.get_submodule(n).weight.mul_(0.5)
        halved = float(lm_loss(half(x), y))
    splice = module_loss_recovered(target, w, loss_fn, "layers.2.mlp", lambda h: torch.zeros_like(h))
    for g, recovered, l0 in ((1.0, 1.0, 16), (0.0, 0.0, 0), (0.5, None, 16)):
        _set_ci(cm, method, {"layers.2.mlp": g})
        with torch.no_grad():
            ci = method.causal_importances(cm, x)
        s = decomposition_layer_scores(target, cm, ci, x, y, mlp, tau=0.1)
        assert s["loss_clean"] == pytest.approx(clean, rel=1e-6)
        assert s["loss_ablated"] == pytest.approx(splice["loss_ablated"], abs=1e-5)  # zero matrices = zero MLP output
        assert abs(s["loss_ablated"] - clean) > 0.01
        assert s["l0"] == l0 and s["bits_per_token"] == pytest.approx(l0 * 3.0)  # 8 + 8 subcomponents, log2(8) = 3 bits each
        if recovered is not None:
            assert s["loss_recovered"] == pytest.approx(recovered, abs=1e-3)
        else:
            assert s["loss"] == pytest.approx(halved, abs=1e-5)
            assert s["loss_recovered"] == pytest.approx((s["loss_ablated"] - halved) / (s["loss_ablated"] - clean), abs=1e-6)
            assert s["loss_recovered_thresholded"] == pytest.approx(1.0, abs=1e-3)


def test_layer_transcoders_script_scores_a_transcoder_per_mlp_beside_spd(tmp_path) -> None:
    """A 5-step spd_lm_4l run (C 8) and a copy of it, then the script with tiny transcoders: one row per
    layer, the table, the curves and the weights written; both sides scored against the same
    zero-ablation, both runs alike."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.decompose", "experiment=spd_lm_4l", "steps=5", "n_eval=2",
                           "method.faithfulness_warmup_steps=5", "method.C=8", "method.C_per_module={mlp.up:8,mlp.down:8}",
                           "figures=false", f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(run, tmp_path / "copy")  # a second run of the same target: scored beside the first
    proc = subprocess.run([sys.executable, "-m", "experiments.layer_transcoders", str(run), str(tmp_path / "copy"), "--width", "32", "--k", "4",
                           "--steps", "20", "--eval-every", "5", "--batch-windows", "2", "--curve-windows", "2",
                           "--n-eval", "2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "layer_transcoders"
    record = json.loads((out / "layer_transcoders.json").read_text())
    assert [r["module"] for r in record["rows"]] == [f"layers.{i}.mlp" for i in range(4)]
    for r in record["rows"]:
        t, s = r["transcoder"], r["spd"][str(run)]
        assert 2 < t["l0"] <= 4 and t["bits_per_token"] == pytest.approx(t["l0"] * (5 + 8))  # top-4 (some may be 0); log2(32) + 8 bits
        assert t["loss_ablated"] == pytest.approx(s["loss_ablated"], abs=1e-4) and t["loss_clean"] == pytest.approx(s["loss_clean"], abs=1e-5)
        assert t["loss_recovered"] > 0.05 and t["steps_trained"] <= 20 and len(t["curve"]["step"]) >= 1
        assert load_sae(out / f"transcoder_{r['module']}").cfg.d_sae == 32
        assert r["spd"][str(tmp_path / "copy")] == pytest.approx(s)
    assert (out / "layer_transcoder_curves.png").stat().st_size > 10_000
    assert f"| layers.3.mlp | transcoder 32, k 4 |" in (out / "layer_transcoders.md").read_text()
    assert f"| layers.3.mlp | SPD {run} |" in (out / "layer_transcoders.md").read_text() and "layers.3.mlp" in proc.stdout
    # scoring the same transcoders again, loaded instead of trained, beside another run
    again = subprocess.run([sys.executable, "-m", "experiments.layer_transcoders", str(tmp_path / "copy"), "--load-transcoders",
                            str(out), "--n-eval", "2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    reloaded = json.loads((tmp_path / "copy" / "layer_transcoders" / "layer_transcoders.json").read_text())["rows"]
    for r, r2 in zip(record["rows"], reloaded):
        assert r2["transcoder"]["loss_recovered"] == pytest.approx(r["transcoder"]["loss_recovered"], abs=1e-6)
        assert r2["transcoder"]["curve"] == r["transcoder"]["curve"] and r2["spd"][str(tmp_path / "copy")] == pytest.approx(r["spd"][str(run)])
    bad = subprocess.run([sys.executable, "-m", "experiments.layer_transcoders", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "is not a run dir" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "experiments.layer_transcoders", str(run), "--k", "40", "--width", "32"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "--k 40 must lie in [1, --width] = [1, 32]" in bad.stderr
    # lm_1l's MLP has biases: zeroing its matrices is not zeroing its output, so the script refuses it
    one = tmp_path / "lm_1l"
    proc = subprocess.run([sys.executable, "-m", "experiments.decompose", "experiment=spd_lm_1l", "steps=3", "n_eval=2",
                           "method.faithfulness_warmup_steps=3", "method.C=8", "figures=false", f"hydra.run.dir={one}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = subprocess.run([sys.executable, "-m", "experiments.layer_transcoders", str(one)], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "have biases" in bad.stderr and "bias-free" in bad.stderr


# --- the shipped target -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return load_target(SHIPPED)


def test_shipped_target_is_the_presets_and_reproduces_its_numbers(shipped) -> None:
    model, cfg, info = shipped
    assert safe_load(SHIPPED)["format"] == "apd-target/1" and SHIPPED.stat().st_size < 2.5 * 2**20
    assert cfg == MultiLMTargetConfig(name="lm_4l") and isinstance(model, MultiLayerLM)
    _, got = get_target(MultiLMTargetConfig(name="lm_4l"))
    assert got["source"] == str(SHIPPED)
    shipped_json = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert shipped_json["command"] == "python -m experiments.train_target target=lm_4l ship=true"
    assert shipped_json["torch_threads"] == 1
    assert info["check_batch"] == {**CHECK_BATCH, "loss": pytest.approx(cfg.check_batch_loss(model), abs=1e-4)}
    # a real language model, better than the one-layer one, and every block carries part of it
    assert info["heldout_loss"] < info["unigram_heldout_loss"] - 1.5
    assert info["check_batch"]["loss"] == pytest.approx(info["heldout_loss"], abs=0.15)
    lm_1l = json.loads((PRETRAINED_DIR / "lm_1l.json").read_text())
    assert info["heldout_loss"] < lm_1l["heldout_loss"]
    assert all(a > info["heldout_loss"] + 0.05 for a in info["layer_zero_ablated_heldout_loss"])


def test_the_preset_decomposes_all_24_matrices() -> None:
    model = MultiLMTargetConfig(name="lm_4l").build()
    method = method_for(SPDConfig(C=4, C_per_module={"mlp.up": 5, "mlp.down": 5}, ci_fn="shared_mlp"))
    cm = method.build(model, MultiLMTargetConfig().modules())
    assert cm.matrix_names == model.matrix_names() and len(cm.matrix_names) == 24
    assert cm.C_per_module()["layers.3.mlp.down"] == 5 and cm.C_per_module()["layers.2.attn.o"] == 4


@pytest.mark.slow  # the preset through Hydra for a few steps (C shrunk to 8 to keep it short: the full-size preset
# runs in tests/test_experiments.py's every-preset test), then the table script
def test_spd_lm_4l_runs_end_to_end_and_prints_its_table(tmp_path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.decompose", "experiment=spd_lm_4l", "steps=5", "n_eval=4",
                           "method.faithfulness_warmup_steps=20", "method.C=8",
                           "method.C_per_module={mlp.up:8,mlp.down:8}", "figures=false", f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vpd/ce_target"] == pytest.approx(json.loads(SHIPPED.with_suffix(".json").read_text())["heldout_loss"], abs=0.2)
    assert len([k for k in metrics if k.startswith("vpd/l0/")]) == 24
    for i in range(4):
        assert metrics[f"vpd/ce_layer_ablated/{i}"] > metrics["vpd/ce_target"]
    table = subprocess.run([sys.executable, "-m", "experiments.vpd_table", str(out)], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    assert table.stdout == vpd_table_markdown(metrics)
