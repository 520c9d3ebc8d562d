"""goodfire-ai/spd's torch SPD training step, rebuilt from its published maths as a speed baseline.

Written from the structure of goodfire-ai/spd (``main`` at 3f0bb61e, the torch code: ``spd/run_spd.py``
``optimize``, ``spd/models/component_model.py``, ``spd/models/components.py``, ``spd/models/sigmoids.py``,
``spd/utils/component_utils.py`` and ``spd/metrics/{stochastic_recon,stochastic_recon_layerwise,
importance_minimality}_loss.py``); no code is copied. One step there:

1. the weight deltas Δ_l = W_l − (V_l U_l)ᵀ of every decomposed matrix, with their graph;
2. a target forward with forward hooks that cache every decomposed module's input;
3. causal importances per module: the MLP CI function reads x V (computed here, and again in every
   masked forward), C parallel MLPs 1 → hidden → 1 with GELU (``ParallelLinear``: an einsum over
   [..., C, d_in] × [C, d_in, d_out]), or a shared MLP from the module's input to C outputs; then the
   lower-leaky hard sigmoid (an autograd Function) and the upper-leaky one (``torch.where``) as two
   separate functions of the pre-activation;
4. each loss in turn. A stochastic mask set draws ``rand_like`` per module (m = g + (1 − g)·r) and
   ``rand`` of the leading shape per module for Δ. Stochastic reconstruction: per mask sample one
   forward with every module hooked; layerwise: per mask sample one forward per module with only it
   hooked. A hooked module computes x V, multiplies by the mask, maps through U, adds
   r_Δ · (x Δᵀ) and the bias. D is Σ(pred − target)² / numel (MSE) or Σ_vocab KL / positions.
   Importance minimality Σ_l Σ_c mean (g⁺ + ε)^p;
5. ``total.backward()``, ``AdamW(weight_decay=0)`` over the components and CI functions, the learning
   rate set from the schedule each step.

This rebuild follows the toolkit preset's maths where the two differ (the same C, batch, mask
samples, losses and values from the same state): the importance-minimality coefficient's decay
(``importance_minimality_decay_start_frac``, the toolkit's, absent there) is applied; a tied second use
(TMS's decoder, ``TiedLinear``) is decomposed as its own matrix with its own V, U copied from the
toolkit's factors, as goodfire-ai/spd decomposes ``linear1`` and ``linear2`` separately (so the values
from one state agree, the gradients of the tied factors do not).

``ReferenceSPD.from_toolkit(cm, method, target)`` copies a toolkit component model's state (V = Aᵀ,
U = Bᵀ per module, the CI functions' weights) into this layout, so both steps compute the same loss
from the same state; ``ReplayDraws`` feeds it the random draws the toolkit made.
"""

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceSPD", "ReplayDraws", "FreshDraws", "RecordDraws", "reference_loss_terms", "reference_train_step",
           "reference_optimizer", "paired_loss_terms"]


