"""Speed and memory of the hot paths (pytest-benchmark). Run: pytest benchmarks --benchmark-json=out.json

Groups: attribution (batched vs the per-output loop, and the batched modes against each other),
step (one APD training step, the toolkit's and the straightforward baseline's), seeds (a short TMS
5-2 run of one seed against 12 seeds trained at once; seconds per seed-step in extra_info), sae
(one SAE step at a matched size), memory (peak allocation of a step in extra_info). One torch thread
throughout (benchmarks/conftest.py). ``APD_BENCH_DEVICE=cuda`` runs the same cases on a GPU
(timings then synchronise the device; peak memory is the device's peak allocation).
"""

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from apd import APDConfig, ComponentModel, SPDConfig, decompose, decompose_seeds, gradient_attributions, gradient_attributions_loop
from apd.baselines import BatchTopKSAE, BatchTopKSAEConfig, TrainStepInput
from apd.optim import make_optimizer
from apd.targets import PRETRAINED_DIR, load_target
from apd.train import train_step
from apd.methods import method_for
from benchmarks.baseline import reference_attributions, reference_spd_step, reference_step
from benchmarks.conftest import SMOKE, size

DEVICE = torch.device(os.environ.get("APD_BENCH_DEVICE", "cpu"))

RESID = dict(C=130, topk=1.28, simplicity_coeff=10.0, schatten_p=0.9, act_recon_coeff=1.0,
             act_recon_modules=["layers.0.act"], lr=1e-3, steps=10_000)  # fmt: skip
CASES = {
    "tms_5_2": (dict(C=5, topk=0.211, simplicity_coeff=0.7, lr=3e-2, steps=5000), 2048, []),
    "tms_40_10": (dict(C=40, topk=2.0, minimality_coeff=10, simplicity_coeff=15, schatten_p=0.9, lr=1e-3, steps=20_000), 2048, []),
    "resid_mlp_1_full_rank": (dict(RESID, rank=None), 256, ["layers.0.act"]),
    "resid_mlp_1_rank_1": (dict(RESID, rank=1), 256, ["layers.0.act"]),
}


def _target(name: str):
    model, cfg, _ = load_target(PRETRAINED_DIR / f"{name}.pt")
    return model, cfg


def _setup(case: str):
    kwargs, batch, act = CASES[case]
    model, tcfg = _target("resid_mlp_1" if case.startswith("resid") else case)
    cfg = APDConfig(**kwargs, device=str(DEVICE))
    cm = ComponentModel(model, tcfg.modules(), cfg.C, cfg.rank).to(DEVICE)
    x = tcfg.batch(size(batch, 16), torch.Generator().manual_seed(0)).to(DEVICE)
    return cm, cfg, x, act


def _synced(fn):
    """fn, then wait for the device (a CUDA kernel launch returns before the kernel ends)."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _peak_mib(fn) -> float:
    """Peak memory that torch allocates while running fn, above what was allocated before it: the
    device's peak allocation on CUDA; on the CPU the running sum of the allocations and frees that
    the profiler records (``profile_memory=True``), in time order. Unlike the process's resident
    memory this does not read 0 when the allocator reuses memory freed earlier."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak / 2**20


@pytest.fixture(scope="module")
def resid_full():
    return _setup("resid_mlp_1_full_rank")


@pytest.mark.benchmark(group="attribution")
def test_gradient_attribution_loop(benchmark, resid_full):
    cm, _, x, _ = resid_full
    result = benchmark(_synced(lambda: gradient_attributions_loop(cm, x).detach()))
    torch.testing.assert_close(result, gradient_attributions(cm, x).detach(), rtol=1e-3, atol=1e-6)


@pytest.mark.benchmark(group="attribution")
def test_gradient_attribution_batched(benchmark, resid_full):
    cm, _, x, _ = resid_full
    benchmark(_synced(lambda: gradient_attributions(cm, x).detach()))


