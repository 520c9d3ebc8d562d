"""Data-parallel decompositions on ``torch.distributed``: what each rank does, and the few collectives.

Inside an initialised process group (``torchrun``, SLURM tasks, or a user's own
``init_process_group``) ``apd.decompose`` trains one decomposition with every rank: each draws the
same global batch from identically seeded RNGs and keeps its own contiguous share of the rows
(``shard``), so W processes see exactly the batches one process would; gradients are averaged over
the ranks before clipping and the update; batch-level statistics are computed over the global batch
(APD's batch top-k and ``min_active`` from all ranks' attributions, SPD's stochastic masks drawn for
the global batch and sliced, its minimality frequency term from global sums); loss terms are
averaged for logging; only rank 0 writes checkpoints (with every rank's RNG state), run dirs and
logs. Loss terms that are means over rows average to the global mean because shards are equal:
the global batch must divide by the world size.

``init_from_env`` starts the group from ``torchrun``'s environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) or from a SLURM job step's (SLURM_PROCID, SLURM_NTASKS,
SLURM_JOB_NODELIST, SLURM_JOB_ID): gloo on the CPU, nccl on GPUs.
"""

import os
import re
import subprocess
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["rank_and_world", "is_distributed", "is_main", "shard", "gather_rows", "local_rows", "rand_rows",
           "average_gradients", "mean_over_ranks", "all_true", "gather_objects", "init_from_env", "DistributedError"]  # fmt: skip


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on (uneven shards, an unsupported combination); says what to change."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return rank_and_world()[0] == 0


def shard(x: Tensor) -> Tensor:
    """This rank's contiguous share of a global batch's rows (the batch itself outside a group)."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    if x.shape[0] % world:
        raise DistributedError(f"the global batch has {x.shape[0]} rows, which do not split evenly over {world} ranks; "
                               f"use a batch size divisible by {world}")  # fmt: skip
    return x.chunk(world)[rank]


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's ``t`` (equal shapes) concatenated along dim 0 in rank order (no gradient)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def local_rows(t_global: Tensor) -> Tensor:
    """This rank's rows of a tensor made for the global batch (inverse of ``gather_rows``)."""
    rank, world = rank_and_world()
    return t_global if world == 1 else t_global.chunk(world)[rank]


def rand_rows(like: Tensor, binary: bool = False) -> Tensor:
    """Uniform [0, 1) (or {0, 1}) draws shaped like ``like``; in a process group made for the global
    batch and sliced to this rank's rows, so W ranks draw what one process draws for the whole batch
    (one process: ``rand_like``, which also runs under vmap)."""
    _, world = rank_and_world()
    if world == 1:
        return torch.randint_like(like, 0, 2) if binary else torch.rand_like(like)
    full = (like.shape[0] * world, *like.shape[1:])
    r = torch.randint(0, 2, full, dtype=like.dtype, device=like.device) if binary else torch.rand(full, dtype=like.dtype, device=like.device)
    return local_rows(r)


def average_gradients(params: list[Tensor]) -> None:
    """Replace each gradient by its mean over the ranks (one flattened all-reduce)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each (scalar) tensor averaged over the ranks, for logging."""
    if not is_distributed() or not values:
        return values
    names = list(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(names, stacked))


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (e.g. the loss is finite everywhere)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item()) == 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj`` in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _slurm_master(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames``, else a plain parse)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(\[(\d+))?", nodelist)
    if not m:
        raise DistributedError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return m.group(1) + (m.group(3) or "")


def init_from_env(backend: str | None = None) -> bool:
    """Start the process group from ``torchrun``'s or a SLURM job step's environment (module
    docstring). Returns False (nothing started) for a single process; idempotent."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = int(env["WORLD_SIZE"])
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(world)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master(env.get("SLURM_JOB_NODELIST", "localhost")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        return False
    if world <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True



def shutdown(barrier: bool = True) -> None:
    """End a data-parallel run's process group (a no-op without one): wait for every rank
    (``barrier``; pass False after an error, when another rank may never get there), then destroy
    the group while the interpreter is fully alive. A rank that leaves the group to the interpreter's
    teardown can be aborted there by gloo's threads (SIGABRT), turning a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_now(code: int = 0) -> None:
    """Leave the process at once, after flushing the output, without the interpreter's teardown:
    what a torchrun worker does after :func:`shutdown`, so that no C++ thread of the process group
    outlives the interpreter (SIGABRT)."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
