"""A stand-in for a data-parallel job on SLURM (tests/test_slurm_local.py): each task of the job
joins a torch.distributed (gloo) group through the environment submitit sets up. It then
all-reduces its rank and writes what it saw to ``rank_<r>.json`` in the run dir.

    python -m tests.slurm_rank_app -m hydra/launcher=slurm hydra.launcher.tasks_per_node=2 ...
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig


@dataclass
class RankApp:
    backend: str = "gloo"


ConfigStore.instance().store(name="slurm_rank_app", node=RankApp)


@hydra.main(version_base="1.3", config_path="../conf", config_name="slurm_rank_app")
def main(cfg: RankApp) -> float:
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group(cfg.backend)
    try:
        total = torch.tensor([float(env.rank)])
        dist.all_reduce(total)
    finally:
        dist.destroy_process_group()
    seen = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
            "slurm_procid": int(os.environ["SLURM_PROCID"]), "rank_sum": total.item()}  # fmt: skip
    (Path(HydraConfig.get().runtime.output_dir) / f"rank_{env.rank}.json").write_text(json.dumps(seen) + "\n")
    return total.item()


if __name__ == "__main__":
    main()
