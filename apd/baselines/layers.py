"""Per-layer transcoders on any model: one transcoder per named module (each layer's MLP), trained on
that module's input → output and scored by splicing it in for the module.

Nothing here knows the model's architecture: a module is named by its path in
``model.named_modules()`` (``"mlp"``, ``"blocks.2.mlp"``, ``"model.layers.0.mlp"``), and its input
(the first positional argument of its ``forward``) and output are read, or its output replaced, by
forward hooks that live only inside :func:`capture_module_io` / :func:`replaced_outputs`. The model
itself is driven by two functions of the caller's: ``draw(generator)`` gives one input batch and
``loss_fn(model, batch)`` runs the model on it and returns the scalar loss (next-token cross-entropy
for a language model), so any target, HF or hand-written, fits.

Loss recovered of a module's replacement (Bricken et al.): ``(L_ablated − L) / (L_ablated − L_clean)``
with L the loss with the replacement's output spliced in for the module's, L_clean the model's own and
L_ablated the module's output zeroed, every layer but the replaced one running as it is.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import SAE
from .training import SAETrainConfig, TrainResult, train_sae

__all__ = [
    "LayerTranscoder",
    "capture_module_io",
    "replaced_outputs",
    "module_loss_recovered",
    "recovered_fraction",
    "layer_training_data",
    "train_layer_transcoders",
    "transcoder_scores",
]

Draw = Callable[[torch.Generator], Any]
"""one input batch of the model, drawn with the generator"""
LossFn = Callable[[nn.Module, Any], Tensor]
"""runs the model on a batch and returns its scalar loss"""


def _modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found = dict(model.named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        some = [n for n in found if n][:12]
        raise ValueError(f"modules {missing} are not in the model; name them as in model.named_modules(), e.g. {some}")
    return {n: found[n] for n in names}


def _first_tensor(args: tuple[Any, ...], name: str) -> Tensor:
    if not args or not isinstance(args[0], Tensor):
        raise ValueError(f"module {name!r} was called without a tensor as its first positional argument; a per-layer "
                         "transcoder reads that argument as the layer's input")  # fmt: skip
    return args[0]


def _output_tensor(output: Any, name: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise ValueError(f"module {name!r} returns a {type(output).__name__}, not a tensor; name the module whose output "
                         "is the layer's output tensor (e.g. the MLP, not its block)")  # fmt: skip
    return output


@torch.no_grad()
def capture_module_io(model: nn.Module, modules: Sequence[str], run: Callable[[nn.Module], Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Call ``run(model)`` with forward hooks on ``modules``: each module's input and output, the
    leading dimensions flattened (``[N, d_in]``, ``[N, d_out]``). A module called several times in
    the run contributes every call, concatenated."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in modules}
    handles = []
    for name, module in _modules(model, modules).items():

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            x, y = _first_tensor(args, name), _output_tensor(output, name)
            seen[name].append((x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])))

        handles.append(module.register_forward_hook(hook))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    empty = [n for n, v in seen.items() if not v]
    if empty:
        raise ValueError(f"modules {empty} were not called when the model ran; name modules on the forward path")
    return {n: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for n, v in seen.items()}


@contextmanager
def replaced_outputs(model: nn.Module, replacements: Mapping[str, Callable[[Tensor], Tensor] | None]) -> Iterator[None]:
    """Inside the block, each named module's output is ``replacements[name](its input)``, or zeros
    where the replacement is None (the module still runs; its output is discarded)."""
    handles = []
    for name, module in _modules(model, list(replacements)).items():
        fn = replacements[name]

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any, name: str = name, fn: Callable | None = fn) -> Tensor:
            out = _output_tensor(output, name)
            if fn is None:
                return torch.zeros_like(out)
            return fn(_first_tensor(args, name)).reshape(out.shape).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def module_loss_recovered(
    model: nn.Module, batch: Any, loss_fn: LossFn, module: str, replacement: Callable[[Tensor], Tensor]
) -> dict[str, float]:
    """``loss_clean``, ``loss_ablated`` (the module's output zeroed), ``loss`` (``replacement`` spliced
    in) and ``loss_recovered`` on ``batch`` (module docstring)."""
    clean = float(loss_fn(model, batch))
    with replaced_outputs(model, {module: None}):
        ablated = float(loss_fn(model, batch))
    with replaced_outputs(model, {module: replacement}):
        loss = float(loss_fn(model, batch))
    return {"loss_clean": clean, "loss_ablated": ablated, "loss": loss, "loss_recovered": recovered_fraction(clean, ablated, loss)}


def recovered_fraction(clean: float, ablated: float, loss: float) -> float:
    """(ablated − loss) / (ablated − clean): 1 when a replacement's loss is the clean model's, 0 when it
    is the ablated one's; NaN when ablating changes nothing."""
    gap = ablated - clean
    return (ablated - loss) / gap if gap != 0 else math.nan


