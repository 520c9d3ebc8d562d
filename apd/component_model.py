"""ComponentModel: a frozen copy of the target with its chosen layers swapped for components."""

import contextlib
import copy
import difflib
import fnmatch
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call

from apd.components import (
    ComponentInit,
    Components,
    EmbeddingComponents,
    LinearComponents,
    TiedLinear,
    TransposedComponents,
)
from apd.model_io import ModelIO, as_output_tensor

__all__ = ["ComponentModel", "resolve_modules", "ModuleSelectionError", "TRANSPOSED_LINEAR_CLASS_NAMES", "Masks", "CallRecord"]

Masks = Tensor | Mapping[str, Tensor]
"""One mask tensor for every decomposed module (components shared by all, as APD's are), or a
mapping from module name to that module's mask (SPD: one per module); modules missing from the
mapping run with their target weight."""

TRANSPOSED_LINEAR_CLASS_NAMES: set[str] = {"Conv1D"}
"""Class names of transposed-layout linear layers (y = x @ W + b, ``weight`` [d_in, d_out]), such
as Hugging Face's GPT-2 ``Conv1D``; add the name of your own class to decompose it."""


class ModuleSelectionError(ValueError):
    """A module pattern matched nothing, or matched something that cannot be decomposed."""


def _kind(module: nn.Module) -> str | None:
    """'linear', 'transposed_linear', 'embedding', 'tied' or None (not decomposable)."""
    if isinstance(module, TiedLinear):
        return "tied"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ in TRANSPOSED_LINEAR_CLASS_NAMES and isinstance(getattr(module, "weight", None), Tensor):
        return "transposed_linear"
    return None


_READ_DIRECTLY = {
    nn.MultiheadAttention: "nn.MultiheadAttention passes out_proj.weight to its attention function "
    "itself and never calls out_proj's forward, so components put there would be silently ignored",
}


def _refuse_read_directly(named: dict[str, nn.Module], name: str) -> None:
    parent_name = name.rpartition(".")[0]
    parent = named.get(parent_name)
    for cls, why in _READ_DIRECTLY.items():
        if isinstance(parent, cls):
            raise ModuleSelectionError(
                f"{name!r} cannot be decomposed: {why}. Write the attention with nn.Linear projections "
                "(q, k, v, o as separate nn.Linear layers, as in nanoGPT's CausalSelfAttention) and decompose those"
            )


def _close_names(pattern: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.6)
    return f"close names: {close}; " if close else ""


def _shortlist(names: list[str], limit: int = 40) -> str:
    """``names``, or for a large model its first ``limit`` and a count of the rest."""
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def resolve_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules matched by fnmatch ``patterns``, in ``named_modules`` order.

    Raises ``ModuleSelectionError`` naming the pattern and listing the candidates when a pattern
    matches nothing or only modules that cannot be decomposed (anything but ``nn.Linear``,
    ``nn.Embedding``, a transposed-layout linear such as ``Conv1D``, or ``TiedLinear``), and when it
    matches a module whose weight its parent reads directly (``nn.MultiheadAttention.out_proj``).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ModuleSelectionError("no module patterns given; pass e.g. modules=['fc1', 'layers.*.mlp_in']")
    named = dict(model.named_modules())
    candidates = [n for n, mod in named.items() if _kind(mod) is not None]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"{_close_names(pattern, candidates)}decomposable (nn.Linear, nn.Embedding, Conv1D) modules are: "
                f"{_shortlist(candidates)}"
            )
        bad = [n for n in hits if _kind(named[n]) is None]
        if bad and len(bad) == len(hits):
            kinds = ", ".join(f"{n} ({type(named[n]).__name__})" for n in bad)
            raise ModuleSelectionError(
                f"module pattern {pattern!r} matches only modules that cannot be decomposed: {kinds}; "
                f"decomposable (nn.Linear, nn.Embedding, Conv1D) modules are: {candidates}"
            )
        for n in hits:
            if _kind(named[n]) is not None and n not in chosen:
                _refuse_read_directly(named, n)
                chosen.append(n)
    return [n for n in named if n in chosen]


