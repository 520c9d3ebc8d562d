"""The APD optimisation: build → step (typed loss terms) → log / checkpoint → Decomposition.

``decompose`` is the public entry point. ``compute_losses`` is one step's forward computation and
``train_step`` adds the optimiser update; both are importable for custom loops.
"""

import fnmatch
import functools
import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from apd.attributions import compute_attributions, gradient_attributions
from apd.component_model import ComponentModel, ModuleSelectionError
from apd.config import APDConfig, Attribution
from apd.data import BatchSource, DataError
from apd.decomposition import CKPT_FORMAT, CHECKPOINT_NAME, CheckpointError, Decomposition, atomic_save, safe_load
from apd.losses import act_recon_loss, faithfulness_loss, lp_sparsity_loss, minimality_loss, simplicity_loss
from apd.merge import merge_parallel_
from apd.optim import lr_at_step, make_optimizer
from apd.topk import topk_mask, with_best_samples

__all__ = ["decompose", "LossTerms", "compute_losses", "train_step", "in_finetune", "lr_for_step", "topk_at_step",
           "NonFiniteLossError", "CHECKPOINT_NAME", "merge_parallel_components"]  # fmt: skip

LogCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the components were not updated with it."""


@dataclass
class LossTerms:
    """One step's loss terms (unweighted) and their weighted total; None where a term is off."""

    total: Tensor
    faithfulness: Tensor
    minimality: Tensor | None
    simplicity: Tensor | None
    act_recon: Tensor | None
    lp_sparsity: Tensor | None
    l0: Tensor | float  # mean number of active components per input

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in vars(self).items() if v is not None}