def layer_training_data(model: nn.Module, module: str, draw: Draw, loss_fn: LossFn) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """Transcoder batches for :func:`apd.baselines.train_sae`: (input, output) rows of ``module``,
    from as many fresh model batches (``draw``) as ``batch_size`` rows need, cut to ``batch_size``."""

    def data(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        xs, ys, n = [], [], 0
        while n < batch_size:
            batch = draw(generator)
            x, y = capture_module_io(model, [module], lambda m: loss_fn(m, batch))[module]
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
        return torch.cat(xs)[:batch_size], torch.cat(ys)[:batch_size]

    return data


@dataclass
class LayerTranscoder:
    """One module's transcoder, its training history and its scores on the held-out batch."""

    module: str
    sae: SAE
    result: TrainResult
    scores: dict[str, float]
    """``loss_recovered`` (and the three losses), ``fvu`` of the module's output, ``l0``"""


@torch.no_grad()
def transcoder_scores(model: nn.Module, module: str, sae: SAE, batch: Any, loss_fn: LossFn, io: tuple[Tensor, Tensor]) -> dict[str, float]:
    """``module``'s transcoder ``sae`` on ``batch``: the splice's losses and ``loss_recovered``
    (:func:`module_loss_recovered`), ``fvu`` of the module's output and ``l0``, from ``io`` = the
    module's (input, output) rows on that batch (:func:`capture_module_io`)."""
    was_training = sae.training
    sae.eval()
    try:
        x, y = io
        f = sae.encode(x.to(sae.W_enc))
        recon = sae.decode(f)
        fvu = float((recon - y).pow(2).sum() / (y - y.mean(dim=0)).pow(2).sum().clamp_min(1e-30))
        splice = module_loss_recovered(model, batch, loss_fn, module, lambda inp: sae(inp.to(sae.W_enc)))
        return {**splice, "fvu": fvu, "l0": float((f != 0).sum(dim=-1).float().mean())}
    finally:
        sae.train(was_training)


def train_layer_transcoders(
    model: nn.Module,
    modules: Sequence[str],
    make_sae: Callable[[str, int, int], SAE],
    draw: Draw,
    loss_fn: LossFn,
    eval_batch: Any,
    cfg: SAETrainConfig | None = None,
) -> dict[str, LayerTranscoder]:
    """One transcoder per module in ``modules`` (``make_sae(name, d_in, d_out)`` builds it; the widths
    come from one batch), trained on that module's input → output from fresh batches (``draw``) with
    ``cfg``, each scored on ``eval_batch``. With ``cfg.eval_every`` the curve records the module's loss
    recovered on ``eval_batch`` (set ``converge_metric="loss_recovered"`` to judge convergence by it,
    as the language-model comparison does); layer i trains with seed ``cfg.seed + i``. The model is
    put in eval mode (its activations are read without gradients)."""
    cfg = cfg or SAETrainConfig()
    model.eval()
    held_out = capture_module_io(model, modules, lambda m: loss_fn(m, eval_batch))
    out: dict[str, LayerTranscoder] = {}
    for i, name in enumerate(modules):
        x, y = held_out[name]
        sae = make_sae(name, x.shape[-1], y.shape[-1])
        if not sae.cfg.is_transcoder:
            raise ValueError(f"make_sae({name!r}, ...) built an autoencoder; give its config d_out (and "
                             "apply_b_dec_to_input=False) to make it a transcoder")  # fmt: skip

        def evaluate(s: SAE, name: str = name) -> dict[str, float]:
            return transcoder_scores(model, name, s, eval_batch, loss_fn, held_out[name])

        layer_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        result = train_sae(sae, layer_training_data(model, name, draw, loss_fn), layer_cfg, evaluate=evaluate if cfg.eval_every else None)
        out[name] = LayerTranscoder(module=name, sae=sae, result=result, scores=evaluate(sae))
    return out
