"""``precision=bf16`` on an SPD preset's step (the numbers behind ``MethodConfig.precision`` and
docs/guide/precision.md), one thread:

    OMP_NUM_THREADS=1 python -m benchmarks.bf16_step error tms_5_2 resid_mlp_1 lm_1l
    OMP_NUM_THREADS=1 python -m benchmarks.bf16_step time tms_5_2 resid_mlp_1 resid_mlp_3 lm_1l

``error``: from one state (after the faithfulness warm-up, or a finished run's with STATE=<its
decomposition.pt>) and the same random draws, each loss term's relative difference bf16 vs fp32 and
the gradient's cosine and relative error (components, CI functions, all); beside them the fp32 step's
own noise (the same state under other mask draws) and bf16 with the target pass in bfloat16 too.
``time``: median CPU time of ``train_step`` per variant over ROUNDS (default 8) interleaved rounds
(fp32, bf16, bf16 with the target pass in bfloat16), after one untimed round.
"""

import contextlib
import dataclasses
import os
import sys
import time

import torch

import apd.methods.spd as spd_module
from apd import SPDConfig, load_decomposition
from apd.methods import method_for
from apd.optim import make_optimizer
from apd.precision import full_precision
from apd.train import _factors, loss_terms, train_step
from benchmarks.test_spd_reference import _target, preset


def _setup(name: str):
    target_name, kwargs, batch = preset(name)
    model, tcfg = _target(target_name)
    config = SPDConfig(**{**kwargs, "compile_ci": False})
    m32, m16 = method_for(config), method_for(dataclasses.replace(config, precision="bf16"))
    cm = m32.build(model, tcfg.modules())
    if os.environ.get("STATE"):
        own = load_decomposition(os.environ["STATE"]).attach(model).trainable_parameters()
        with torch.no_grad():
            for n, p in cm.trainable_parameters().items():
                p.copy_(own[n])
    else:
        m32.warmup(_factors(cm, cm.trainable_parameters()), cm.target_weights())
    return cm, m32, m16, tcfg.batch(batch, torch.Generator().manual_seed(0)), batch


def _target_pass(bf16: bool) -> None:
    spd_module.full_precision = contextlib.nullcontext if bf16 else full_precision  # type: ignore[assignment]


def _terms_and_grads(cm, method, x, seed: int, target_bf16: bool = False):
    _target_pass(target_bf16)
    for p in cm.trainable_parameters().values():
        p.grad = None
    torch.manual_seed(seed)
    terms = loss_terms(cm, x, method)  # the step's autocast region
    terms["total"].backward()
    _target_pass(False)
    return {k: float(v.detach()) for k, v in terms.items()}, {n: p.grad.clone() for n, p in cm.trainable_parameters().items()
                                                               if p.grad is not None}  # fmt: skip


def _compare(a: dict, b: dict, keys: list[str]) -> str:
    va, vb = torch.cat([a[k].flatten() for k in keys]), torch.cat([b[k].flatten() for k in keys])
    return f"cos {float(va @ vb / (va.norm() * vb.norm())):.6f} rel.err {float((va - vb).norm() / vb.norm()):.2e}"


def error(name: str) -> None:
    cm, m32, m16, x, batch = _setup(name)
    t32, g32 = _terms_and_grads(cm, m32, x, 0)
    variants = {"fp32, other draws": _terms_and_grads(cm, m32, x, 1), "bf16": _terms_and_grads(cm, m16, x, 0),
                "bf16, target pass bf16": _terms_and_grads(cm, m16, x, 0, target_bf16=True)}  # fmt: skip
    print(f"== {name} (batch {batch}; state: {os.environ.get('STATE') or 'after the faithfulness warm-up'})")
    for k, v in t32.items():
        diffs = "  ".join(f"{label} {(t[k] - v) / abs(v):+.1e}" for label, (t, _) in variants.items()) if v else ""
        print(f"  {k:28s} fp32 {v:.4g}   rel. diff: {diffs}")
    comp = [k for k in g32 if "ci_fns" not in k]
    ci = [k for k in g32 if "ci_fns" in k]
    for label, keys in (("components", comp), ("CI functions", ci), ("all", comp + ci)):
        print(f"  gradient of {label}: " + " | ".join(f"{v}: {_compare(g, g32, keys)}" for v, (_, g) in variants.items()))


def timing(name: str, rounds: int) -> None:
    cm, m32, m16, x, _ = _setup(name)
    opt = make_optimizer(m32.config.optimizer, cm.trainable_parameters().values(), m32.config.lr)
    variants = {"fp32": (m32, False), "bf16": (m16, False), "bf16 (target pass bf16)": (m16, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    step = 0
    for r in range(rounds + 1):
        for k, (method, target_bf16) in variants.items():
            _target_pass(target_bf16)
            start = time.process_time()
            train_step(cm, opt, x, method, step)
            if r:
                times[k].append(time.process_time() - start)
            step += 1
    _target_pass(False)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) + f"; bf16 {med['fp32'] / med['bf16']:.2f}x")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *names = sys.argv[1:]
    rounds = int(os.environ.get("ROUNDS", "8"))
    for n in names:
        error(n) if mode == "error" else timing(n, rounds)
        sys.stdout.flush()