def _act_module_names(cm: ComponentModel, patterns: Sequence[str]) -> list[str]:
    names = [n for n, _ in cm.model.named_modules() if n]
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModuleSelectionError(f"act_recon_modules pattern {pattern!r} matches no module; modules are {names}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _attributions(cm: ComponentModel, x: Tensor, config: APDConfig) -> Tensor:
    if config.attribution is Attribution.gradient and config.gradient_mode is not None:
        return gradient_attributions(cm, x, config.gradient_mode.value)
    return compute_attributions(cm, x, config.attribution)


def compute_losses(
    cm: ComponentModel,
    x: Tensor,
    config: APDConfig,
    act_names: Sequence[str] = (),
    *,
    k: float | None = None,
    simplicity: bool = True,
) -> LossTerms:
    """Target pass → attributions → selection → masked pass → every loss term (SPEC §1.4).

    ``k`` overrides ``config.topk`` (a k schedule, see ``topk_at_step``); ``simplicity=False``
    leaves the Schatten term out (the fine-tune phase, see ``in_finetune``).
    """
    k = config.topk if k is None else k
    use_act = config.act_recon_coeff is not None
    with torch.no_grad(), cm.capture(act_names if use_act else []) as target_acts:
        target_out = cm(x)

    attr = None
    if config.lp_sparsity_coeff is not None:
        attr = _attributions(cm, x, config)  # differentiable: L_p trains through it
    elif k is not None:
        with torch.no_grad():
            attr = _attributions(cm, x, config)
    if k is not None:
        assert attr is not None
        mask = with_best_samples(topk_mask(attr, k, config.batch_topk), attr, config.min_active)
    else:
        mask = torch.ones(x.shape[0], cm.C, dtype=target_out.dtype, device=x.device)

    with cm.capture(act_names if use_act else []) as masked_acts:
        masked_out = cm(x, mask=mask)

    faith = faithfulness_loss(cm.target_weights(), cm.summed_weights())
    total = config.faithfulness_coeff * faith
    minimality = simp = act = lp = None
    if config.minimality_coeff > 0:
        minimality = minimality_loss(target_out, masked_out, config.output_loss)
        total = total + config.minimality_coeff * minimality
    if simplicity and config.simplicity_coeff > 0:
        A = {n: cm.layers[n].A for n in cm.matrix_names}
        B = {n: cm.layers[n].B for n in cm.matrix_names}
        simp = simplicity_loss(A, B, mask, config.schatten_p, cm.n_weights(), config.schatten_eps)  # type: ignore[arg-type]
        total = total + config.simplicity_coeff * simp
    if use_act:
        act = act_recon_loss(dict(target_acts), dict(masked_acts))
        total = total + config.act_recon_coeff * act  # type: ignore[operator]
    if config.lp_sparsity_coeff is not None:
        lp = lp_sparsity_loss(attr, config.lp_sparsity_p)  # type: ignore[arg-type]
        total = total + config.lp_sparsity_coeff * lp
    return LossTerms(total, faith, minimality, simp, act, lp, l0=mask.sum(1).mean())


@functools.cache
def _compiled_losses() -> Callable[..., LossTerms]:
    """``compute_losses`` through ``torch.compile`` (one compiled function per process; Dynamo
    recompiles per target, config and phase)."""
    return torch.compile(compute_losses)


def _unit_norm_A_grads(cm: ComponentModel) -> None:
    """Remove from each A row's gradient its component along that (unit-norm) row."""
    for n in cm.matrix_names:
        A = cm.layers[n].A
        if A.grad is not None:
            a = A.detach()
            A.grad -= (A.grad * a).sum(-1, keepdim=True) * a


def _normalise_A(cm: ComponentModel) -> None:
    with torch.no_grad():
        for n in cm.matrix_names:
            A = cm.layers[n].A
            A.div_(A.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def in_finetune(step: int, config: APDConfig) -> bool:
    """Whether ``step`` lies in the final unpenalised fine-tune (``config.finetune_frac``)."""
    return step >= config.finetune_start


def topk_at_step(step: int, config: APDConfig) -> float | None:
    """k of the top-k selection at ``step``: linear from ``topk_start`` to ``topk`` over the first
    ``topk_anneal_frac`` of the steps, then ``topk`` (``topk`` throughout without a schedule)."""
    if config.topk_start is None or config.topk is None:
        return config.topk
    progress = min(1.0, step / max(1, round(config.topk_anneal_frac * config.steps)))
    return config.topk_start + progress * (config.topk - config.topk_start)


def lr_for_step(step: int, config: APDConfig) -> float:
    """The main warm-up + decay schedule, or ``finetune_lr`` (when set) during the fine-tune."""
    if in_finetune(step, config) and config.finetune_lr is not None:
        return config.finetune_lr
    return lr_at_step(step, config.steps, config.lr, config.lr_schedule, config.warmup_frac)


def train_step(
    cm: ComponentModel, opt: torch.optim.Optimizer, x: Tensor, config: APDConfig, step: int, act_names: Sequence[str] = ()
) -> LossTerms:
    """One optimiser step; raises NonFiniteLossError (before any update) on a NaN/inf loss.

    Everything that changes over the run (learning rate, k, fine-tune phase) derives from ``step``,
    so a resumed run repeats an uninterrupted one exactly.
    """
    for group in opt.param_groups:
        group["lr"] = lr_for_step(step, config)
    k, finetune = topk_at_step(step, config), in_finetune(step, config)
    if config.merge_threshold is not None and step == config.finetune_start:
        merge_parallel_components(cm, opt, config.merge_threshold)
    losses = _compiled_losses() if config.compile else compute_losses
    terms = losses(cm, x, config, act_names, k=k, simplicity=not finetune)
    if not torch.isfinite(terms.total):
        raise NonFiniteLossError(_nan_message(step, terms, x))
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    if config.unit_norm_A:
        _unit_norm_A_grads(cm)
    if config.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(cm.component_parameters()), config.grad_clip_norm)
    opt.step()
    if config.unit_norm_A:
        _normalise_A(cm)
    return terms


def merge_parallel_components(cm: ComponentModel, opt: torch.optim.Optimizer | None, threshold: float) -> list[list[int]]:
    """``apd.merge.merge_parallel_`` on a component model's parameters (and their optimiser state)."""
    A = {n: cm.layers[n].A.data for n in cm.matrix_names}
    B = {n: cm.layers[n].B.data for n in cm.matrix_names}
    states = [] if opt is None else [(p.data, opt.state[p]) for p in cm.component_parameters() if p in opt.state]
    return merge_parallel_(A, B, threshold, states)


def _nan_message(step: int, terms: LossTerms, x: Tensor) -> str:
    vals = ", ".join(f"{k}={v:.4g}" for k, v in terms.as_floats().items())
    hint = (
        "the input batch itself contains NaN/inf: clean the data"
        if not torch.isfinite(x).all()
        else "lower lr, set grad_clip_norm, or lower the coefficients"
    )
    return f"non-finite loss at step {step} ({vals}); the components were not updated with it; {hint}"


# ---------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, cm: ComponentModel, opt: torch.optim.Optimizer, config: APDConfig,
                     step: int, source: BatchSource, history: list[dict[str, float]]) -> None:  # fmt: skip
    dec = Decomposition.from_component_model(cm, config, step, history)
    atomic_save(
        {
            **dec.state(),
            "format": CKPT_FORMAT,
            "optimizer": opt.state_dict(),
            "rng": _rng_state(),
            "data_consumed": source.consumed,
        },
        path,
    )


