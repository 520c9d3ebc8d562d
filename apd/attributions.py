"""Attributions A_c(x): how much each component matters on each input (SPEC §1.2).

All functions return [B, C], or [B, *pos, C] when the decomposed layers see a sequence (their
inputs have leading dimensions [B, *pos], e.g. [B, T] for token positions), and are
differentiable with respect to the components (the L_p sparsity loss trains through them);
callers wrap them in ``torch.no_grad`` when only ranking.

Per position (the choice for sequences): the attribution of component c at position t of sample b
is that of c's mask entry s_{b,t,c} alone, over every output of the sample, so a component used at
one token is ranked there and top-k selects per token:

- gradient: A_c(x)[b, t] = Σ_o (Σ_l ⟨∂f_o/∂h_l[b, t], P_{c,l} a_l[b, t]⟩)² = Σ_o (∂f_o/∂s_{b,t,c})², o over
  every output of sample b (all positions);
- ablation: Σ_o (f_o(x) − f_o(x; θ* − P_c at position t only))²;
- activation: Σ_l ‖P_{c,l} a_l[b, t]‖².

Every decomposed layer must see the same positions (APD shares one mask between them). Inputs may be
of any dtype (integer token batches included): derivatives are taken with respect to the layers'
outputs and the component directions, never the input.
"""

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from apd.component_model import ComponentModel
from apd.config import Attribution

__all__ = [
    "gradient_attributions",
    "gradient_attributions_loop",
    "ablation_attributions",
    "activation_attributions",
    "compute_attributions",
]


def _flat(out: Tensor) -> Float[Tensor, "B O"]:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the target returned {type(out).__name__}; APD needs a model whose forward returns one "
            "tensor with the batch first (wrap the model to select the output)"
        )
    return out.reshape(out.shape[0], -1)


def _float_dtype(cm: ComponentModel) -> torch.dtype:
    """The components' dtype: directions and cotangents are built in it (never the input's, which
    may hold integer token ids)."""
    return next(cm.component_parameters()).dtype


def _positions(cm: ComponentModel, a_in: dict[str, Tensor]) -> tuple[int, ...]:
    """The position dimensions [*pos] that every decomposed layer's input shares after the batch."""
    leads = {n: tuple(cm.layers[n].lead_shape(a_in[n])) for n in cm.layer_names}
    shapes = set(leads.values())
    if len(shapes) != 1:
        raise ValueError(
            f"the decomposed layers see different positions {leads} (leading input dimensions); a mask shared by "
            "every layer (APD) needs one set of positions: decompose layers that see the same [B, *pos]"
        )
    return shapes.pop()[1:]


