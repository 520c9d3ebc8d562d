"""Several seeds of one decomposition trained at once, in one process (vectorised instances).

Small targets (the TMS toys) spend most of a step in per-operation overhead, not arithmetic.
``decompose_seeds`` stacks the components of N seeds along a leading instance dimension and runs
the whole loss — target pass, attributions, top-k, masked pass, every term — under
``torch.func.vmap``, so each operation runs once for all N. The instances never interact:

- each seed's components start exactly as ``decompose`` with that seed starts them;
- each instance draws its own batches (N draws per step, from the global RNGs seeded with the
  first seed), so seed s here sees other batches than a single run with seed s — the two are
  equal in distribution, not bitwise;
- the optimiser is element-wise (Adam or AdamW: the instance dimension cannot couple them),
  gradient clipping is per instance, and a top-k or batch top-k selects within an instance.

Checkpoints hold every instance, the optimiser, the RNGs and the data position, written
atomically; a run restarted on the same ``checkpoint_dir`` continues exactly where it stopped.
"""

import dataclasses
import json
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from apd.component_model import ComponentModel
from apd.config import APDConfig, Attribution, ConfigError, GradientMode
from apd.data import BatchSource
from apd.decomposition import CheckpointError, Decomposition, atomic_save, safe_load
from apd.merge import merge_parallel_
from apd.optim import make_optimizer
from apd.train import (
    NonFiniteLossError,
    _act_module_names,
    _check_first_batch,
    _normalise_A,
    _rng_state,
    _set_rng_state,
    compute_losses,
    in_finetune,
    lr_for_step,
    topk_at_step,
)

__all__ = ["decompose_seeds", "SEEDS_CHECKPOINT_NAME", "VECTORISABLE_OPTIMIZERS"]

SEEDS_CHECKPOINT_NAME = "checkpoint_seeds.pt"
_FORMAT = "apd-seeds-checkpoint-1"
VECTORISABLE_OPTIMIZERS = ("adam", "adamw")
"""element-wise optimisers: stacking instances along a new dimension leaves them independent"""

SeedsCallback = Callable[[int, int, dict[str, float]], None]
"""``callback(seed, step, terms)``: one call per seed at each logging step"""


class _Loss(nn.Module):
    """compute_losses as a module, so that ``functional_call`` can swap in one instance's components."""

    def __init__(self, cm: ComponentModel, config: APDConfig, act_names: Sequence[str]):
        super().__init__()
        self.cm, self.config, self.act_names = cm, config, list(act_names)

    def forward(self, x: Tensor, k: float | None, simplicity: bool) -> dict[str, Tensor]:
        terms = compute_losses(self.cm, x, self.config, self.act_names, k=k, simplicity=simplicity)
        return {n: v for n, v in vars(terms).items() if v is not None}


def _vectorised_config(config: APDConfig, n_seeds: int) -> APDConfig:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(n_seeds >= 1, "seeds is empty: give at least one seed")
    need(not config.compile, "compile=True applies to decompose; decompose_seeds vmaps the seeds instead: set compile=False")
    need(
        config.optimizer in VECTORISABLE_OPTIMIZERS,
        f"optimizer={config.optimizer!r} cannot train seeds side by side (it may couple the stacked "
        f"instances through norms or trust ratios); use one of {VECTORISABLE_OPTIMIZERS}, or train the "
        "seeds one at a time with decompose",
    )
    if config.attribution is Attribution.gradient:
        need(
            config.gradient_mode is not GradientMode.per_sample,
            "gradient_mode='per_sample' cannot run inside the seeds' vmap; use 'hidden', 'jacfwd' or "
            "'jacrev' (None picks 'hidden')",
        )
        if config.gradient_mode is None:
            config = dataclasses.replace(config, gradient_mode=GradientMode.hidden)
    return config