@pytest.mark.parametrize("mode", ["per_sample", "hidden"])
@pytest.mark.benchmark(group="attribution")
def test_gradient_attribution_mode(benchmark, resid_full, mode):
    """The two batched modes on the same case ("auto" picks per_sample here)."""
    cm, _, x, _ = resid_full
    result = benchmark(_synced(lambda: gradient_attributions(cm, x, mode).detach()))
    torch.testing.assert_close(result, gradient_attributions(cm, x, "jacrev").detach(), rtol=1e-3, atol=1e-6)


@pytest.mark.benchmark(group="attribution")
def test_gradient_attribution_reference(benchmark, resid_full):
    """The baseline's attribution (as in the reference code), for the ratio in the README."""
    cm, _, x, _ = resid_full
    benchmark(_synced(lambda: reference_attributions(cm, x).detach()))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="step")
def test_step(benchmark, case):
    cm, cfg, x, act = _setup(case)
    opt = make_optimizer("adam", cm.component_parameters(), cfg.lr)
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, cfg, next(step), act)))
    benchmark.extra_info["peak_mib"] = _peak_mib(lambda: train_step(cm, opt, x, cfg, 0, act))


@pytest.mark.benchmark(group="step")
def test_step_compiled(benchmark):
    """TMS 40-10 step with compile=True (torch.compile of the loss); compilation happens in the
    warm-up call before timing, its duration is in extra_info."""
    import time

    if SMOKE:
        pytest.skip("compiling takes 10-25 s; the compiled step is checked by tests/test_train_options.py::test_compiled_loss_matches_eager")
    cm, cfg, x, act = _setup("tms_40_10")
    cfg = APDConfig(**{**cfg.to_dict(), "compile": True})
    opt = make_optimizer("adam", cm.component_parameters(), cfg.lr)
    start = time.perf_counter()
    _synced(lambda: train_step(cm, opt, x, cfg, 0, act))()
    compile_seconds = time.perf_counter() - start
    step = iter(range(1, 10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, cfg, next(step), act)))
    benchmark.extra_info["compile_seconds"] = compile_seconds


@pytest.mark.parametrize("case", ["tms_40_10", "resid_mlp_1_full_rank", "resid_mlp_1_rank_1"])
@pytest.mark.benchmark(group="step")
def test_step_baseline(benchmark, case):
    cm, cfg, x, act = _setup(case)
    opt = make_optimizer("adam", cm.component_parameters(), cfg.lr)
    benchmark(_synced(lambda: reference_step(cm, opt, x, cfg, act)))
    benchmark.extra_info["peak_mib"] = _peak_mib(lambda: reference_step(cm, opt, x, cfg, act))


@pytest.mark.parametrize("case", ["tms_40_10", "resid_mlp_1_rank_1"])
@pytest.mark.benchmark(group="memory")
def test_step_memory(benchmark, case):
    cm, cfg, x, act = _setup(case)
    opt = make_optimizer("adam", cm.component_parameters(), cfg.lr)
    benchmark.extra_info["peak_mib"] = benchmark.pedantic(
        lambda: _peak_mib(lambda: train_step(cm, opt, x, cfg, 0, act)), rounds=3, iterations=1
    )


