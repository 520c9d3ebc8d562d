"""The one training loop: any method, one seed or many seeds at once, one checkpoint format.

``decompose`` trains one seed; ``decompose_seeds`` trains several seeds at once in one process:
the trained tensors of N seeds are stacked along a leading instance dimension and the whole loss
(target pass, attributions or causal importances, masks, every term) runs under
``torch.func.vmap``, so a small target pays its per-operation overhead once, not N times (a method
may say that vmap does not pay on a device (``vmap_seeds``; no method does today); its instances then run one
after another within each step, on slices of the same stacked tensors). The
instances never interact: each starts exactly as ``decompose`` with its seed starts, draws its own
batches (N draws per step from the global RNGs seeded with the first seed, so equal in distribution
to a single run, not bitwise), and has its own gradient clipping; the optimiser must be element-wise
(Adam or AdamW).

Each step: learning rate from the step → the method's step-start hook (APD's merge) → loss terms →
NaN check (before any update) → backward → the method's gradient hook (unit-norm A) → clipping →
optimiser step → the method's parameter hook. Everything that changes over a run derives from the
step number, so a run resumed from a checkpoint (components, optimiser, RNGs, data position)
repeats an uninterrupted one exactly.

Inside an initialised process group ``decompose`` is data-parallel (``apd.distributed``): every rank
keeps its share of each global batch, gradients are averaged before clipping, and rank 0 writes
the checkpoints (with every rank's RNG state).
"""

import json
import math
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

from apd.checkpoint import CHECKPOINT_NAME, CheckpointError, TrainingCheckpoint, read_checkpoint, write_checkpoint
from apd.component_model import ComponentModel
from apd.config import ConfigError, MethodConfig
from apd.data import BatchSource, DataError
from apd.decomposition import Decomposition
from apd.distributed import (
    DistributedError,
    all_true,
    average_gradients,
    gather_objects,
    is_main,
    mean_over_ranks,
    rank_and_world,
    shard,
)
from apd.methods import Factors, InstanceView, Method, method_for
from apd.methods.base import VECTORISABLE_OPTIMIZERS
from apd.model_io import ModelIO, OutputFn, check_output_fn
from apd.precision import check_precision, step_autocast

__all__ = ["decompose", "decompose_seeds", "train_step", "loss_terms", "as_floats", "NonFiniteLossError", "NonFiniteTargetError",
           "check_target_finite", "CHECKPOINT_NAME", "VECTORISABLE_OPTIMIZERS", "LogCallback", "SeedsCallback"]  # fmt: skip

LogCallback = Callable[[int, dict[str, float]], None]
"""``callback(step, terms)``, every ``log_every`` steps"""
SeedsCallback = Callable[[int, int, dict[str, float]], None]
"""``callback(seed, step, terms)``: one call per seed at each logging step"""