def decompose_seeds(
    model: nn.Module,
    data: Iterable | Callable[[], Tensor],
    config: APDConfig,
    modules: Sequence[str],
    seeds: Sequence[int],
    *,
    tied: dict[str, str] | None = None,
    callback: SeedsCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[Decomposition]:
    """``decompose`` for every seed in ``seeds`` at once; returns one Decomposition per seed (in order).

    Arguments are those of ``apd.decompose`` (``config.seed`` is replaced by each seed). ``data``
    is drawn once per seed per step. The gradient attribution is computed in ``"hidden"`` mode
    unless ``config.gradient_mode`` says otherwise (``"per_sample"`` cannot be vmapped).
    """
    if not isinstance(config, APDConfig):
        raise TypeError(f"config must be an APDConfig, got {type(config).__name__}")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} repeats a seed; give distinct seeds")
    run_config = _vectorised_config(config, len(seeds))
    device = torch.device(config.device)
    torch.manual_seed(seeds[0])
    random.seed(seeds[0])
    np.random.seed(seeds[0])
    cms = [ComponentModel(model, modules, config.C, config.rank, tied=tied, init_scale=config.init_scale, seed=s)
           for s in seeds]  # fmt: skip
    for cm in cms:
        cm.to(device)
        if config.unit_norm_A:
            _normalise_A(cm)
    act_names = _act_module_names(cms[0], config.act_recon_modules) if config.act_recon_coeff is not None else []
    loss = _Loss(cms[0], run_config, act_names)
    params = {
        f"cm.model.{n}.{p}": torch.stack([getattr(cm.layers[n], p).detach() for cm in cms]).requires_grad_(True)
        for n in cms[0].matrix_names
        for p in ("A", "B")
    }
    opt = make_optimizer(config.optimizer, params.values(), config.lr)  # type: ignore[arg-type]
    source = BatchSource(data)

    ckpt_path = Path(checkpoint_dir) / SEEDS_CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, histories = 0, [[] for _ in seeds]
    if ckpt_path is not None and resume and ckpt_path.exists():
        start, histories = _load(ckpt_path, params, opt, config, seeds, source)

    def one_instance(p: dict[str, Tensor], x: Tensor, k: float | None, simplicity: bool) -> dict[str, Tensor]:
        return functional_call(loss, p, (x, k, simplicity))

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc=f"APD x{len(seeds)} seeds",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # fmt: skip
    try:
        for step in range(start, config.steps):
            x = torch.stack([source.next() for _ in seeds]).to(device)
            if step == start:
                _check_first_batch(cms[0], x[0])
            for group in opt.param_groups:
                group["lr"] = lr_for_step(step, config)
            k, simplicity = topk_at_step(step, config), not in_finetune(step, config)
            if config.merge_threshold is not None and step == config.finetune_start:
                _merge_instances(params, opt, config.merge_threshold, len(seeds))
            terms = vmap(one_instance, in_dims=(0, 0, None, None), randomness="different")(params, x, k, simplicity)
            _check_finite(step, terms, seeds)
            opt.zero_grad(set_to_none=True)
            terms["total"].sum().backward()  # instances are independent: each gets its own gradient
            _postprocess_grads(params, config)
            opt.step()
            if config.unit_norm_A:
                with torch.no_grad():
                    for name, p in params.items():
                        if name.endswith(".A"):
                            p.div_(p.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps - 1:
                lr = opt.param_groups[0]["lr"]
                for i, seed in enumerate(seeds):
                    logged = {"step": step, "lr": lr, **{n: float(v[i].detach()) for n, v in terms.items()}}
                    histories[i].append(logged)
                    if callback is not None:
                        callback(seed, step, logged)
                bar.set_postfix({"total": f"{float(terms['total'].detach().mean()):.3g}"}, refresh=sys.stderr.isatty())
            done = step + 1
            if ckpt_path is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                _save(ckpt_path, params, opt, config, seeds, done, source, histories)
    finally:
        bar.close()
    if ckpt_path is not None and start < config.steps:
        _save(ckpt_path, params, opt, config, seeds, config.steps, source, histories)

    decompositions = []
    with torch.no_grad():
        for i, (seed, cm) in enumerate(zip(seeds, cms)):
            for n in cm.matrix_names:
                cm.layers[n].A.copy_(params[f"cm.model.{n}.A"][i])
                cm.layers[n].B.copy_(params[f"cm.model.{n}.B"][i])
            seed_config = dataclasses.replace(config, seed=seed)
            decompositions.append(Decomposition.from_component_model(cm, seed_config, config.steps, histories[i]))
    return decompositions


def _merge_instances(params: dict[str, Tensor], opt: torch.optim.Optimizer, threshold: float, n: int) -> None:
    """``merge_parallel_`` on each stacked instance (views into the stacked parameters and moments)."""
    with torch.no_grad():
        for i in range(n):
            A = {name[: -len(".A")]: p.data[i] for name, p in params.items() if name.endswith(".A")}
            B = {name[: -len(".B")]: p.data[i] for name, p in params.items() if name.endswith(".B")}
            states = [
                (p.data[i], {k: v[i] for k, v in opt.state[p].items() if isinstance(v, Tensor) and v.shape == p.shape})
                for p in params.values()
                if p in opt.state
            ]
            merge_parallel_(A, B, threshold, states)


def _check_finite(step: int, terms: dict[str, Tensor], seeds: list[int]) -> None:
    bad = ~torch.isfinite(terms["total"].detach())
    if bad.any():
        which = [s for s, b in zip(seeds, bad.tolist()) if b]
        i = seeds.index(which[0])
        vals = ", ".join(f"{n}={float(v[i].detach()):.4g}" for n, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step} for seed(s) {which} (seed {which[0]}: {vals}); no instance was "
            "updated with it; lower lr, set grad_clip_norm, or lower the coefficients"
        )


