"""A decomposition as a process of a ``torchrun`` group, or alone: the data-parallel equivalence tests.

    python -m torch.distributed.run --nproc_per_node=2 tests/workers/decompose_worker.py METHOD STEPS OUT.pt
    python tests/workers/decompose_worker.py METHOD STEPS OUT.pt          # one process, same global batch

Decomposes the shipped TMS 5-2 with a global batch of 256 drawn from the global RNG (every rank
draws the same batch and keeps its share) and writes the trained tensors (rank 0).
"""

import sys

import torch

from apd import APDConfig, SPDConfig, decompose
from apd.distributed import exit_now, init_from_env, is_main, shutdown
from apd.targets import PRETRAINED_DIR, load_target


def main(method: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    model, target, _ = load_target(PRETRAINED_DIR / "tms_5_2.pt")
    if method == "apd":  # batch top-k and min_active: selections over the global batch
        config = APDConfig(C=10, init_scale=0.1, topk=0.3, min_active=4, simplicity_coeff=1.5, lr=1e-2, steps=steps,
                           grad_clip_norm=0.5, log_every=5)  # fmt: skip
    else:  # stochastic masks drawn for the global batch; the minimality frequency term from global sums
        config = SPDConfig(C=8, steps=steps, lr=2e-3, importance_minimality_beta=0.5, log_every=5, faithfulness_warmup_steps=10)
    dec = decompose(model, lambda: target.batch(256, None), config, target.modules(), progress=False)
    if is_main():
        torch.save({"params": dec.params, "history": dec.history}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    shutdown()
    exit_now(0)