class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the components were not updated with it. The message says
    which loss term, and the cause: a NaN/inf in the input batch (named by its step and rows), an
    earlier update that left NaN/inf in the components, or a loss that overflowed."""


class NonFiniteTargetError(ValueError):
    """The target model holds a NaN or infinite weight (checked once before training)."""


def as_floats(terms: dict[str, Tensor | float]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in terms.items()}


def loss_terms(cm: ComponentModel, x: Tensor, config: MethodConfig | Method, step: int = 0) -> dict[str, Tensor]:
    """One step's loss terms for ``config``'s method on ``cm`` (``{"total": ..., <loss>: ..., <metric>: ...}``),
    computed as a training step computes them (``precision=bf16``: under its autocast)."""
    method = config if isinstance(config, Method) else method_for(config)
    with step_autocast(method.config):
        return method.loss_terms(cm, x, step, method.capture_names(cm))


def train_step(cm: ComponentModel, opt: torch.optim.Optimizer, x: Tensor, config: MethodConfig | Method, step: int,
               capture: Sequence[str] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """One optimiser step of a single-seed run (for custom loops); raises NonFiniteLossError before
    any update on a NaN/inf loss."""
    method = config if isinstance(config, Method) else method_for(config)
    params = cm.trainable_parameters()
    return _Run.single_step(method, cm, params, _factors(cm, params), opt, x, step,
                            method.capture_names(cm) if capture is None else list(capture))  # fmt: skip


def _factors(cm: ComponentModel, params: dict[str, Tensor]) -> Factors:
    return Factors(A={n: params[cm.param_name(n, "A")] for n in cm.matrix_names},
                   B={n: params[cm.param_name(n, "B")] for n in cm.matrix_names})  # fmt: skip


def _nan_message(step: int, terms: dict[str, float], x: Tensor, params: dict[str, Tensor], which: str = "") -> str:
    """Why the loss of ``step`` is non-finite (called only then): the input batch ``x``, the trained
    tensors ``params`` (one instance's), or else the loss itself overflowed. The target's weights
    were checked before training (:func:`check_target_finite`)."""
    bad = [k for k, v in terms.items() if not math.isfinite(v) and k != "total"] or ["total"]
    vals = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    head = (f"non-finite loss at step {step}{which}: {', '.join(bad)} ({vals}); the components were not updated "
            "with it (a checkpoint written before stays as it was); ")  # fmt: skip
    if x.is_floating_point() and not torch.isfinite(x).all():
        rows = (~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero().flatten().tolist() if x.dim() else []
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        return head + (f"cause: the input batch of step {step} contains NaN/inf (in {len(rows)} of its {len(x)} rows: {shown}); "
                       "the data is broken, not the training: clean the data")  # fmt: skip
    broken = [n.removeprefix("model.") for n, p in params.items() if not torch.isfinite(p).all()]
    if broken:
        return head + (f"cause: training diverged: an earlier update left NaN/inf in {broken}; lower lr, set "
                       "grad_clip_norm, or lower the coefficients")  # fmt: skip
    x_max = f"{x.abs().max().item():.3g}" if x.is_floating_point() and x.numel() else "-"
    p_max = max((p.detach().abs().max().item() for p in params.values() if p.numel()), default=0.0)
    return head + (f"cause: the loss overflowed during training (the input batch, the target's weights and the components "
                   f"are finite; largest |input| {x_max}, largest |component value| {p_max:.3g}); lower lr, set "
                   "grad_clip_norm, or lower the coefficients")  # fmt: skip


def check_target_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteTargetError` naming the first parameter or floating buffer of ``model``
    that holds a NaN/inf (a broken target: every loss would be non-finite whatever the settings)."""
    with torch.no_grad():
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if t.is_floating_point() and not torch.isfinite(t).all():
                    n_bad = int((~torch.isfinite(t)).sum())
                    raise NonFiniteTargetError(
                        f"the target model's {kind} {name!r} holds NaN/inf ({n_bad} of its {t.numel()} values) before "
                        "training: the target itself is broken, not the decomposition's settings; check how it was "
                        "trained or loaded (nothing was trained)"
                    )


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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _check_first_batch(cm: ComponentModel, x: Tensor) -> None:
    try:
        with torch.no_grad():
            out = cm(x)
    except Exception as e:
        raise DataError(
            f"the target model cannot run on a batch of {cm.io.describe(x)} ({type(e).__name__}: {e}); "
            "check that the data yields inputs the model accepts, batch first"
        ) from e
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise DataError(
            f"the target's output for a batch of {x.shape[0]} is "
            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; decomposition needs one tensor with the batch first "
            "(a tensor, or an output with .logits; pass output_fn=lambda out: ... to pick another tensor)"
        )
    cm.check_layers_are_called(x)


class _Loss(nn.Module):
    """A method's loss terms as a module, so that ``functional_call`` can swap in one instance's tensors."""

    def __init__(self, cm: ComponentModel, method: Method, capture: list[str]):
        super().__init__()
        self.cm, self.method, self.capture = cm, method, capture

    def forward(self, x: Tensor, step: int) -> dict[str, Tensor]:
        return self.method.loss_terms(self.cm, x, step, self.capture)


class _Run:
    """One training run of ``method`` for ``seeds`` (stacked and vmapped unless ``stacked`` is False)."""

    def __init__(self, method: Method, model: nn.Module, modules: Sequence[str], seeds: list[int], stacked: bool,
                 tied: dict[str, str] | None, device: torch.device, recorded: MethodConfig):  # fmt: skip
        self.method, self.seeds, self.stacked = method, seeds, stacked
        self.recorded = recorded  # the config as the user gave it (saved, compared on resume)
        cms = [method.build(model, modules, tied=tied, seed=s) for s in seeds]
        for cm in cms:
            cm.to(device)
            method.prepare(cm)
        self.cm = cms[0]
        self.cms = cms
        self.capture = method.capture_names(self.cm)
        self.vmapped = getattr(method, "vmap_seeds", lambda device: True)(device)
        """seeds at once: their instances vmapped in each step, or (where the method says vmap does not pay on
        this device) run one after another on slices of the same stacked tensors, which get the same updates"""
        if stacked:
            own = [cm.trainable_parameters() for cm in cms]
            self.params = {n: torch.stack([o[n].detach() for o in own]).requires_grad_(True) for n in own[0]}
            self.loss_module = _Loss(self.cm, method, self.capture)
        else:
            self.params = self.cm.trainable_parameters()
        self.factors = _factors(self.cm, self.params)

    # ------------------------------------------------------------------ the step
    @staticmethod
    def single_step(method: Method, cm: ComponentModel, params: dict[str, Tensor], factors: Factors,
                    opt: torch.optim.Optimizer, x: Tensor, step: int, capture: list[str]) -> dict[str, Tensor]:  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = method.lr_at(step)
        method.on_step_start(step, lambda: [InstanceView(
            A={n: a.data for n, a in factors.A.items()}, B={n: b.data for n, b in factors.B.items()},
            optimizer_states=[(p.data, opt.state[p]) for p in params.values() if p in opt.state])])  # fmt: skip
        losses = method.compiled_loss_terms() if method.config.compile else method.loss_terms
        with step_autocast(method.config):  # precision=bf16: the forward's matmuls (their backward follows)
            terms = losses(cm, x, step, capture)
        if not all_true(bool(torch.isfinite(terms["total"]))):  # every rank stops together
            which = "" if rank_and_world()[1] == 1 else f" on rank {rank_and_world()[0]} or another"
            raise NonFiniteLossError(_nan_message(step, as_floats(terms), x, params, which))
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        average_gradients(list(params.values()))  # data-parallel: the global batch's gradient
        method.after_backward(factors)
        if method.config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), method.config.grad_clip_norm)
        opt.step()
        method.after_step(factors)
        return terms

    def stacked_step(self, opt: torch.optim.Optimizer, x: Tensor, step: int) -> dict[str, Tensor]:
        method, params = self.method, self.params
        for group in opt.param_groups:
            group["lr"] = method.lr_at(step)
        with torch.no_grad():
            method.on_step_start(step, lambda: [self._instance(i, opt) for i in range(len(self.seeds))])

        def one_instance(p: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
            return functional_call(self.loss_module, {f"cm.{n}": v for n, v in p.items()}, (x, step))

        with step_autocast(method.config):  # precision=bf16: the forward's matmuls (their backward follows)
            if self.vmapped:
                terms = vmap(one_instance, randomness="different")(params, x)
            else:  # one instance after another, each on its slices of the stacked tensors (its own graph)
                outs = [one_instance({n: p[i] for n, p in params.items()}, x[i]) for i in range(len(self.seeds))]
                terms = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        bad = ~torch.isfinite(terms["total"].detach())
        if bad.any():
            which = [s for s, b in zip(self.seeds, bad.tolist()) if b]
            i = self.seeds.index(which[0])
            raise NonFiniteLossError(_nan_message(step, {n: float(v[i].detach()) for n, v in terms.items()}, x[i],
                                                  {n: p[i] for n, p in params.items()},
                                                  f" for seed(s) {which} (values of seed {which[0]}); no instance was updated"))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        terms["total"].sum().backward()  # instances are independent: each gets its own gradient
        method.after_backward(self.factors)
        clip = method.config.grad_clip_norm
        if clip is not None:  # per instance
            grads = [p.grad for p in params.values() if p.grad is not None]
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (N,)
            scale = (clip / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        opt.step()
        method.after_step(self.factors)
        return terms

    def _instance(self, i: int, opt: torch.optim.Optimizer) -> InstanceView:
        f = self.factors
        states = [(p.data[i], {k: v[i] for k, v in opt.state[p].items() if isinstance(v, Tensor) and v.shape == p.shape})
                  for p in self.params.values() if p in opt.state]  # fmt: skip
        return InstanceView(A={n: a.data[i] for n, a in f.A.items()}, B={n: b.data[i] for n, b in f.B.items()},
                            optimizer_states=states)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, opt: torch.optim.Optimizer, step: int, source: BatchSource,
             histories: list[list[dict[str, float]]]) -> None:  # fmt: skip
        """Write the checkpoint (rank 0; every rank's RNG state in rank order)."""
        rng = gather_objects(_rng_state())
        method_state = gather_objects(self.method.training_state(self.cm))
        if not is_main():
            return
        cm = self.cm
        write_checkpoint(path, TrainingCheckpoint(
            method=self.method.name, config=self.recorded.to_dict(), modules=list(cm.layer_names), tied=dict(cm.tied_names),
            kinds=dict(cm.kinds), target_weights={n: w.detach().cpu() for n, w in cm.target_weights().items()},
            seeds=self.seeds, stacked=self.stacked, step=step, params={n: p.detach().cpu() for n, p in self.params.items()},
            optimizer=opt.state_dict(), rng=rng, data_consumed=source.consumed, histories=histories,
            method_state=method_state if any(method_state) else [],
        ))  # fmt: skip

    def load(self, path: Path, opt: torch.optim.Optimizer, source: BatchSource) -> tuple[int, list[list[dict[str, float]]]]:
        ckpt = read_checkpoint(path)
        config = self.recorded.to_dict()
        if ckpt.method != self.method.name or ckpt.config != config or ckpt.seeds != self.seeds or ckpt.stacked != self.stacked:
            diff = {k: (ckpt.config.get(k), v) for k, v in config.items() if ckpt.config.get(k) != v}
            raise CheckpointError(
                f"{path} was written by another run (method {ckpt.method!r}, seeds {ckpt.seeds}; "
                f"this run: {self.method.name!r}, seeds {self.seeds}; different config (saved, now): {diff}); "
                "use a new checkpoint directory, or resume=False to start over there"
            )
        if set(ckpt.params) != set(self.params):
            raise CheckpointError(f"{path} holds {sorted(ckpt.params)}, this run needs {sorted(self.params)}")
        own = {n: w.detach().cpu() for n, w in self.cm.target_weights().items()}
        changed = [n for n in own if n not in ckpt.target_weights or not torch.equal(own[n], ckpt.target_weights[n])]
        if changed:
            raise CheckpointError(f"{path} was written for another target: the model's {changed} differ from the weights "
                                  "that run decomposed; resume on the same target, or resume=False to start over there")  # fmt: skip
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(ckpt.params[n])
        rank, world = rank_and_world()
        if len(ckpt.rng) != world:
            raise CheckpointError(f"{path} was written by a run on {len(ckpt.rng)} process(es), this one runs on {world}; "
                                  f"resume with the same number of processes (torchrun --nproc_per_node={len(ckpt.rng)})")  # fmt: skip
        opt.load_state_dict(ckpt.optimizer)
        source.skip(ckpt.data_consumed)  # iterables only; before the RNG state is restored
        _set_rng_state(ckpt.rng[rank])
        if ckpt.method_state:
            self.method.load_training_state(self.cm, ckpt.method_state[rank])
        return ckpt.step, ckpt.histories

    # ------------------------------------------------------------------ results
    def decompositions(self, histories: list[list[dict[str, float]]]) -> list[Decomposition]:
        from dataclasses import replace

        out = []
        with torch.no_grad():
            for i, (seed, cm) in enumerate(zip(self.seeds, self.cms)):
                if self.stacked:
                    own = cm.trainable_parameters()
                    for n, p in own.items():
                        p.copy_(self.params[n][i])
                config = replace(self.recorded, seed=seed)
                out.append(Decomposition.from_component_model(cm, self.method.name, config, config.steps, histories[i]))
        return out


def _train(
    model: nn.Module, data: Iterable | Callable[[], Tensor], method: Method, modules: Sequence[str], seeds: list[int],
    stacked: bool, tied: dict[str, str] | None, on_log: Callable[[int, int, dict[str, float]], None] | None,
    checkpoint_dir: str | Path | None, resume: bool, progress: bool, recorded: MethodConfig | None = None,
    output_fn: OutputFn | None = None,
) -> list[Decomposition]:  # fmt: skip
    config = method.config
    device = torch.device(config.device)
    if stacked and rank_and_world()[1] > 1:
        raise DistributedError("decompose_seeds trains several seeds in one process; a data-parallel run trains one "
                               "seed over its processes: call decompose inside the process group")  # fmt: skip
    check_target_finite(model)  # once: a broken target is not a training problem
    check_precision(config)
    _seed_everything(seeds[0])
    run = _Run(method, model, modules, seeds, stacked, tied, device, recorded or config)
    from apd.optim import make_optimizer

    opt = make_optimizer(config.optimizer, run.params.values(), config.lr)
    source = BatchSource(data)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, histories = 0, [[] for _ in seeds]
    if ckpt_path is not None and resume and ckpt_path.exists():
        start, histories = run.load(ckpt_path, opt, source)
    else:
        method.warmup(run.factors, run.cm.target_weights())

    interactive = sys.stderr.isatty()
    desc = method.name.upper() + (f" x{len(seeds)} seeds" if stacked else "")
    bar = tqdm(total=config.steps, initial=start, disable=not progress or not is_main(), desc=desc, dynamic_ncols=True,
               mininterval=0.1 if interactive else 30.0)  # fmt: skip
    try:
        for step in range(start, config.steps):
            if stacked:
                x = torch.stack([source.next() for _ in seeds]).to(device)
            else:
                x = shard(source.next()).to(device)  # data-parallel: this rank's rows of the global batch
            if step == start:
                for cm in run.cms:  # dict batches (packed by the source) and the output reader
                    cm.io = ModelIO(source.keys, output_fn)
                _check_first_batch(run.cm, x[0] if stacked else x)
            if stacked:
                try:
                    terms = run.stacked_step(opt, x, step)
                except RuntimeError as e:
                    if source.keys is None or "data-dependent control flow" not in str(e):
                        raise
                    raise DataError(f"decompose_seeds vmaps the model over the seeds, and the model's code branches on "
                                    f"the values of the dict batch's {list(source.keys)} (Hugging Face's attention-mask "
                                    "handling does), which vmap cannot follow; call decompose once per seed, or give "
                                    "unpadded token windows (a tensor of input_ids)") from e  # fmt: skip
            else:
                terms = _Run.single_step(method, run.cm, run.params, run.factors, opt, x, step, run.capture)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps - 1:
                lr = opt.param_groups[0]["lr"]
                if not stacked:
                    terms = mean_over_ranks(terms)  # the global batch's mean (data-parallel)
                for i, seed in enumerate(seeds):
                    values = {n: v[i] for n, v in terms.items()} if stacked else terms
                    logged = {"step": step, "lr": lr, **as_floats(values)}
                    histories[i].append(logged)
                    if on_log is not None and is_main():
                        on_log(seed, step, logged)
                shown = {n: float(v.detach().float().mean()) for n, v in terms.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=interactive)
            done = step + 1
            if ckpt_path is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                run.save(ckpt_path, opt, done, source, histories)
    finally:
        bar.close()
    if ckpt_path is not None and start < config.steps:
        run.save(ckpt_path, opt, config.steps, source, histories)
    return run.decompositions(histories)


def decompose(
    model: nn.Module,
    data: Iterable | Callable[[], Tensor],
    config: MethodConfig,
    modules: Sequence[str],
    *,
    tied: dict[str, str] | None = None,
    callback: LogCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    output_fn: OutputFn | None = None,
) -> Decomposition:
    """Decompose the weights of ``model``'s layers matched by ``modules`` (fnmatch patterns over
    ``named_modules``: ``nn.Linear``, ``nn.Embedding`` or a transposed-layout linear) with the method
    of ``config`` (``APDConfig``, ``SPDConfig``).

    ``data`` is an iterable of input batches (or ``(input, label)`` tuples; re-iterated when
    exhausted) or a zero-argument callable returning a batch; inputs may be of any dtype (integer
    token ids included), or dicts of [B, T] token tensors such as a tokenizer's output (the model is
    called as ``model(**batch)``; positions its ``attention_mask`` zeroes are left out of every loss
    and metric). The model's output is used when it is a tensor, else its ``.logits`` (a Hugging Face
    ``ModelOutput``, a dict or a tuple's first element: ``apd.model_io``), else ``output_fn(output)``.
    ``tied={"dec": "enc"}`` declares that ``dec`` holds ``enc``'s weight transposed (``TiedLinear``
    layers, and an ``nn.Linear`` whose weight *is* a selected embedding's, are tied automatically).
    ``callback(step, terms)`` is called
    every ``config.log_every`` steps. With ``checkpoint_dir``, a checkpoint (components, optimiser,
    RNG and data position) is written atomically every ``config.checkpoint_every`` steps and at the
    end, and with ``resume=True`` a run finds its last checkpoint there and continues exactly where
    it stopped (a finished run is not redone). The global torch/numpy/python RNGs are seeded with
    ``config.seed`` (data callables drawing from them are then reproducible).

    Called by every process of an initialised ``torch.distributed`` group, it trains one
    decomposition data-parallel: ``data`` yields the *global* batch on every rank (e.g. from the same
    seeded RNG), each rank keeps its share, and ``callback`` and checkpoint writes happen on rank 0.
    """
    method = method_for(config)
    on_log = None if callback is None else (lambda seed, step, terms: callback(step, terms))
    (dec,) = _train(model, data, method, modules, [config.seed], False, tied, on_log, checkpoint_dir, resume, progress,
                    output_fn=check_output_fn(output_fn))
    return dec


def decompose_seeds(
    model: nn.Module,
    data: Iterable | Callable[[], Tensor],
    config: MethodConfig,
    modules: Sequence[str],
    seeds: Sequence[int],
    *,
    tied: dict[str, str] | None = None,
    callback: SeedsCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    output_fn: OutputFn | None = None,
) -> list[Decomposition]:
    """``decompose`` for every seed in ``seeds`` at once (see the module docstring); returns one
    Decomposition per seed, in order. ``config.seed`` is replaced by each seed; ``data`` is drawn
    once per seed per step. APD's gradient attribution is computed in ``"hidden"`` mode unless
    ``config.gradient_mode`` says otherwise (``"per_sample"`` cannot be vmapped)."""
    method = method_for(config)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds is empty: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} repeats a seed; give distinct seeds")
    run_method = method.vectorised()
    return _train(model, data, run_method, modules, seeds, True, tied, callback, checkpoint_dir, resume, progress,
                  recorded=method.config, output_fn=check_output_fn(output_fn))  # as given (output_loss resolved), before the changes vmap needs
