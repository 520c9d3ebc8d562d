"""Throughput of the language-model SPD step in one process or in each of N data-parallel ones.

    python benchmarks/dp_worker.py STEPS GLOBAL_WINDOWS OUT.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/dp_worker.py STEPS GLOBAL_WINDOWS OUT.json

The spd_lm_1l preset's method on the shipped 1-layer LM, a global batch of GLOBAL_WINDOWS windows of
128 tokens (each rank keeps its share); after two warm-up steps, STEPS timed steps. Rank 0 writes
tokens per second per process, the world size and the per-rank batch.
"""

import json
import sys
import time

import torch

from apd import SPDConfig
from apd.distributed import exit_now, init_from_env, is_main, rank_and_world, shard, shutdown
from apd.methods import method_for
from apd.optim import make_optimizer
from apd.targets import LMTargetConfig, get_target
from apd.train import train_step


def main(steps: int, windows: int, out: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    _, world = rank_and_world()
    target_cfg = LMTargetConfig()
    model, _ = get_target(target_cfg)
    method = method_for(SPDConfig(C=512, ci_fn="shared_mlp", ci_hidden=[128], output_loss="kl", importance_minimality_coeff=1e-4,
                                  pnorm=2.0, steps=10_000))  # fmt: skip
    torch.manual_seed(0)
    cm = method.build(model, target_cfg.modules())
    opt = make_optimizer("adam", cm.trainable_parameters().values(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [shard(target_cfg.batch(windows, gen)) for _ in range(steps + 2)]
    for i in range(2):
        train_step(cm, opt, batches[i], method, i)
    start = time.perf_counter()
    for i in range(2, steps + 2):
        train_step(cm, opt, batches[i], method, i)
    seconds = time.perf_counter() - start
    tokens = steps * batches[0].numel()  # this process's tokens
    if is_main():
        result = {"world_size": world, "windows_per_rank": batches[0].shape[0], "seconds": seconds,
                  "tokens_per_second_per_process": tokens / seconds}  # fmt: skip
        with open(out, "w") as f:  # closed here: the process leaves through os._exit
            json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    shutdown()
    exit_now(0)