class ComponentModel(nn.Module):
    """The target (deep-copied, frozen) with each decomposed layer replaced by components.

    ``forward(x)`` runs the target; ``forward(x, masks)`` runs Σ_c s_c P_c in place of every
    decomposed weight (``masks``: one tensor for all modules, or ``{module: tensor}``; see
    :data:`Masks` and ``apd.components`` for shapes); ``forward(x, delta=t)`` runs the target moved
    by Σ_c t_c P_c. The caller's model is never modified.

    ``C`` is the number of components of every decomposed matrix (APD: components span every
    matrix, so one number) or a mapping from matrix name to its number (SPD's subcomponents live
    in one matrix each). Tied weights are one decomposed matrix used twice: a ``TiedLinear`` whose
    source is also selected is tied automatically, and ``tied={"dec": "enc"}`` declares that the
    plain ``nn.Linear`` ``dec`` holds ``enc``'s weight transposed.

    A method may attach trainable modules of its own (``set_method_module``; SPD: its
    causal-importance functions): they are trained, saved and loaded with the components, and this
    class does not know what they compute.
    """

    def __init__(
        self,
        target: nn.Module,
        modules: Sequence[str],
        C: int | Mapping[str, int],
        rank: int | None = None,
        tied: Mapping[str, str] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
        init: ComponentInit = ComponentInit.norm_matched,
    ):
        super().__init__()
        self.model = copy.deepcopy(target)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        names = resolve_modules(self.model, modules)
        named = dict(self.model.named_modules())
        ties = self._find_ties(named, names, dict(tied or {}))
        generator = torch.Generator().manual_seed(seed)

        self.matrix_names: list[str] = [n for n in names if n not in ties]  # one per decomposed matrix
        self.tied_names: dict[str, str] = ties  # second use -> the matrix it shares
        C_of = self._components_per_matrix(C, self.matrix_names)
        self.layers: dict[str, Components] = {}
        self.kinds: dict[str, str] = {}
        for name in self.matrix_names:
            mod = named[name]
            kind = _kind(mod)
            if kind == "embedding":
                assert isinstance(mod, nn.Embedding)
                if mod.max_norm is not None:
                    raise ModuleSelectionError(f"{name!r} is an nn.Embedding with max_norm={mod.max_norm}, which rescales "
                                               "its table in place on lookup; decompose an embedding without max_norm")  # fmt: skip
                comp: Components = EmbeddingComponents(mod.weight.T, None, C_of[name], rank, init_scale, generator, init)
            elif kind == "transposed_linear":
                comp = LinearComponents(mod.weight.T, getattr(mod, "bias", None), C_of[name], rank, init_scale, generator, init)
            else:
                assert isinstance(mod, nn.Linear), f"{name} is a {type(mod).__name__}"
                comp = LinearComponents(mod.weight, mod.bias, C_of[name], rank, init_scale, generator, init)
            self.model.set_submodule(name, comp)
            self.layers[name] = comp
            self.kinds[name] = kind or "linear"
        for name, src in ties.items():
            source = self.layers[src]
            assert isinstance(source, LinearComponents)
            comp = TransposedComponents(source, getattr(named[name], "bias", None))
            self.model.set_submodule(name, comp)
            self.layers[name] = comp
            self.kinds[name] = "tied"
        self.layer_names = [n for n in names]  # every use, in module order
        self.method_module_names: list[str] = []
        """the names of the modules a method attached (``set_method_module``), in attachment order"""
        self.io = ModelIO()
        """how the model is called and its output read (``apd.model_io``: dict batches, ``.logits``)"""

    @staticmethod
    def _components_per_matrix(C: int | Mapping[str, int], names: list[str]) -> dict[str, int]:
        if isinstance(C, Mapping):
            missing = [n for n in names if n not in C]
            if missing:
                raise ModuleSelectionError(f"C gives no number of components for {missing}; give one for each of {names}")
            out = {n: int(C[n]) for n in names}
        else:
            out = {n: int(C) for n in names}
        bad = {n: c for n, c in out.items() if c < 1}
        if bad:
            raise ModuleSelectionError(f"C={bad}: every decomposed matrix needs at least one component")
        return out

    @staticmethod
    def _shared_weights(named: dict[str, nn.Module], names: list[str]) -> dict[str, str]:
        """Ties found by identity: {second use: matrix} for selected modules whose ``weight`` is one
        ``Parameter`` (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``). An ``nn.Linear`` sharing
        an ``nn.Embedding``'s table computes with its transpose in nn.Linear layout: it is the second use
        of the embedding's matrix. Any other sharing is refused."""
        owner: dict[int, str] = {}
        ties: dict[str, str] = {}
        for name in names:
            w = getattr(named[name], "weight", None)
            if not isinstance(w, nn.Parameter) or isinstance(named[name], TiedLinear):
                continue
            first = owner.setdefault(id(w), name)
            if first == name:
                continue
            a, b = named[first], named[name]
            if isinstance(a, nn.Embedding) and isinstance(b, nn.Linear):
                ties[name] = first
            elif isinstance(a, nn.Linear) and isinstance(b, nn.Embedding):
                ties[first] = name
            else:
                raise ModuleSelectionError(
                    f"{first!r} and {name!r} share one weight Parameter ({type(a).__name__} and {type(b).__name__}), "
                    "which apd decomposes as one matrix only for an nn.Embedding and the nn.Linear reading it "
                    f"(tied embeddings); select only one of them (e.g. modules=[{first!r}])"
                )
        return ties

    @staticmethod
    def _find_ties(named: dict[str, nn.Module], names: list[str], declared: dict[str, str]) -> dict[str, str]:
        ties: dict[str, str] = ComponentModel._shared_weights(named, names)
        declared = {n: src for n, src in declared.items() if ties.get(n) != src}  # re-declared identity ties
        by_id = {id(mod): n for n, mod in named.items()}
        for name in names:
            mod = named[name]
            if isinstance(mod, TiedLinear):
                src = by_id.get(id(mod.source))
                if src is None or src not in names:
                    raise ModuleSelectionError(
                        f"{name!r} is a TiedLinear sharing the weight of {src or 'a module outside the model'!r}; "
                        f"select that module too (e.g. modules=[{src!r}, {name!r}]) so the shared matrix is decomposed once"
                    )
                ties[name] = src
        for name, src in declared.items():
            for n in (name, src):
                if n not in names:
                    raise ModuleSelectionError(f"tied={{{name!r}: {src!r}}} names {n!r}, which is not among the selected modules {names}")
            a, b = named[name], named[src]
            if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
                raise ModuleSelectionError(f"tied={{{name!r}: {src!r}}}: both must be nn.Linear")
            if a.weight.shape != b.weight.T.shape or not torch.allclose(a.weight, b.weight.T):
                raise ModuleSelectionError(
                    f"tied={{{name!r}: {src!r}}} declares {name}.weight == {src}.weight.T, but they differ "
                    f"(shapes {tuple(a.weight.shape)} and {tuple(b.weight.shape)}); tie only transposed copies"
                )
            ties[name] = src
        for name, src in ties.items():
            if src in ties:
                raise ModuleSelectionError(f"{name!r} is tied to {src!r}, which is itself tied; tie both to the original")
        return ties

    # ------------------------------------------------------------------ components
    @property
    def C(self) -> int:
        """The number of components, when every decomposed matrix has the same (always for APD)."""
        counts = set(self.C_per_module().values())
        if len(counts) != 1:
            raise ValueError(f"the decomposed matrices have different numbers of components {self.C_per_module()}; "
                             "use C_per_module()")  # fmt: skip
        return counts.pop()

    def C_per_module(self) -> dict[str, int]:
        """Components per layer use (a tied second use has its matrix's)."""
        return {n: self.layers[n].C for n in self.layer_names}

    @staticmethod
    def param_name(layer: str, param: str) -> str:
        """The ``named_parameters`` name of a component factor (``param`` 'A' or 'B') of ``layer``."""
        return f"model.{layer}.{param}"

    def component_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.matrix_names:
            layer = self.layers[name]
            assert isinstance(layer, LinearComponents)
            yield layer.A
            yield layer.B

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every trained tensor by its ``named_parameters`` name: the components (A, B per matrix, in
        matrix order), then the parameters of the modules a method attached, as ``<module>.<parameter>``
        (SPD's causal-importance functions: ``ci_fns.<i>.…``)."""
        out = {self.param_name(n, p): getattr(self.layers[n], p) for n in self.matrix_names for p in ("A", "B")}
        for name in self.method_module_names:
            out |= {f"{name}.{k}": v for k, v in getattr(self, name).named_parameters()}
        return out

    def target_weights(self) -> dict[str, Float[Tensor, "d_out d_in"]]:
        return {n: self.layers[n].target_weight() for n in self.matrix_names}

    def component_weights(self) -> dict[str, Float[Tensor, "C d_out d_in"]]:
        """P_c per decomposed matrix (tied second uses are not repeated), in the layout of the module's
        own ``weight``: [C, d_out, d_in] for ``nn.Linear``, [C, d_in, d_out] for a transposed-layout
        linear (GPT-2's ``Conv1D``), [C, d, vocab] for an embedding (its table transposed)."""
        out = {n: self.layers[n].component_weights() for n in self.matrix_names}  # type: ignore[operator]
        return {n: w.transpose(1, 2) if self.kinds[n] == "transposed_linear" else w for n, w in out.items()}

    def summed_weights(self) -> dict[str, Float[Tensor, "d_out d_in"]]:
        """Σ_c P_c per decomposed matrix."""
        return {n: self.layers[n].summed_weight() for n in self.matrix_names}  # type: ignore[operator]

    def n_weights(self) -> int:
        """N: the number of decomposed weights (each tied matrix counted once)."""
        return sum(self.layers[n].target_weight().numel() for n in self.matrix_names)

    # ------------------------------------------------------------------ a method's own modules
    def set_method_module(self, name: str, module: nn.Module) -> None:
        """Attach a trainable module that a method owns (SPD: its causal-importance functions) under
        ``name``: its parameters join ``trainable_parameters`` as ``<name>.<parameter>``, so they are
        optimised, checkpointed, vmapped over seeds and loaded with the components. Setting a name
        again replaces the module."""
        if not name.isidentifier() or (name not in self.method_module_names and hasattr(self, name)):
            raise ValueError(f"a method module cannot be called {name!r}: it must be a Python name that ComponentModel "
                             "does not use already (e.g. 'ci_fns')")  # fmt: skip
        self.add_module(name, module)
        if name not in self.method_module_names:
            self.method_module_names.append(name)

    def method_module(self, name: str) -> nn.Module | None:
        """The module a method attached under ``name`` (None when there is none)."""
        return getattr(self, name) if name in self.method_module_names else None

    # ------------------------------------------------------------------ forward passes
    def forward(
        self,
        x: Tensor,
        masks: Masks | None = None,
        *,
        delta: Masks | None = None,
        weight_delta_masks: Mapping[str, Tensor] | None = None,
        shift: Mapping[str, Tensor] | None = None,
        replace: Mapping[str, Tensor] | None = None,
        inner_acts: Mapping[str, Tensor] | None = None,
        target_wx: Mapping[str, Tensor] | None = None,
        reuse: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``shift`` maps layer names to tensors added to those layers' outputs; ``replace`` maps
        layer names to tensors used as those layers' outputs in place of computing them;
        ``weight_delta_masks`` maps layer names to the [*lead] mask of their Δ-component (with ``masks``);
        ``inner_acts`` maps layer names to their inner activations [*lead, C, m] on the input they will
        receive in this pass (``layers[n].component_acts(a)``), so that they are not computed again: only
        valid where that input is what the caller says (e.g. the target's own, when no decomposed layer
        before it is masked); ``target_wx`` likewise maps layer names to W a (no bias) on that input;
        ``reuse`` maps submodule names to outputs they are known to return in this pass (``CallRecord.reusable``):
        those modules are not run, (a copy of) their recorded output is returned in their place."""
        if reuse:
            with _reusing(self.model, reuse):
                return self.forward(x, masks, delta=delta, weight_delta_masks=weight_delta_masks, shift=shift,
                                    replace=replace, inner_acts=inner_acts, target_wx=target_wx)  # fmt: skip
        overrides: dict[str, Tensor] = {f"{name}.shift": v for name, v in (shift or {}).items()}
        overrides |= {f"{name}.replace": v for name, v in (replace or {}).items()}
        if inner_acts:
            self._check_names("inner_acts", inner_acts)
            overrides |= {f"{name}.inner": v for name, v in inner_acts.items()}
        if target_wx:
            self._check_names("target_wx", target_wx)
            overrides |= {f"{name}.target_wx": v for name, v in target_wx.items()}
        overrides |= self._per_layer("mask", masks)
        overrides |= self._per_layer("delta", delta)
        if weight_delta_masks:
            self._check_names("weight_delta_masks", weight_delta_masks)
            overrides |= {f"{name}.weight_delta_mask": v for name, v in weight_delta_masks.items()}
        args, kwargs = self.io.args(x)
        out = self.model(*args, **kwargs) if not overrides else functional_call(self.model, overrides, args, kwargs)
        return as_output_tensor(out, self.io.output_fn)

    def valid_positions(self, x: Tensor) -> Tensor | None:
        """[B, T] 0/1: the positions of ``x`` every loss and metric counts (a dict batch's
        ``attention_mask``); None when all count."""
        return self.io.valid_positions(x)

    def _check_names(self, what: str, mapping: Mapping[str, Tensor]) -> None:
        unknown = [n for n in mapping if n not in self.layers]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not decomposed; decomposed modules are {self.layer_names}")

    def _per_layer(self, buffer: str, value: Masks | None) -> dict[str, Tensor]:
        if value is None:
            return {}
        if isinstance(value, Tensor):
            return {f"{name}.{buffer}": value for name in self.layer_names}
        self._check_names(f"{buffer}s", value)
        return {f"{name}.{buffer}": v for name, v in value.items()}

    def lead_shapes(self, x: Tensor) -> dict[str, torch.Size]:
        """The leading dimensions of each layer use's input on ``x`` (the shape its masks need, but C)."""
        with torch.no_grad(), cm_capture(self, self.layer_names, inputs=True) as a_in:
            self(x)
        return {n: self.layers[n].lead_shape(a_in[n]) for n in self.layer_names}

    def check_layers_are_called(self, x: Tensor) -> None:
        """Run the target once on ``x`` and raise ``ModuleSelectionError`` for every decomposed layer
        whose forward is never called (its parent reads the weight directly, or the layer is unused):
        components there would be silently ignored."""
        called: list[str] = []
        with torch.no_grad(), cm_capture(self, self.layer_names, calls=called):
            self(x)
        missing = [n for n in self.layer_names if n not in called]
        if missing:
            raise ModuleSelectionError(
                f"the decomposed module(s) {missing} are never called in a forward pass of {type(self.model).__name__}: "
                "its code reads their weights directly or does not use them, so their components would be ignored. "
                "Decompose only layers whose forward runs (write attention with nn.Linear projections rather than "
                "nn.MultiheadAttention)"
            )

    @contextlib.contextmanager
    def capture(
        self, names: Sequence[str], inputs: bool = False, require_grad: bool = False, calls: list[str] | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """Record the outputs (or inputs) of the named modules during the calls inside the block (a
        module called twice: its last call).

        ``require_grad`` makes each recorded output a graph node even though the target is frozen,
        so that gradients with respect to it can be taken. ``calls``, when given, gets each named
        module's name appended at every call, in call order.

        Hooks live only for the block; the training step uses it only where a loss or attribution
        needs hidden activations, so the plain masked forward stays hook-free.
        """
        with cm_capture(self, names, inputs, require_grad, calls) as cache:
            yield cache

    @contextlib.contextmanager
    def record_calls(self) -> Iterator["CallRecord"]:
        """Record, during the block (one pass of the target), when every submodule of the model starts and
        ends and what it returns, so that later passes can skip the modules that run before their first
        changed layer (``CallRecord.reusable``, ``forward(reuse=...)``)."""
        record = CallRecord()
        handles = []
        for name, mod in self.model.named_modules():
            if name:
                handles.append(mod.register_forward_pre_hook(record._pre_hook(name)))
                handles.append(mod.register_forward_hook(record._post_hook(name)))
        try:
            yield record
        finally:
            for h in handles:
                h.remove()


class CallRecord:
    """The order of the submodule calls of one pass, and their outputs (``ComponentModel.record_calls``).

    A module that the pass called exactly once and that returned before the first call of a layer L ran
    entirely at the target's weights, on inputs that depend on nothing L changes; a later pass on the
    same input that changes only L and layers called after it gets the same output from it. Such a pass
    can take the recorded output instead of running the module (``reusable``). The model must be
    deterministic (eval mode, no random draws before L); an output changed in place after its module
    returned (version counter moved) is not reused, and each reuse hands out a copy."""

    def __init__(self) -> None:
        self.clock = 0
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.outputs: dict[str, tuple[Tensor, int]] = {}
        self._reusable: dict[str, dict[str, Tensor]] = {}

    def _pre_hook(self, name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            self.calls[name] += 1
            self.start.setdefault(name, self.clock)
            self.clock += 1

        return hook

    def _post_hook(self, name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            self.end[name] = self.clock
            self.clock += 1
            if isinstance(out, Tensor):
                self.outputs[name] = (out, _version(out))

        return hook

    def reusable(self, first: str) -> dict[str, Tensor]:
        """{module: its recorded output} for the outermost modules called once that returned before the
        first call of the module ``first`` (which must have been called) and whose output is unchanged."""
        if first in self._reusable:
            return self._reusable[first]
        t = self.start[first]
        ok = {n for n in self.outputs if self.calls[n] == 1 and self.end[n] < t and self.unchanged(n)}
        outer = {n: self.outputs[n][0] for n in ok if n.rpartition(".")[0] not in ok}
        self._reusable[first] = outer
        return outer

    def unchanged(self, name: str) -> bool:
        """Whether the recorded output of ``name`` is still what the module returned (no in-place change since)."""
        out, version = self.outputs[name]
        return _version(out) == version


def _version(t: Tensor) -> int:
    """The version counter of ``t``'s storage (through vmap's wrappers, whose own counter does not move)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t._version


@contextlib.contextmanager
def _reusing(model: nn.Module, outputs: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, each named submodule returns a copy of its given output instead of running."""
    named = dict(model.named_modules())
    patched = []
    try:
        for name, out in outputs.items():
            mod = named[name]
            if "forward" in mod.__dict__:  # its forward is already replaced on the instance: leave it alone
                continue
            mod.forward = lambda *args, _out=out, **kwargs: _out.clone()  # type: ignore[method-assign]
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


@contextlib.contextmanager
def cm_capture(
    cm: ComponentModel, names: Sequence[str], inputs: bool = False, require_grad: bool = False,
    calls: list[str] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """``ComponentModel.capture`` (see there)."""
    named = dict(cm.model.named_modules())
    cache: dict[str, Tensor] = {}
    handles = []
    for name in names:
        if name not in named:
            raise ModuleSelectionError(f"cannot capture {name!r}: no such module; modules are {list(named)}")

        def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> Tensor:
            if require_grad and not out.requires_grad:
                out = out.detach().requires_grad_(True)
            cache[name] = args[0] if inputs else out
            if calls is not None:
                calls.append(name)
            return out

        handles.append(named[name].register_forward_hook(hook))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