def gradient_attributions(
    cm: ComponentModel, x: Tensor, mode: str = "auto"
) -> Float[Tensor, "B *pos C"]:
    """A_c(x) = Σ_o (Σ_l ⟨∂f_o/∂h_l, P_{c,l} a_l⟩)², exactly, in one batched pass (per position
    for sequences, see the module docstring).

    ``mode="auto"`` (default) takes ``"hidden"`` for small problems (B·O·C·Σ_l d_out_l below
    ~10⁷, where vmap's overhead dominates: TMS 5-2) and ``"per_sample"`` otherwise.
    ``mode="per_sample"`` vmaps one sample's reverse-mode Jacobian ∂f/∂h_l over the
    batch and contracts it with the components' output maps before their inner activations
    P_{c,l} a_l = B_{c,l} (A_{c,l} a_l). Under ``vmap`` whatever does not depend on the sample
    stays unbatched and is computed once: a layer whose output reaches f through sample-independent
    linear maps (the last ``mlp_out`` of a residual MLP, before its linear read-out) costs O·C·d_out
    per batch instead of per sample. Widening layers go one hop at a time (``_hop_layers``), so
    an earlier ``mlp_out`` costs O·C·d_mlp per sample rather than O·C·d_embed.
    ``mode="hidden"`` takes the same Jacobian for the whole batch at once (O·B·C·d_out always; for
    models that ``vmap`` cannot run one sample at a time). The
    other modes differentiate f(x; θ* + Σ_c t_c P_c) at t = 0: ``"jacfwd"`` takes one forward-mode
    JVP per component and position, ``"jacrev"`` one VJP per output dimension through the
    components. All agree to rounding. Assumes samples do not interact (no batch norm in train mode).
    """
    B, C = x.shape[0], cm.C
    if mode == "auto":
        mode = "per_sample" if _hidden_cost(cm, x) > _AUTO_PER_SAMPLE_ABOVE else "hidden"
    if mode == "per_sample":
        return _per_sample_gradient_attributions(cm, x)
    if mode == "hidden":
        names = cm.layer_names
        with torch.no_grad(), cm.capture(names, inputs=True) as a_in, cm.capture(names) as h_out:
            cm(x)
        _positions(cm, a_in)

        def f_summed(shift: dict[str, Tensor]) -> Float[Tensor, " O"]:
            return _flat(cm(x, shift=shift)).sum(0)  # sample b's output depends on its own shift only

        zeros = {n: torch.zeros_like(h_out[n]) for n in names}
        jac = jacrev(f_summed)(zeros)  # {name: (O, B, *pos, d_out)}
        inner = 0
        for n in names:
            layer = cm.layers[n]
            v = layer.per_component_out(layer.component_acts(a_in[n]))  # (B, *pos, C, d_out): P_c a_l
            inner = inner + torch.einsum("ob...k,b...ck->bo...c", jac[n].detach(), v)
        return inner.pow(2).sum(1)  # type: ignore[union-attr]
    if mode in ("jacfwd", "jacrev"):
        with torch.no_grad(), cm.capture(cm.layer_names, inputs=True) as a_in:
            cm(x)
        pos = _positions(cm, a_in)
        dtype = _float_dtype(cm)
        if mode == "jacfwd":

            def f_shared(t: Float[Tensor, "*pos C"]) -> Float[Tensor, "B O"]:
                return _flat(cm(x, delta=t.expand(B, *pos, C)))

            jac = jacfwd(f_shared)(torch.zeros(*pos, C, dtype=dtype, device=x.device))  # (B, O, *pos, C)
            return jac.pow(2).sum(1)

        def f_summed_t(t: Float[Tensor, "B *pos C"]) -> Float[Tensor, " O"]:
            return _flat(cm(x, delta=t)).sum(0)

        jac = jacrev(f_summed_t)(torch.zeros(B, *pos, C, dtype=dtype, device=x.device))  # (O, B, *pos, C)
        return jac.pow(2).sum(0)
    raise ValueError(f"mode={mode!r}: use 'auto', 'per_sample', 'hidden', 'jacfwd' or 'jacrev'")


_AUTO_PER_SAMPLE_ABOVE = 1e7  # multiply-adds of the "hidden" contraction


def _hidden_cost(cm: ComponentModel, x: Tensor) -> float:
    """B·O·C·Σ_l (elements of h_l per sample): the size of the "hidden" mode's contraction."""
    with torch.no_grad(), cm.capture(cm.layer_names) as h_out:
        n_out = _flat(cm(x[:1])).shape[1]
    return float(x.shape[0]) * n_out * cm.C * sum(h[0].numel() for h in h_out.values())