# ---------------------------------------------------------------------------- components and CI functions
class LinearComponents(nn.Module):
    """V [d_in, C], U [C, d_out], the frozen bias; y = ((x V) ⊙ mask) U + r_Δ (x Δᵀ) + bias."""

    def __init__(self, C: int, d_in: int, d_out: int, bias: Tensor | None):
        super().__init__()
        self.C = C
        self.V = nn.Parameter(torch.empty(d_in, C))
        self.U = nn.Parameter(torch.empty(C, d_out))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """(V U)ᵀ, in nn.Linear's [d_out, d_in] layout."""
        return torch.einsum("ic,co->oi", self.V, self.U)

    def get_component_acts(self, x: Tensor) -> Tensor:
        return torch.einsum("...i,ic->...c", x, self.V)

    def forward(self, x: Tensor, mask: Tensor | None = None,
                weight_delta_and_mask: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
        acts = self.get_component_acts(x)
        if mask is not None:
            acts = acts * mask
        out = torch.einsum("...c,co->...o", acts, self.U)
        if weight_delta_and_mask is not None:
            delta, delta_mask = weight_delta_and_mask
            delta_out = torch.einsum("...i,oi->...o", x, delta)
            out = out + torch.einsum("...,...o->...o", delta_mask, delta_out)
        if self.bias is not None:
            out = out + self.bias
        return out


class ParallelLinear(nn.Module):
    """C linear maps at once: [..., C, d_in] × W [C, d_in, d_out] + b [C, d_out]."""

    def __init__(self, C: int, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(C, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(C, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...ci,cio->...co", x, self.W) + self.b


class Linear(nn.Module):
    """x W + b with W [d_in, d_out]."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_in, d_out))
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...i,io->...o", x, self.W) + self.b


class MLPCiFn(nn.Module):
    """Per component an MLP 1 → hidden → 1 (GELU) on its scalar x V_c."""

    def __init__(self, C: int, hidden: Sequence[int]):
        super().__init__()
        dims = [1, *hidden]
        self.layers = nn.Sequential()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            self.layers.append(ParallelLinear(C, d_in, d_out))
            self.layers.append(nn.GELU())
        self.layers.append(ParallelLinear(C, dims[-1], 1))

    def forward(self, acts: Tensor) -> Tensor:
        return self.layers(acts.unsqueeze(-1))[..., 0]


class VectorSharedMLPCiFn(nn.Module):
    """One MLP from the module's input to its C pre-activations (GELU between layers)."""

    def __init__(self, C: int, d_in: int, hidden: Sequence[int]):
        super().__init__()
        dims = [d_in, *hidden]
        self.layers = nn.Sequential()
        for a, b in zip(dims[:-1], dims[1:]):
            self.layers.append(Linear(a, b))
            self.layers.append(nn.GELU())
        self.layers.append(Linear(dims[-1], C))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# ---------------------------------------------------------------------------- the two squashing functions
class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return torch.clamp(x, min=0, max=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        zeros = torch.zeros_like(grad)
        below = torch.where(grad < 0, ctx.alpha * grad, zeros)
        return torch.where(x <= 0, below, torch.where(x <= 1, grad, zeros)), None


def lower_leaky_hard_sigmoid(x: Tensor, alpha: float = 0.01) -> Tensor:
    return _LowerLeakyHardSigmoid.apply(x, alpha)  # type: ignore[no-any-return]


def upper_leaky_hard_sigmoid(x: Tensor, alpha: float = 0.01) -> Tensor:
    return torch.where(x > 1, 1 + alpha * (x - 1), torch.clamp(x, min=0, max=1))


# ---------------------------------------------------------------------------- random draws
class FreshDraws:
    """The reference's draws: ``rand_like`` of g per module, then ``rand`` of the leading shape per module."""

    def mask_set(self, ci: Mapping[str, Tensor], delta: bool) -> dict[str, tuple[Tensor, Tensor | None]]:
        r = {n: torch.rand_like(g) for n, g in ci.items()}
        g0 = next(iter(ci.values()))
        rd = {n: torch.rand(g0.shape[:-1], device=g0.device, dtype=g0.dtype) for n in ci} if delta else {}
        return {n: (r[n], rd.get(n)) for n in ci}


class RecordDraws:
    """Wraps the toolkit's ``rand_rows(like, binary=False)`` and keeps every draw in order."""

    def __init__(self, rand_rows: Callable[..., Tensor]):
        self.rand_rows, self.draws = rand_rows, []

    def __call__(self, like: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        r = self.rand_rows(like, *args, **kwargs)
        self.draws.append(r.detach().clone())
        return r


class ReplayDraws:
    """The toolkit's draws, replayed in the order it made them: each mask set takes, per module in the
    toolkit's layer order, the next [*lead, C] draw (mask) and the next [*lead] draw (Δ)."""

    def __init__(self, draws: Sequence[Tensor], layer_names: Sequence[str], names: Mapping[str, str] | None = None):
        self.layer_names = list(layer_names)
        self.names = dict(names or {})  # toolkit name -> this model's module name (default: the same)
        ndim = max(d.dim() for d in draws)
        self.comp = [d for d in draws if d.dim() == ndim]
        self.delta = [d for d in draws if d.dim() == ndim - 1]

    def mask_set(self, ci: Mapping[str, Tensor], delta: bool) -> dict[str, tuple[Tensor, Tensor | None]]:
        out = {}
        for n in self.layer_names:
            r = self.comp.pop(0)
            rd = self.delta.pop(0) if delta else None
            out[self.names.get(n, n)] = (r, rd)
        assert set(out) == set(ci), f"replayed draws for {sorted(out)}, but the modules are {sorted(ci)}"
        return out

    def exhausted(self) -> bool:
        return not self.comp and not self.delta


# ---------------------------------------------------------------------------- the component model
class ReferenceSPD(nn.Module):
    """The target (frozen) with ``components`` and ``ci_fns`` per decomposed module path, run through
    forward hooks attached for each call (goodfire-ai/spd's ``ComponentModel``)."""

    def __init__(self, target: nn.Module, C: Mapping[str, int], ci_fn_type: str, ci_hidden: Sequence[int]):
        super().__init__()
        self.target_model = copy.deepcopy(target).eval().requires_grad_(False)
        self.module_paths = list(C)
        self.components: dict[str, LinearComponents] = {}
        self.ci_fns: dict[str, nn.Module] = {}
        for path, c in C.items():
            mod = self.target_model.get_submodule(path)
            d_out, d_in = self.target_weight(path).shape
            self.components[path] = LinearComponents(c, d_in, d_out, getattr(mod, "bias", None))
            if ci_fn_type == "mlp":
                self.ci_fns[path] = MLPCiFn(c, ci_hidden)
            elif ci_fn_type == "shared_mlp":
                self.ci_fns[path] = VectorSharedMLPCiFn(c, d_in, ci_hidden)
            else:
                raise ValueError(f"ci_fn={ci_fn_type!r}: the reference benchmark rebuilds 'mlp' and 'shared_mlp' only")
        self._components = nn.ModuleDict({k.replace(".", "-"): v for k, v in self.components.items()})
        self._ci_fns = nn.ModuleDict({k.replace(".", "-"): v for k, v in self.ci_fns.items()})
        self.last_ci: dict[str, Tensor] = {}  # the last step's g (its L0 is logged each step)

    def target_weight(self, path: str) -> Tensor:
        """W in nn.Linear's [d_out, d_in] layout (a ``TiedLinear``'s is its source's transposed)."""
        return self.target_model.get_submodule(path).weight

    def component_params(self) -> list[nn.Parameter]:
        return [p for comp in self.components.values() for p in comp.parameters()]

    def ci_fn_params(self) -> list[nn.Parameter]:
        return [p for fn in self.ci_fns.values() for p in fn.parameters()]

    def calc_weight_deltas(self) -> dict[str, Tensor]:
        return {n: self.target_weight(n) - comp.weight for n, comp in self.components.items()}

    def forward(self, x: Tensor, mask_infos: Mapping[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] | None = None,
                cache_inputs: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        if mask_infos is None and not cache_inputs:
            return self.target_model(x)
        cache: dict[str, Tensor] = {}
        names = list(mask_infos) if mask_infos else self.module_paths
        hooks = {n: partial(self._hook, name=n, mask_info=mask_infos[n] if mask_infos else None,
                            cache=cache if cache_inputs else None) for n in names}  # fmt: skip
        with self._attached(hooks):
            out = self.target_model(x)
        return (out, cache) if cache_inputs else out

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor, name: str,
              mask_info: tuple[Tensor, tuple[Tensor, Tensor] | None] | None, cache: dict[str, Tensor] | None) -> Tensor | None:  # fmt: skip
        x = args[0]
        if cache is not None:
            cache[name] = x
        if mask_info is None:
            return None
        mask, delta = mask_info
        return self.components[name](x, mask=mask, weight_delta_and_mask=delta)

    @contextmanager
    def _attached(self, hooks: Mapping[str, Callable[..., Any]]) -> Iterator[None]:
        handles = [self.target_model.get_submodule(n).register_forward_hook(h, with_kwargs=True) for n, h in hooks.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def calc_causal_importances(self, pre_weight_acts: Mapping[str, Tensor], alpha: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        lower, upper = {}, {}
        for name, a in pre_weight_acts.items():
            fn = self.ci_fns[name]
            inp = self.components[name].get_component_acts(a) if isinstance(fn, MLPCiFn) else a
            pre = fn(inp)
            lower[name] = lower_leaky_hard_sigmoid(pre, alpha)
            upper[name] = upper_leaky_hard_sigmoid(pre, alpha)
        self.last_ci = lower
        return lower, upper

    # ------------------------------------------------------------------ from a toolkit decomposition
    @classmethod
    def from_toolkit(cls, cm: nn.Module, method: Any, target: nn.Module) -> "ReferenceSPD":
        """This layout with the state of the toolkit's SPD component model ``cm`` (``target``: the model
        it was built from; a tied second use gets its own V, U copied from the shared factors)."""
        from apd.methods.spd import ci_functions

        c = method.config
        C = cm.C_per_module()
        ref = cls(target, C, c.ci_fn.value, list(c.ci_hidden))
        fns = ci_functions(cm)
        with torch.no_grad():
            for n in cm.layer_names:
                layer, comp = cm.layers[n], ref.components[n]
                if layer.m != 1:
                    raise ValueError(f"{n}: SPD's subcomponents are rank one, this layer has m={layer.m}")
                eye = torch.eye(comp.V.shape[0], dtype=comp.V.dtype, device=comp.V.device)
                comp.V.copy_(layer.component_acts(eye)[..., 0])  # x V for every unit x: V itself
                comp.U.copy_(layer.output_map())
                _copy_ci_fn(fns.fn(n), ref.ci_fns[n], n)
        return ref.to(next(iter(cm.parameters())).device)


def _copy_ci_fn(src: nn.Module, dst: nn.Module, name: str) -> None:
    """Copy the toolkit CI function's (weight, bias) pairs into ours, in order: a tensor named ``weight``
    (nn.Linear's [d_out, d_in] layout) is transposed into our [d_in, d_out], one named ``W`` is
    [(C,) d_in, d_out] as ours."""
    theirs = list(src.named_parameters())
    ours = [m for m in dst.layers if isinstance(m, ParallelLinear | Linear)]
    if len(theirs) != 2 * len(ours):
        raise ValueError(f"CI function of {name}: {len(theirs)} tensors, expected {2 * len(ours)} (weight, bias per layer); "
                         "the toolkit's CI-function layout changed: update benchmarks/reference_spd.py")  # fmt: skip
    for lin, (wn, w), (_, b) in zip(ours, theirs[0::2], theirs[1::2]):
        if wn.endswith("weight"):
            w = w.T
        if w.shape != lin.W.shape or b.shape != lin.b.shape:
            raise ValueError(f"CI function of {name}: toolkit tensors {wn} {tuple(w.shape)}, {tuple(b.shape)} do not fit "
                             f"{tuple(lin.W.shape)}, {tuple(lin.b.shape)}; update benchmarks/reference_spd.py")  # fmt: skip
        lin.W.copy_(w)
        lin.b.copy_(b)


# ---------------------------------------------------------------------------- one step
def _recon_sum(pred: Tensor, target: Tensor, kind: str) -> tuple[Tensor, int]:
    if kind == "mse":
        return ((pred - target) ** 2).sum(), pred.numel()
    log_q = torch.log_softmax(pred, dim=-1)
    p = torch.softmax(target, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1).sum(), pred.shape[:-1].numel()


def _annealed_p(c: Any, frac: float) -> float:
    if c.pnorm_final is None or c.pnorm_anneal_start_frac >= 1.0 or frac < c.pnorm_anneal_start_frac:
        return c.pnorm
    if frac >= c.pnorm_anneal_end_frac:
        return c.pnorm_final
    t = (frac - c.pnorm_anneal_start_frac) / (c.pnorm_anneal_end_frac - c.pnorm_anneal_start_frac)
    return c.pnorm + (c.pnorm_final - c.pnorm) * t


def _minimality_decay(c: Any, step: int) -> float:
    """The toolkit's decay of the minimality coefficient (not in goodfire-ai/spd; 1 before its start)."""
    frac, start = step / max(c.steps - 1, 1), c.importance_minimality_decay_start_frac
    if frac <= start:
        return 1.0
    return 0.0 if frac >= 1.0 or start == 1.0 else 1.0 - (frac - start) / (1.0 - start)


def _mask_infos(ci: Mapping[str, Tensor], weight_deltas: Mapping[str, Tensor] | None, draws: Any):
    rs = draws.mask_set(ci, weight_deltas is not None)
    return {n: (g + (1 - g) * rs[n][0], None if weight_deltas is None else (weight_deltas[n], rs[n][1])) for n, g in ci.items()}


def reference_loss_terms(ref: ReferenceSPD, x: Tensor, step: int, config: Any, draws: Any = None) -> dict[str, Tensor]:
    """The step's loss terms and ``total`` (``config``: the toolkit's SPDConfig; its coefficients say which
    losses are on). ``draws``: ``FreshDraws()`` (default) or ``ReplayDraws`` of the toolkit's."""
    c = config
    draws = draws or FreshDraws()
    kind = "mse" if c.output_loss is None else c.output_loss.value
    weight_deltas = ref.calc_weight_deltas()
    target_out, pre_weight_acts = ref(x, cache_inputs=True)
    ci, ci_upper = ref.calc_causal_importances(pre_weight_acts, c.leaky_alpha)
    deltas = weight_deltas if c.delta_component else None
    terms: dict[str, Tensor] = {}
    if c.coefficient("faithfulness") > 0:
        terms["faithfulness"] = sum((d**2).sum() for d in weight_deltas.values()) / sum(d.numel() for d in weight_deltas.values())
    if c.coefficient("stochastic_recon") > 0:
        total, n = torch.tensor(0.0, device=x.device), 0
        for infos in [_mask_infos(ci, deltas, draws) for _ in range(c.n_mask_samples)]:
            s, k = _recon_sum(ref(x, mask_infos=infos), target_out, kind)
            total, n = total + s, n + k
        terms["stochastic_recon"] = total / n
    if c.coefficient("stochastic_recon_layerwise") > 0:
        total, n = torch.tensor(0.0, device=x.device), 0
        for infos in [_mask_infos(ci, deltas, draws) for _ in range(c.n_mask_samples)]:
            for name, info in infos.items():
                s, k = _recon_sum(ref(x, mask_infos={name: info}), target_out, kind)
                total, n = total + s, n + k
        terms["stochastic_recon_layerwise"] = total / n
    if c.coefficient("ci_masked_recon") > 0:
        s, k = _recon_sum(ref(x, mask_infos={n: (g, None) for n, g in ci.items()}), target_out, kind)
        terms["ci_masked_recon"] = s / k
    if c.coefficient("importance_minimality") > 0:
        p = _annealed_p(c, step / c.steps)
        total = torch.tensor(0.0, device=x.device)
        for g in ci_upper.values():
            sums = ((g + c.importance_minimality_eps) ** p).sum(dim=tuple(range(g.dim() - 1)))
            mean = sums / g.shape[:-1].numel()
            total = total + (mean + c.importance_minimality_beta * mean * torch.log2(1 + sums)).sum()
        scale = _minimality_decay(c, step)
        terms["importance_minimality"] = total if scale == 1.0 else total * scale
    terms["total"] = sum(c.coefficient(n) * v for n, v in terms.items())  # type: ignore[assignment]
    return terms


def reference_optimizer(ref: ReferenceSPD, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ref.component_params() + ref.ci_fn_params(), lr=lr, weight_decay=0)


def reference_lr(config: Any, step: int) -> float:
    """Constant or cosine from the preset's lr (with its linear warm-up, which goodfire-ai/spd also has)."""
    c = config
    warmup = int(c.warmup_frac * c.steps)
    if step < warmup:
        return c.lr * (step + 1) / warmup
    if c.lr_schedule.value == "constant":
        return c.lr
    progress = (step - warmup) / max(1, c.steps - warmup)
    return c.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_train_step(ref: ReferenceSPD, opt: torch.optim.Optimizer, x: Tensor, step: int, config: Any) -> float:
    """One optimiser step as goodfire-ai/spd's ``optimize`` takes it; returns the total loss."""
    opt.zero_grad()
    for group in opt.param_groups:
        group["lr"] = reference_lr(config, step)
    terms = reference_loss_terms(ref, x, step, config)
    logged = {n: v.item() for n, v in terms.items()}  # its per-term logging reads every value each step
    terms["total"].backward()
    for g in ref.last_ci.values():  # and the L0 of each module's g
        logged[f"l0/{id(g)}"] = (g > config.ci_threshold).float().sum(-1).mean().item()
    opt.step()
    return logged["total"]


def paired_loss_terms(cm: nn.Module, method: Any, ref: ReferenceSPD, x: Tensor, step: int = 0,
                      tensors: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The toolkit's loss terms (``method.loss_terms``) and the reference's on the same state, with the
    reference replaying the toolkit's random draws (``apd.methods.spd.rand_rows`` recorded); floats, or
    with ``tensors=True`` the terms with their graphs."""
    from unittest import mock

    import apd.methods.spd as spd

    recorder = RecordDraws(spd.rand_rows)
    with mock.patch.object(spd, "rand_rows", recorder):
        ours = method.loss_terms(cm, x, step)
    replay = ReplayDraws(recorder.draws, cm.layer_names)
    theirs = reference_loss_terms(ref, x, step, method.config, replay)
    if not replay.exhausted():
        raise AssertionError(f"the reference used fewer random draws than the toolkit made ({len(replay.comp)} masks left)")
    if tensors:
        return ours, theirs
    return {k: float(v.detach()) for k, v in ours.items()}, {k: float(v.detach()) for k, v in theirs.items()}
