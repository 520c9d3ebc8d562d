"""One SPD training step of this toolkit against goodfire-ai/spd's torch step rebuilt from its published
maths (benchmarks/reference_spd.py), for every ``spd_*`` preset, side by side in one run (issue #31).

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_spd_reference.py --benchmark-json=ref.json
    python -m benchmarks.table ref.json

Groups: ``spd_vs_reference`` (per preset, ``[<preset>-toolkit]`` and ``[<preset>-reference]``),
``matmul_throughput`` (sgemm GFLOP/s at one thread, the yardstick for the steps' achieved GFLOP/s).
Each preset's settings are read from conf/experiment/spd_<preset>.yaml (C, C_per_module, batch, CI
function, losses, n_mask_samples, Δ-component, output loss, compile_ci); the toolkit side runs as
the preset runs (``compile_ci`` included: timed after the compiling first forward and backward, whose
seconds are in extra_info) through ``apd.train.train_step``. Before timing, the reference's loss terms are checked
equal to the toolkit's (rel 1e-5) from the same state and random draws. extra_info: ``flops`` of one
step (forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts
matmul-type ops only: mm, bmm, addmm, einsum's contractions; no elementwise work).

The reference has no layer routing: a preset that routes (``spd_lm_4l``) runs its ``toolkit`` side and
the equality check with ``layer_routing=all_and_layerwise`` (the reference's objective), and its
``routed`` side is the preset as it runs. Token targets report ``tokens`` per step in extra_info
(``benchmarks.table`` prints tokens/s).

Besides the preset as it runs (``toolkit``), options that change the objective or the arithmetic are
timed in the same rounds from the same start: ``routed`` (``layer_routing=uniform_k_subset``: one masked
pass instead of 1 + L), when ``SPDConfig`` has ``precision``, ``bf16`` and ``routed_bf16``, and
``compiled`` (``compile_ci=on``: for the presets whose runs are too short for ``auto`` to compile). Their
FLOPs are not counted (a routed step's depend on its draws).

``ci_only`` times the preset's causal-importance functions alone (forward and backward, as the toolkit
step runs them) on the step's inner activations: work every step of the preset does on either side. The
reference's step over it is the most any speed-up of the rest of the step could reach (``benchmarks.table``'s
last column).
"""

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from apd import SPDConfig
from apd.global_ci import GlobalMLPCI
from apd.methods import method_for
from apd.methods.spd import ci_functions
from apd.optim import make_optimizer
from apd.targets import PRETRAINED_DIR, LMTargetConfig, get_target, load_target
from apd.train import train_step
from benchmarks.conftest import SMOKE, size
from benchmarks.reference_spd import ReferenceSPD, paired_loss_terms, reference_optimizer, reference_train_step

CONF = Path(__file__).resolve().parents[1] / "conf" / "experiment"
PRESETS = ["tms_5_2", "tms_5_2_id", "tms_40_10", "tms_40_10_id", "resid_mlp_1", "resid_mlp_2", "resid_mlp_3", "lm_1l",
           "lm_4l"]  # fmt: skip
ROUNDS = {"tms_5_2": 60, "tms_5_2_id": 60, "tms_40_10": 60, "tms_40_10_id": 40, "resid_mlp_1": 40, "resid_mlp_2": 20,
          "resid_mlp_3": 20, "lm_1l": 20, "lm_4l": 8}  # fmt: skip
"""timed steps per side (after one warm-up step); each timed step is preceded by an untimed step of the
other side, so the two sides' rounds interleave (A, B, A, B, ...) and share the machine's state. The
group takes ~4-5 min on this 2-core machine with other jobs on it."""