@pytest.mark.parametrize("d_in,d_sae,batch", [(10, 40, 2048), (50, 130, 256)], ids=["tms_40_10_hidden", "resid_mlp_neurons"])
@pytest.mark.benchmark(group="sae")
def test_sae_step(benchmark, d_in, d_sae, batch):
    """One BatchTopK SAE step at the size of the APD run on the same target."""
    sae = BatchTopKSAE(BatchTopKSAEConfig(d_in=d_in, d_sae=d_sae, k=2.0)).to(DEVICE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(size(batch, 32), d_in, device=DEVICE)

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step(out)

    benchmark(_synced(step))



SEED_STEPS = size(100, 3)


def _seeds_config() -> APDConfig:
    """The tms_5_2 preset's method (conf/experiment/tms_5_2.yaml) for SEED_STEPS steps."""
    return APDConfig(C=10, init_scale=0.1, topk=0.211, min_active=8, simplicity_coeff=1.5, lr=3e-2,
                     steps=SEED_STEPS, log_every=SEED_STEPS, device=str(DEVICE))  # fmt: skip


@pytest.mark.parametrize("n_seeds", [1, 12])
@pytest.mark.benchmark(group="seeds")
def test_seeds_at_once(benchmark, n_seeds):
    """TMS 5-2 preset (C 10), SEED_STEPS steps for n_seeds seeds in one vectorised run (decompose_seeds)."""
    model, tcfg = _target("tms_5_2")
    cfg = _seeds_config()
    run = lambda: decompose_seeds(model, lambda: tcfg.batch(size(2048, 64), None), cfg, tcfg.modules(), range(n_seeds), progress=False)  # noqa: E731
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_seed_step"] = benchmark.stats.stats.mean / (SEED_STEPS * n_seeds) * 1e3 if benchmark.stats else float("nan")


@pytest.mark.benchmark(group="seeds")
def test_seeds_one_at_a_time(benchmark):
    """The same run through decompose (one seed; its auto attribution mode)."""
    model, tcfg = _target("tms_5_2")
    cfg = _seeds_config()
    run = lambda: decompose(model, lambda: tcfg.batch(size(2048, 64), None), cfg, tcfg.modules(), progress=False)  # noqa: E731
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_seed_step"] = benchmark.stats.stats.mean / SEED_STEPS * 1e3 if benchmark.stats else float("nan")


SPD_CASES = {  # the spd_* presets' methods at their batch sizes (faithfulness off, as the presets pin it)
    "tms_40_10": (dict(C=200, importance_minimality_coeff=2e-4, pnorm=2.0, faithfulness_coeff=None), 512),
    "resid_mlp_1": (dict(C=100, importance_minimality_coeff=1e-5, pnorm=2.0, faithfulness_coeff=None), 1024),
    "resid_mlp_3": (dict(C=200, importance_minimality_coeff=1e-5, pnorm=2.0, faithfulness_coeff=None), 1024),
}


def _spd_setup(case: str, **extra):
    kwargs, batch = SPD_CASES[case]
    model, tcfg = _target(case)
    method = method_for(SPDConfig(**kwargs, **extra, device=str(DEVICE)))
    cm = method.build(model.to(DEVICE), tcfg.modules())
    opt = make_optimizer("adam", cm.trainable_parameters().values(), 1e-3)
    x = tcfg.batch(size(batch, 32), torch.Generator().manual_seed(0)).to(DEVICE)
    return cm, method, opt, x


@pytest.mark.parametrize("case", list(SPD_CASES))
@pytest.mark.benchmark(group="spd_step")
def test_spd_step(benchmark, case):
    cm, method, opt, x = _spd_setup(case)
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))
    benchmark.extra_info["peak_mib"] = _peak_mib(lambda: train_step(cm, opt, x, method, 0))


@pytest.mark.benchmark(group="spd_step")
def test_spd_step_w_out_C40(benchmark):
    """``test_spd_step[resid_mlp_3]`` with 40 subcomponents for each W_out instead of 200 (``C_per_module``;
    its W_out is one rank-50 mechanism of about 18 live subcomponents)."""
    cm, method, opt, x = _spd_setup("resid_mlp_3", C_per_module={"mlp_out": 40})
    assert cm.C_per_module()["layers.0.mlp_out"] == 40 and cm.C_per_module()["layers.0.mlp_in"] == 200
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))
    benchmark.extra_info["peak_mib"] = _peak_mib(lambda: train_step(cm, opt, x, method, 0))