def _postprocess_grads(params: dict[str, Tensor], config: APDConfig) -> None:
    """unit-norm A's gradient projection and per-instance gradient clipping, on stacked tensors."""
    if config.unit_norm_A:
        for name, p in params.items():
            if name.endswith(".A") and p.grad is not None:
                a = p.detach()
                p.grad -= (p.grad * a).sum(-1, keepdim=True) * a
    if config.grad_clip_norm is not None:
        grads = [p.grad for p in params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (N,)
        scale = (config.grad_clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


def _save(path: Path, params: dict[str, Tensor], opt: torch.optim.Optimizer, config: APDConfig, seeds: list[int],
          step: int, source: BatchSource, histories: list[list[dict[str, float]]]) -> None:  # fmt: skip
    atomic_save(
        {
            "format": _FORMAT,
            "config": json.dumps(config.to_dict()),
            "seeds": seeds,
            "step": step,
            "params": {n: p.detach().cpu() for n, p in params.items()},
            "optimizer": opt.state_dict(),
            "rng": _rng_state(),
            "data_consumed": source.consumed,
            "histories": json.dumps(histories),
        },
        path,
    )


def _load(path: Path, params: dict[str, Tensor], opt: torch.optim.Optimizer, config: APDConfig, seeds: list[int],
          source: BatchSource) -> tuple[int, list[list[dict[str, float]]]]:  # fmt: skip
    ckpt: dict[str, Any] = safe_load(path)
    if ckpt.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an apd multi-seed checkpoint")
    saved = json.loads(ckpt["config"])
    if saved != config.to_dict() or list(ckpt["seeds"]) != seeds:
        diff = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
        raise CheckpointError(
            f"{path} was written by another run (seeds {list(ckpt['seeds'])} vs {seeds}; config differences "
            f"(saved, now): {diff}); use a new checkpoint directory, or resume=False to start over there"
        )
    if set(ckpt["params"]) != set(params):
        raise CheckpointError(f"{path} holds {sorted(ckpt['params'])}, this run needs {sorted(params)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ckpt["params"][n])
    opt.load_state_dict(ckpt["optimizer"])
    source.skip(int(ckpt["data_consumed"]))
    _set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), json.loads(ckpt["histories"])
