"""What ``SPDConfig.compile_ci`` costs and saves on an SPD preset's step (the numbers behind
``compile_ci=auto``'s rule): the first compiled step's seconds, then eager and compiled steps
interleaved, one thread. Cold or warm inductor cache is chosen by TORCHINDUCTOR_CACHE_DIR:

    rm -rf /tmp/ind; for i in cold warm; do TORCHINDUCTOR_CACHE_DIR=/tmp/ind OMP_NUM_THREADS=1 \\
        python -m benchmarks.compile_ci_cost tms_5_2 10; done
"""

import sys
import time

import torch

from apd import SPDConfig
from apd.methods import method_for
from apd.optim import make_optimizer
from apd.train import train_step
from benchmarks.test_benchmarks import _target

CASES = {"tms_5_2": (dict(C=20), 1024), "tms_40_10": (dict(C=200, importance_minimality_coeff=2e-4, pnorm=2.0), 512),
         "resid_mlp_3": (dict(C=200, importance_minimality_coeff=1e-5, pnorm=2.0), 1024)}  # fmt: skip


def _setup(case: str, **extra):
    kwargs, batch = CASES[case]
    model, tcfg = _target(case)
    method = method_for(SPDConfig(**kwargs, **extra))
    cm = method.build(model, tcfg.modules())
    return cm, method, make_optimizer("adam", cm.trainable_parameters().values(), 1e-3), tcfg.batch(batch, torch.Generator().manual_seed(0))


def main(case: str, reps: int) -> None:
    torch.set_num_threads(1)
    eager, compiled = _setup(case), _setup(case, compile_ci="on")
    for i in range(2):
        train_step(eager[0], eager[2], eager[3], eager[1], i)
    start = time.perf_counter()
    train_step(compiled[0], compiled[2], compiled[3], compiled[1], 0)
    first = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(reps):
        for key, (cm, method, opt, x) in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            train_step(cm, opt, x, method, i + 2)
            times[key].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{case}: first compiled step {first:.1f} s; median step eager {med['eager'] * 1e3:.1f} ms, compiled "
          f"{med['compiled'] * 1e3:.1f} ms; saving {(med['eager'] - med['compiled']) * 1e3:.1f} ms/step")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