@pytest.mark.parametrize("case", ["resid_mlp_1", "resid_mlp_3"])
@pytest.mark.benchmark(group="spd_step")
def test_spd_step_recomputed_inner(benchmark, case, monkeypatch):
    """The toolkit's step with the reuse of the target pass's inner activations V_cᵀ a switched off:
    every masked forward computes them again (as before 2026-12-02)."""
    from apd.methods.spd import SPDStep

    cm, method, opt, x = _spd_setup(case)
    torch.manual_seed(1)
    ours = method.loss_terms(cm, x, 0)["total"].item()
    monkeypatch.setattr(SPDStep, "inner_acts", lambda self, masked: {})
    torch.manual_seed(1)
    assert method.loss_terms(cm, x, 0)["total"].item() == pytest.approx(ours, rel=1e-5)
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))


@pytest.mark.parametrize("case", ["resid_mlp_1", "resid_mlp_3"])
@pytest.mark.benchmark(group="spd_step")
def test_spd_step_compiled_ci(benchmark, case):
    """The toolkit's step with ``compile_ci=True`` (the CI MLPs through torch.compile), timed after the
    compiling warm-up call (its duration in extra_info)."""
    import time

    if SMOKE:
        pytest.skip("compiling takes 10-30 s; compile_ci runs in tests/test_spd.py::test_compiled_ci_functions_match_eager")
    cm, method, opt, x = _spd_setup(case, compile_ci=True)
    start = time.perf_counter()
    _synced(lambda: train_step(cm, opt, x, method, 0))()
    compile_seconds = time.perf_counter() - start
    step = iter(range(1, 10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))
    benchmark.extra_info["compile_seconds"] = compile_seconds


@pytest.mark.parametrize("case", list(SPD_CASES))
@pytest.mark.benchmark(group="spd_step")
def test_spd_step_baseline(benchmark, case):
    """The same step with per-sample masked weights materialised and applied one module at a time."""
    cm, method, opt, x = _spd_setup(case)
    torch.manual_seed(1)  # same random masks: the same loss as the toolkit's step
    ours = method.loss_terms(cm, x, 0)["total"].item()
    torch.manual_seed(1)
    assert reference_spd_step(cm, opt, x, method) == pytest.approx(ours, rel=1e-4)
    benchmark(_synced(lambda: reference_spd_step(cm, opt, x, method)))
    benchmark.extra_info["peak_mib"] = _peak_mib(lambda: reference_spd_step(cm, opt, x, method))


def _spd_lm_setup():
    """spd_lm_1l's method on the shipped language model, one step's batch of 16 windows of 128 tokens."""
    from apd.targets import LMTargetConfig, get_target

    tcfg = LMTargetConfig()
    model, _ = get_target(tcfg)
    method = method_for(SPDConfig(C=512, ci_fn="shared_mlp", ci_hidden=[128], output_loss="kl", importance_minimality_coeff=1e-3,
                                  pnorm=2.0, pnorm_final=1.0, pnorm_anneal_end_frac=0.8, steps=16_000, device=str(DEVICE)))  # fmt: skip
    cm = method.build(model.to(DEVICE), tcfg.modules())
    opt = make_optimizer("adam", cm.trainable_parameters().values(), 1e-3)
    x = tcfg.batch(size(16, 2), torch.Generator().manual_seed(0)).to(DEVICE)
    return cm, method, opt, x


def _squash_setup(case: str):
    return _spd_lm_setup() if case == "lm_1l" else _spd_setup(case)


@pytest.mark.parametrize("case", ["resid_mlp_3", "lm_1l"])
@pytest.mark.benchmark(group="spd_squash")
def test_spd_step_fused_squash(benchmark, case):
    """The toolkit's SPD step: g and g⁺ from one fused autograd node, masks as one lerp."""
    cm, method, opt, x = _squash_setup(case)
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))