def preset(name: str) -> tuple[str, dict, int]:
    """(target name, the preset's ``method`` block, batch size) of conf/experiment/spd_<name>.yaml."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"spd_{name}.yaml"))
    target = next(d["override /target"] for d in raw["defaults"] if isinstance(d, dict) and "override /target" in d)
    return target, dict(raw["method"]), int(raw["batch_size"])


def _target(name: str):
    if name == "lm_1l":
        tcfg = LMTargetConfig()
        model, _ = get_target(tcfg)
        return model, tcfg
    model, tcfg, _ = load_target(PRETRAINED_DIR / f"{name}.pt")
    return model, tcfg


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class _Case:
    """Both sides of one preset: the toolkit's component model, the reference copied from its state."""

    def __init__(self, name: str):
        target_name, kwargs, batch = preset(name)
        kwargs["layer_routing"] = "all_and_layerwise"  # the reference's objective (the `routed` side: the routed one)
        if SMOKE:
            kwargs["compile_ci"] = False  # compiling takes 10-30 s; compile_ci is tested in tests/test_spd.py
        model, tcfg = _target(target_name)
        self.config = SPDConfig(**kwargs)
        self.method = method_for(self.config)
        self.cm = self.method.build(model, tcfg.modules())
        self.ref = ReferenceSPD.from_toolkit(self.cm, self.method, model)
        self.x = tcfg.batch(size(batch, 2 if target_name.startswith("lm_") else 32), torch.Generator().manual_seed(0))
        # the first forward and backward compile the CI functions where compile_ci does (auto: decided
        # here); no update, so the state the equality check below starts from is the initial one
        start = time.perf_counter()
        self.method.loss_terms(self.cm, self.x, 0, self.method.capture_names(self.cm))["total"].backward()
        self.cm.zero_grad(set_to_none=True)
        fns = ci_functions(self.cm)
        self.ci_compiled = any("forward" in f.__dict__ for f in (fns.modules() if isinstance(fns, GlobalMLPCI) else fns))
        self.compile_seconds = time.perf_counter() - start if self.ci_compiled else 0.0
        ours, theirs = paired_loss_terms(self.cm, self.method, self.ref, self.x, 0)  # same state, same draws
        for term in ("stochastic_recon", "stochastic_recon_layerwise", "importance_minimality", "total"):
            if term in ours:
                assert theirs[term] == pytest.approx(ours[term], rel=1e-5), (name, term, ours, theirs)
        self.opt = make_optimizer(self.config.optimizer, self.cm.trainable_parameters().values(), self.config.lr)
        self.ref_opt = reference_optimizer(self.ref, self.config.lr)
        # FLOPs of one step each, the toolkit's on an eager twin (the count does not depend on compiling)
        twin_method = method_for(SPDConfig(**{**kwargs, "compile_ci": False}))
        twin = twin_method.build(model, tcfg.modules())
        twin_opt = make_optimizer(self.config.optimizer, twin.trainable_parameters().values(), self.config.lr)
        self.flops = _count_flops(lambda: train_step(twin, twin_opt, self.x, twin_method, 0))
        self.ref_flops = _count_flops(lambda: reference_train_step(self.ref, self.ref_opt, self.x, 0, self.config))
        self.initial = {k: v.clone() for k, v in self.cm.state_dict().items()}
        train_step(self.cm, self.opt, self.x, self.method, 0)  # the warm-up step
        self.steps = iter(range(1, 10**9))
        self.ref_steps = iter(range(1, 10**9))

        self.kwargs, self.model, self.tcfg = kwargs, model, tcfg
        self.variants: dict[str, tuple] = {}
        # the CI functions' own work (``ci_only``): their inputs as the step computes them, leaves here
        with torch.no_grad(), self.cm.capture(self.cm.layer_names, inputs=True) as a_in:
            self.cm(self.x)
        self.ci_in = {n: (self.cm.layers[n].component_acts(a).detach().requires_grad_(True), a) for n, a in a_in.items()}

    def ci_step(self) -> None:
        """Forward and backward of the preset's causal-importance functions alone (as the toolkit step runs
        them, compiled where ``compile_ci`` compiled them), on the step's inner activations: work every
        SPD step of this preset does, here and in the reference, whatever else it saves."""
        fns = ci_functions(self.cm)
        fns.zero_grad(set_to_none=True)  # as the step does: its backward writes the gradients, not adds to them
        for v, _ in self.ci_in.values():
            v.grad = None
        if isinstance(fns, GlobalMLPCI):
            outs = list(fns({n: a for n, (_, a) in self.ci_in.items()},
                            {n: v for n, (v, _) in self.ci_in.items() if fns.reads_inner[n]}).values())  # fmt: skip
        else:
            outs = [fns.fn(n)(v, a) for n, (v, a) in self.ci_in.items()]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def toolkit_step(self) -> None:
        train_step(self.cm, self.opt, self.x, self.method, next(self.steps))

    def variant_step(self, variant: str) -> None:
        """One step of the preset with a variant's options (built from the toolkit side's initial state,
        with one untimed warm-up step, on first use)."""
        if variant not in self.variants:
            kwargs = {**self.kwargs, **VARIANTS[variant]}
            if SMOKE:
                kwargs["compile_ci"] = False
            method = method_for(SPDConfig(**kwargs))
            cm = method.build(self.model, self.tcfg.modules())
            cm.load_state_dict(self.initial)
            opt = make_optimizer(self.config.optimizer, cm.trainable_parameters().values(), self.config.lr)
            steps = iter(range(10**9))
            train_step(cm, opt, self.x, method, next(steps))
            self.variants[variant] = (cm, opt, method, steps)
        cm, opt, method, steps = self.variants[variant]
        train_step(cm, opt, self.x, method, next(steps))

    def reference_step(self) -> None:
        reference_train_step(self.ref, self.ref_opt, self.x, next(self.ref_steps), self.config)