def _load_checkpoint(path: Path, cm: ComponentModel, opt: torch.optim.Optimizer, config: APDConfig,
                     source: BatchSource) -> tuple[int, list[dict[str, float]]]:  # fmt: skip
    ckpt = safe_load(path)
    if ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not an apd training checkpoint")
    saved = json.loads(ckpt["config"])
    if saved != config.to_dict():
        diff = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
        raise CheckpointError(
            f"{path} was written with a different config (saved, now): {diff}; use a new checkpoint "
            "directory, or resume=False to start over there"
        )
    if set(ckpt["A"]) != set(cm.matrix_names):
        raise CheckpointError(f"{path} decomposes {sorted(ckpt['A'])}, this run {cm.matrix_names}")
    with torch.no_grad():
        for n in cm.matrix_names:
            cm.layers[n].A.copy_(ckpt["A"][n])
            cm.layers[n].B.copy_(ckpt["B"][n])
    opt.load_state_dict(ckpt["optimizer"])
    source.skip(int(ckpt["data_consumed"]))  # iterables only; before the RNG state is restored
    _set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), json.loads(ckpt["history"])


# ---------------------------------------------------------------------------- entry point
def _check_first_batch(cm: ComponentModel, x: Tensor) -> None:
    try:
        with torch.no_grad():
            out = cm(x)
    except Exception as e:
        raise DataError(
            f"the target model cannot run on a batch of shape {tuple(x.shape)} ({type(e).__name__}: {e}); "
            "check that the data yields inputs the model accepts, batch first"
        ) from e
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise DataError(
            f"the target's output for a batch of {x.shape[0]} is "
            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; APD needs one tensor with the batch first"
        )


def decompose(
    model: nn.Module,
    data: Iterable | Callable[[], Tensor],
    config: APDConfig,
    modules: Sequence[str],
    *,
    tied: dict[str, str] | None = None,
    callback: LogCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Decomposition:
    """Decompose the weights of ``model``'s linear layers matched by ``modules`` (fnmatch patterns).

    ``data`` is an iterable of input batches (or ``(input, label)`` tuples; re-iterated when
    exhausted) or a zero-argument callable returning a batch. ``tied={"dec": "enc"}`` declares that
    ``dec`` holds ``enc``'s weight transposed (``TiedLinear`` layers are tied automatically).
    ``callback(step, terms)`` is called every ``config.log_every`` steps. With ``checkpoint_dir``,
    a checkpoint (components, optimiser, RNG and data position) is written atomically every
    ``config.checkpoint_every`` steps and at the end, and with ``resume=True`` a run finds its last
    checkpoint there and continues exactly where it stopped. The global torch/numpy/python RNGs
    are seeded with ``config.seed`` (data callables drawing from them are then reproducible).
    """
    if not isinstance(config, APDConfig):
        raise TypeError(f"config must be an APDConfig, got {type(config).__name__}")
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    cm = ComponentModel(model, modules, config.C, config.rank, tied=tied, init_scale=config.init_scale, seed=config.seed)
    cm.to(device)
    act_names = _act_module_names(cm, config.act_recon_modules) if config.act_recon_coeff is not None else []
    if config.unit_norm_A:
        _normalise_A(cm)
    opt = make_optimizer(config.optimizer, cm.component_parameters(), config.lr)
    source = BatchSource(data)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, history = 0, []
    if ckpt_path is not None and resume and ckpt_path.exists():
        start, history = _load_checkpoint(ckpt_path, cm, opt, config, source)

    interactive = sys.stderr.isatty()
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="APD", dynamic_ncols=True,
               mininterval=0.1 if interactive else 30.0)  # fmt: skip
    try:
        for step in range(start, config.steps):
            x = source.next().to(device)
            if step == start:
                _check_first_batch(cm, x)
            terms = train_step(cm, opt, x, config, step, act_names)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps - 1:
                logged = {"step": step, "lr": opt.param_groups[0]["lr"], **terms.as_floats()}
                history.append(logged)
                bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items() if k not in ("step", "lr")}, refresh=interactive)
                if callback is not None:
                    callback(step, logged)
            done = step + 1
            if ckpt_path is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                _save_checkpoint(ckpt_path, cm, opt, config, done, source, history)
    finally:
        bar.close()
    if ckpt_path is not None and start < config.steps:
        _save_checkpoint(ckpt_path, cm, opt, config, config.steps, source, history)
    return Decomposition.from_component_model(cm, config, config.steps, history)