@pytest.mark.parametrize("case", ["resid_mlp_3", "lm_1l"])
@pytest.mark.benchmark(group="spd_squash")
def test_spd_step_separate_squash(benchmark, case, monkeypatch):
    """The same step as before 2026-12-02: the two hard sigmoids as separate autograd paths and the
    masks g + (1 − g)·r in three passes (the same loss, to rounding)."""
    import apd.methods.spd as spd
    from benchmarks.baseline import separate_leaky_hard_sigmoids, stochastic_mask_before

    cm, method, opt, x = _squash_setup(case)
    torch.manual_seed(1)
    ours = method.loss_terms(cm, x, 0)["total"].item()
    monkeypatch.setattr(spd, "leaky_hard_sigmoids", separate_leaky_hard_sigmoids)
    monkeypatch.setattr(spd, "stochastic_mask", stochastic_mask_before)
    torch.manual_seed(1)
    assert method.loss_terms(cm, x, 0)["total"].item() == pytest.approx(ours, rel=1e-5)
    step = iter(range(10**9))
    benchmark(_synced(lambda: train_step(cm, opt, x, method, next(step))))


MIN_ROWS = size(2048, 64)  # rows of g⁺ in the minimality benchmark: the 1-layer LM's 16 windows of 128 tokens


@pytest.mark.parametrize("power", ["toolkit", "pow"])
@pytest.mark.benchmark(group="minimality_power")
def test_importance_minimality_power(benchmark, power, monkeypatch):
    """The importance minimality loss at p 1, forward and backward, on g⁺ of [2048, 512] for each of the
    1-layer LM's two decomposed matrices (``spd_lm_1l``: 16 windows of 128 tokens, C 512): ``toolkit`` takes
    (g⁺)^1 as g⁺ itself, ``pow`` as ``Tensor.pow`` (the loss before 2026-12-06; the same values)."""
    import apd.losses.importance_minimality as im

    torch.manual_seed(0)
    leaves = [torch.rand(MIN_ROWS, 512, requires_grad=True) for _ in range(2)]
    ci_upper = {"mlp.up": leaves[0], "mlp.down": leaves[1]}
    p = 1.0
    ours = im.importance_minimality_loss(ci_upper, p).item()
    if power == "pow":
        monkeypatch.setattr(im, "_power", lambda x, q: x.pow(q))
        assert im.importance_minimality_loss(ci_upper, p).item() == pytest.approx(ours, rel=1e-6)

    def run():
        for g in leaves:
            g.grad = None  # as a step's zero_grad leaves them
        im.importance_minimality_loss(ci_upper, p).backward()

    benchmark(run)


DP_STEPS, DP_WINDOWS = size(6, 1), size(32, 4)  # timed steps; global batch (windows of 128 tokens) of the data-parallel benchmark


@pytest.mark.benchmark(group="data_parallel")
def test_data_parallel_throughput(benchmark, tmp_path):
    """The language-model SPD step (spd_lm_1l's method, a global batch of 32 windows of 128 tokens)
    in one process and in each of two torchrun processes (gloo, one thread each): tokens per second
    per process, both from this run (extra_info), and their ratio."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    worker = str(root / "benchmarks" / "dp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def run(n: int) -> dict:
        out = tmp_path / f"dp{n}.json"
        prefix = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        proc = subprocess.run([*prefix, worker, str(DP_STEPS), str(DP_WINDOWS), str(out)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    one = run(1)
    two = benchmark.pedantic(lambda: run(2), rounds=1, iterations=1)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["windows_per_rank"] == DP_WINDOWS // 2
    benchmark.extra_info.update({
        "tokens_per_s_per_process_1": one["tokens_per_second_per_process"],
        "tokens_per_s_per_process_2": two["tokens_per_second_per_process"],
        "per_process_ratio_2_over_1": two["tokens_per_second_per_process"] / one["tokens_per_second_per_process"],
        "total_ratio_2_over_1": 2 * two["tokens_per_second_per_process"] / one["tokens_per_second_per_process"],
    })  # fmt: skip