_CASES: dict[str, _Case] = {}


def _case(name: str) -> _Case:
    if name not in _CASES:
        _CASES.clear()  # one preset at a time in memory
        _CASES[name] = _Case(name)
    return _CASES[name]


VARIANTS = {"routed": {"layer_routing": "uniform_k_subset"}}
"""the toolkit's options timed beside the preset: {side: SPDConfig fields over the preset's}"""
if "precision" in {f.name for f in dataclasses.fields(SPDConfig)}:
    VARIANTS |= {"bf16": {"precision": "bf16"}, "routed_bf16": {"layer_routing": "uniform_k_subset", "precision": "bf16"}}
VARIANTS["compiled"] = {"compile_ci": "on"}  # the CI functions compiled whatever the run's length (auto's choice aside)
SIDES = ("toolkit", "reference", *VARIANTS, "ci_only")


@pytest.mark.parametrize("name,side", [(p, s) for p in PRESETS for s in SIDES],
                         ids=[f"{p}-{s}" for p in PRESETS for s in SIDES])  # fmt: skip
@pytest.mark.benchmark(group="spd_vs_reference")
def test_spd_vs_reference(benchmark, name, side):
    case = _case(name)
    if side in VARIANTS:
        fn, other = (lambda: case.variant_step(side)), case.reference_step
    elif side == "ci_only":
        fn, other = case.ci_step, case.reference_step
    else:
        fn, other = (case.toolkit_step, case.reference_step) if side == "toolkit" else (case.reference_step, case.toolkit_step)
    benchmark.pedantic(fn, setup=other, rounds=ROUNDS[name], iterations=1, warmup_rounds=1)  # the other side between rounds
    flops = {"toolkit": case.flops, "reference": case.ref_flops}.get(side)
    benchmark.extra_info.update({"preset": name, "side": side, "flops": flops,
                                 "batch": int(case.x.shape[0]), "compile_ci": case.ci_compiled and side == "toolkit"})  # fmt: skip
    if not case.x.is_floating_point():  # token windows
        benchmark.extra_info["tokens"] = int(case.x.numel())
    if side == "toolkit" and case.ci_compiled:
        benchmark.extra_info["compile_seconds"] = case.compile_seconds


MATMULS = {"1024x100x200": (1024, 100, 200), "2048x128x512": (2048, 128, 512), "1024x1024x1024": (1024, 1024, 1024)}
"""[m, k] @ [k, n]: a residual-MLP layer's batch through a factor, an LM MLP matrix on a window batch, a large one"""


@pytest.mark.parametrize("shape", list(MATMULS))
@pytest.mark.benchmark(group="matmul_throughput")
def test_matmul_throughput(benchmark, shape):
    """sgemm (float32, one thread) at the sizes that matter: GFLOP/s in extra_info (2·m·k·n per product)."""
    m, k, n = MATMULS[shape]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    benchmark.pedantic(lambda: torch.mm(a, b, out=out), rounds=size(20, 1), iterations=size(5, 1), warmup_rounds=1)
    flops = 2 * m * k * n
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_per_s"] = flops / benchmark.stats.stats.median / 1e9