def _per_sample_gradient_attributions(cm: ComponentModel, x: Tensor) -> Float[Tensor, "B C"]:
    """Σ_o (Σ_l G_l[o] u_l)² with G_l = (∂f/∂h_l) M_lᵀ, one sample at a time under ``vmap``.

    u_l are the inner activations A_{c,l} a_l and M_l the stacked output maps (``output_map``), so
    G_l u_l = ⟨∂f/∂h_l, P_{c,l} a_l⟩. Models with one position per sample go through
    ``_LayerChain``; otherwise one reverse pass per sample gives every ∂f/∂h_l.
    """
    names = cm.layer_names
    with torch.no_grad(), cm.capture(names, inputs=True) as a_in, cm.capture(names) as h_out:
        out = _flat(cm(x))
    inner_acts = {n: cm.layers[n].component_acts(a_in[n]).flatten(-2) for n in names}  # (B, ..., C·m)
    out_maps = {n: cm.layers[n].output_map() for n in names}  # (C·m, d_out)
    n_out = out.shape[1]

    if all(h_out[n].dim() == 2 for n in names):
        chain = _LayerChain(cm, x[:1], {n: h_out[n][:1] for n in h_out}, {n: a_in[n][:1] for n in names}, n_out)
        for n in names:  # rank m > 1: the chain takes each component's output P_{c,l} a_l [C, d_out]
            if out_maps[n].shape[0] != cm.C:
                inner_acts[n] = cm.layers[n].per_component_out(inner_acts[n].unflatten(-1, (cm.C, -1)))

        def one_sample(x_b: Tensor, acts_b: dict[str, Tensor], h_b: dict[str, Tensor]) -> Float[Tensor, " C"]:
            inner = chain.inner(x_b, h_b, acts_b, out_maps)  # (C, O)
            return (inner * inner).sum(1)  # faster than pow(2) on CPU

        per_sample_inputs: tuple = (inner_acts, {n: h_out[n] for n in names})
    else:
        pos = _positions(cm, a_in)
        zeros = {n: h_out[n].new_zeros(h_out[n].shape[1:]) for n in names}  # made outside vmap: unbatched
        # the cotangents too (jacrev would build them from the batched output, batching them)
        eye = torch.eye(n_out, dtype=out.dtype, device=out.device)

        def one_sample(x_b: Tensor, acts_b: dict[str, Tensor]) -> Float[Tensor, "*pos C"]:  # type: ignore[misc]
            def f(shift: dict[str, Tensor]) -> Float[Tensor, " O"]:
                return _flat(cm(x_b.unsqueeze(0), shift={n: s.unsqueeze(0) for n, s in shift.items()}))[0]

            _, pullback = vjp(f, zeros)
            (jac,) = vmap(pullback)(eye)  # {name: (O, ..., d_out)}: ∂f/∂h_l
            terms = {}
            for n in names:
                j = jac[n].reshape(n_out, -1, jac[n].shape[-1])  # (O, P, d_out), P positions
                a = acts_b[n].reshape(j.shape[1], -1)  # (P, C·m)
                terms[n] = torch.einsum("opd,kd,pk->opk", j, out_maps[n], a)  # per position p
            return _square_norm(terms, cm.C).reshape(*pos, cm.C)

        per_sample_inputs = (inner_acts,)

    # chunks of samples bound the memory of large (evaluation) batches; each chunk is its own vmap
    # call, so what does not depend on the sample is computed once per chunk
    parts = [
        vmap(one_sample)(x[i : i + _CHUNK], *(_tree_slice(t, i, i + _CHUNK) for t in per_sample_inputs))
        for i in range(0, x.shape[0], _CHUNK)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_CHUNK = 1024  # samples per vmap call


def _tree_slice(tree: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    return {k: v[start:stop] for k, v in tree.items()}


def _square_norm(terms: dict[str, Float[Tensor, "O *P Cm"]], C: int) -> Float[Tensor, "*P C"]:
    """Σ_o (Σ_l terms_l[o, ..., c])², summing each component's m rank directions first."""
    inner = None
    for t in terms.values():
        if t.shape[-1] != C:  # rank m > 1 (m may differ between layers)
            t = t.unflatten(-1, (C, -1)).sum(-1)
        inner = t if inner is None else inner + t
    assert inner is not None
    return (inner * inner).sum(0)


class _LayerChain:
    """Σ_l G_l u_l for one sample, G_l = (∂f/∂h_l) M_lᵀ, from cheap products along the layers.

    Cut the model at every decomposed layer (``replace``: each layer outputs a given h_k). Then h_l
    reaches the output f and the inputs a_k of later layers only along paths through no other
    decomposed layer, and the chain rule through the decomposed layers, linear in their inputs
    (h_k = W_k a_k + b_k), gives for any directions D in h_l's space

        (∂f/∂h_l) D = (∂f/∂h_l)|cut D + Σ_k (∂f/∂h_k) W_k (∂a_k/∂h_l)|cut D.

    Going backwards through the layers, each keeps R_k, the narrower of ∂f/∂h_k [O, d_out_k] and
    (∂f/∂h_k) W_k [O, d_in_k] (D = I or D = W_k in the formula above). The cut Jacobians come from
    one reverse pass per layer that pulls back the O output directions and the narrow rows of W_k
    (or I) from each a_k, so every per-sample product is O × (a narrow width) × C·m, and the u_l
    multiply the narrow factors. Where a cut Jacobian does not depend on the sample (a residual
    stream is linear) ``vmap`` computes it once per batch: a residual MLP then never forms a
    per-sample d_embed-wide Jacobian, which the plain reverse pass does for every layer but the
    last. Which outputs depend on which h_l is found by one cut pass per layer on one sample.
    """

    def __init__(self, cm: ComponentModel, x1: Tensor, h1: dict[str, Tensor], a1: dict[str, Tensor], n_out: int):
        self.cm = cm
        self.order = [n for n in h1 if n in cm.layers]  # execution order (the capture's insertion order)
        self.n_out = n_out
        self.reaches_f: dict[str, bool] = {}
        self.reaches: dict[str, list[str]] = {}  # later layers whose input depends on h_l (cut model)
        for n in self.order:
            with torch.enable_grad(), cm.capture(self.order, inputs=True) as a_cut:
                probe = h1[n].detach().requires_grad_(True)
                y = cm(x1, replace={**h1, n: probe})
            self.reaches_f[n] = y.requires_grad
            self.reaches[n] = [k for k in self.order if k != n and a_cut[k].requires_grad]
        needed = {k for n in self.order for k in self.reaches[n]}
        like = next(iter(h1.values()))
        self.like = like

        def eye(d: int) -> Tensor:
            return torch.eye(d, dtype=like.dtype, device=like.device)

        # R_k = (∂f/∂h_k) rep_dirs_kᵀ; the cut pass pulls back pull_rows_k from a_k
        self.rep_dirs: dict[str, Tensor] = {}  # in h_k's space
        pull_rows: dict[str, Tensor] = {}  # in a_k's space
        for k in needed:
            W = cm.layers[k].target_weight().detach()  # (d_out, d_in)
            if W.shape[0] <= W.shape[1]:  # R_k = ∂f/∂h_k, cut pass pulls back W_k's rows
                self.rep_dirs[k], pull_rows[k] = eye(W.shape[0]), W
            else:  # R_k = (∂f/∂h_k) W_k, cut pass pulls back I
                self.rep_dirs[k], pull_rows[k] = W.T, eye(W.shape[1])
        # per layer, the stacked cotangents of its cut pass's outputs (f, then a_k for k in reaches),
        # block-diagonal and made here, outside vmap, so that vmap sees them as sample-independent
        self.cotangents: dict[str, tuple[Tensor, list[Tensor]]] = {}
        self.row_splits: dict[str, list[int]] = {}
        for n in self.order:
            blocks = ([n_out] if self.reaches_f[n] else []) + [pull_rows[k].shape[0] for k in self.reaches[n]]
            if not blocks:
                continue
            f_cot = like.new_zeros(sum(blocks), n_out)
            if self.reaches_f[n]:
                f_cot[:n_out] = eye(n_out)
            a_cots, row = [], n_out if self.reaches_f[n] else 0
            for k in self.reaches[n]:
                cot = like.new_zeros(sum(blocks), *a1[k].shape)
                r = pull_rows[k].shape[0]
                cot[row : row + r, 0] = pull_rows[k]
                a_cots.append(cot)
                row += r
            self.cotangents[n] = (f_cot, a_cots)
            self.row_splits[n] = blocks

    def inner(
        self, x_b: Tensor, h_b: dict[str, Tensor], acts_b: dict[str, Tensor], out_maps: dict[str, Tensor]
    ) -> Float[Tensor, "C O"]:
        """(Σ_l G_l u_l)ᵀ [C, O] for one sample x_b with layer outputs h_b and inner activations u_l
        = acts_b (called under vmap)."""
        cm, x1, C = self.cm, x_b.unsqueeze(0), self.cm.C
        cut = {n: h.unsqueeze(0) for n, h in h_b.items()}
        R: dict[str, Tensor] = {}
        direct: list[tuple[Tensor, Tensor]] = []  # ((C, O), row scales (C,))
        left: dict[str, Tensor] = {}  # k: (C, r_k), summed over the layers reaching k; adds it @ R_kᵀ
        for n in reversed(self.order):
            if n not in self.cotangents:  # h_l reaches nothing: G_l = 0
                if n in self.rep_dirs:
                    R[n] = self.like.new_zeros(self.n_out, self.rep_dirs[n].shape[0])
                continue
            reaches = self.reaches[n]

            def cut_forward(h: Tensor, n: str = n, reaches: list[str] = reaches) -> tuple[Tensor, list[Tensor]]:
                with cm.capture(reaches, inputs=True) as a_cut:
                    y = _flat(cm(x1, replace={**cut, n: h}))[0]
                return y, [a_cut[k] for k in reaches]

            _, pullback = vjp(cut_forward, cut[n])
            (pulled,) = vmap(pullback)(self.cotangents[n])  # (rows, 1, d_out_l)
            parts = list(pulled.flatten(1).split(self.row_splits[n]))
            E_f = parts.pop(0) if self.reaches_f[n] else None  # (O, d_out_l): (∂f/∂h_l)|cut
            u = acts_b[n]  # inner activations (C·m,) at rank 1, else component outputs (C, d_out_l)
            if out_maps[n].shape[0] == C:  # rank 1: M_l E_fᵀ and M_l Pᵀ are often once per batch
                if E_f is not None:
                    direct.append((out_maps[n] @ E_f.T, u))
                for k, P in zip(reaches, parts):  # P: (r_k, d_out_l)
                    Q = (out_maps[n] @ P.T) * u[:, None]  # (C, r_k)
                    left[k] = Q if k not in left else left[k] + Q
            else:  # rank m > 1: u = v, each component's output P_{c,l} a_l [C, d_out_l]
                v = u
                if E_f is not None:
                    direct.append((v @ E_f.T, torch.ones_like(v[:, 0])))
                for k, P in zip(reaches, parts):
                    Q = v @ P.T
                    left[k] = Q if k not in left else left[k] + Q
            if n in self.rep_dirs:
                R[n] = sum(
                    ([E_f @ self.rep_dirs[n].T] if E_f is not None else [])
                    + [R[k] @ (P @ self.rep_dirs[n].T) for k, P in zip(reaches, parts)]
                )
        # Σ_k (C, r_k) @ (r_k, O) as one product; few passes over the (batch, C, O) result
        inner = None
        if left:
            inner = torch.cat(list(left.values()), 1) @ torch.cat([R[k] for k in left], 1).T
        for D, u in direct:  # (C, O) scaled row-wise: one fused pass each
            inner = D * u[:, None] if inner is None else torch.addcmul(inner, D, u[:, None])
        return self.like.new_zeros(C, self.n_out) if inner is None else inner


def gradient_attributions_loop(cm: ComponentModel, x: Tensor) -> Float[Tensor, "B *pos C"]:
    """The paper's reference computation: one backward pass per output dimension.

    Records the input a_l and output h_l of every decomposed use l, back-propagates each output
    dimension o (summed over the batch: samples do not interact) to the h_l, and accumulates
    (Σ_l ⟨∂f_o/∂h_l, P_{c,l} a_l⟩)² at every position. Slow; kept as the ground truth for tests and as
    the benchmark baseline.
    """
    names = cm.layer_names
    with cm.capture(names, inputs=True) as a_in, cm.capture(names, require_grad=True) as h_out:
        out = _flat(cm(x))
    _positions(cm, a_in)
    contribs = {}
    for n in names:
        layer = cm.layers[n]
        contribs[n] = layer.per_component_out(layer.component_acts(a_in[n]))  # (B, *pos, C, d_out)
    hs = [h_out[n] for n in names]
    attr: Tensor | int = 0
    for o in range(out.shape[1]):
        grads = torch.autograd.grad(out[:, o].sum(), hs, retain_graph=True, allow_unused=True)
        total: Tensor | int = 0
        for n, g in zip(names, grads):
            if g is None:  # the layer's output does not reach the output
                continue
            total = total + (contribs[n] * g.unsqueeze(-2)).sum(-1)  # (B, *pos, C)
        attr = attr + total.pow(2) if isinstance(total, Tensor) else attr
    if not isinstance(attr, Tensor):  # no decomposed layer reaches the output
        return next(iter(contribs.values())).new_zeros(next(iter(contribs.values())).shape[:-1])
    return attr


def ablation_attributions(cm: ComponentModel, x: Tensor) -> Float[Tensor, "B *pos C"]:
    """A_c(x) = Σ_o (f_o(x; θ*) - f_o(x; θ* - P_c))², all ablations in vmapped passes: one per
    component (and per position, for sequences: P_c ablated at that position only)."""
    B, C = x.shape[0], cm.C
    target = _flat(cm(x))
    dtype = _float_dtype(cm)
    with torch.no_grad(), cm.capture(cm.layer_names, inputs=True) as a_in:
        cm(x)
    pos = _positions(cm, a_in)
    if not pos:
        eye = -torch.eye(C, dtype=dtype, device=x.device)

        def ablated(t: Float[Tensor, " C"]) -> Float[Tensor, "B O"]:
            return _flat(cm(x, delta=t.expand(B, C)))

        outs = vmap(ablated)(eye)  # (C, B, O)
        return (target.unsqueeze(0) - outs).pow(2).sum(-1).T
    n_pos = math.prod(pos)
    eye = -torch.eye(n_pos * C, dtype=dtype, device=x.device).reshape(n_pos * C, *pos, C)

    def ablated_at(t: Float[Tensor, "*pos C"]) -> Float[Tensor, "B O"]:
        return _flat(cm(x, delta=t.expand(B, *pos, C)))

    sq = torch.cat([(target.unsqueeze(0) - vmap(ablated_at)(eye[i : i + _CHUNK])).pow(2).sum(-1)
                    for i in range(0, eye.shape[0], _CHUNK)])  # (P·C, B)  # fmt: skip
    return sq.T.reshape(B, *pos, C)


def activation_attributions(cm: ComponentModel, x: Tensor) -> Float[Tensor, "B *pos C"]:
    """A_c(x) = Σ_l ‖P_{c,l} a_l‖² over every use l of a decomposed matrix (at each position)."""
    with cm.capture(cm.layer_names, inputs=True) as a_in:
        cm(x)
    _positions(cm, a_in)
    attr: Tensor | int = 0
    for n in cm.layer_names:
        layer = cm.layers[n]
        attr = attr + layer.per_component_sq_norm(layer.component_acts(a_in[n]))  # (B, *pos, C)
    assert isinstance(attr, Tensor)
    return attr


_ATTRIBUTIONS: dict[Attribution, Callable[[ComponentModel, Tensor], Tensor]] = {
    Attribution.gradient: gradient_attributions,
    Attribution.ablation: ablation_attributions,
    Attribution.activation: activation_attributions,
}


def compute_attributions(cm: ComponentModel, x: Tensor, kind: Attribution | str) -> Float[Tensor, "B *pos C"]:
    """Dispatch on the attribution kind (an ``Attribution`` or its string value)."""
    return _ATTRIBUTIONS[Attribution(kind)](cm, x)
