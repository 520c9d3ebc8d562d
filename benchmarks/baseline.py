"""The benchmarks' baseline: a straightforward implementation of the paper's training step.

It follows the reference research code: gradient attributions with one backward pass per output
dimension and a [batch, C, d_out] product per output, the component outputs materialised per
component, summed under the mask. It shares the toolkit's parameters (a ``ComponentModel``) so
both compute the same loss; only the way of computing differs.
"""

import torch
from torch import Tensor

from apd.component_model import ComponentModel
from apd import APDConfig
from apd.topk import topk_mask


def reference_attributions(cm: ComponentModel, x: Tensor) -> Tensor:
    names = cm.layer_names
    with cm.capture(names, inputs=True) as a_in, cm.capture(names, require_grad=True) as h_out:
        out = cm(x).reshape(x.shape[0], -1)
    per_component = {n: cm.layers[n].per_component_out(cm.layers[n].component_acts(a_in[n])) for n in names}
    attr = torch.zeros(x.shape[0], cm.C, device=x.device)
    for o in range(out.shape[1]):  # one backward pass per output dimension
        grads = torch.autograd.grad(out[:, o].sum(), [h_out[n] for n in names], retain_graph=True)
        total = sum(torch.einsum("bcd,bd->bc", per_component[n], g) for n, g in zip(names, grads))
        attr += total.pow(2)
    return attr


def reference_step(cm: ComponentModel, opt: torch.optim.Optimizer, x: Tensor, cfg: APDConfig, act_names: list[str]) -> float:
    with torch.no_grad(), cm.capture(act_names) as target_acts:
        target_out = cm(x)
    attr = reference_attributions(cm, x).detach()
    mask = topk_mask(attr, cfg.topk, cfg.batch_topk)
    # masked forward with materialised per-component outputs
    names = cm.layer_names

    def masked_hook(mod, args, out, name=None):
        per_c = mod.per_component_out(mod.component_acts(args[0]))  # (B, C, d_out)
        y = (mask[:, :, None] * per_c).sum(1)
        return y if mod.bias is None else y + mod.bias

    handles = [cm.layers[n].register_forward_hook(masked_hook) for n in names]
    try:
        with cm.capture(act_names) as masked_acts:
            masked_out = cm(x)
    finally:
        for h in handles:
            h.remove()
    W = cm.component_weights()  # (C, d_out, d_in) per matrix
    faith = sum(((cm.layers[n].weight - W[n].sum(0)) ** 2).sum() for n in cm.matrix_names) / cm.n_weights()
    minimality = (masked_out - target_out).pow(2).mean()
    simp = 0
    for n in cm.matrix_names:
        layer = cm.layers[n]
        sq = layer.A.pow(2).sum(-1) * layer.B.pow(2).sum(-2)
        simp = simp + (sq + cfg.schatten_eps).pow(cfg.schatten_p / 2).sum(-1)
    simp = (mask * simp).sum() / (cm.n_weights() * x.shape[0])
    loss = cfg.faithfulness_coeff * faith + cfg.minimality_coeff * minimality + cfg.simplicity_coeff * simp
    if act_names:
        loss = loss + (cfg.act_recon_coeff or 0) * sum((target_acts[n] - masked_acts[n]).pow(2).mean() for n in act_names) / len(act_names)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def reference_spd_step(cm: ComponentModel, opt: torch.optim.Optimizer, x: Tensor, method) -> float:  # noqa: ANN001
    """One SPD step written the straightforward way: per-sample masked weights W'(m) = Σ_c m_c U_c V_cᵀ
    + r_Δ (W − Σ_c U_c V_cᵀ) materialised for every sample and module, and applied by hooks that
    replace each layer's output with a batched product, one module at a time. The same losses as
    the toolkit's SPD step (stochastic reconstruction, layerwise, importance minimality; the same
    causal-importance functions), so only the way of computing differs."""
    from apd.losses.importance_minimality import importance_minimality_loss
    from apd.methods.spd import annealed_p

    cfg = method.config
    names = cm.layer_names
    with torch.no_grad(), cm.capture(names, inputs=True) as a_in:
        target_out = cm(x)
    ci, ci_upper = method.importances_from_inputs(cm, a_in)

    def masked_weight(name: str, m: Tensor, r_delta: Tensor) -> Tensor:
        layer = cm.layers[name]
        U = layer.B[:, :, 0] if name not in cm.tied_names else layer.source.A[:, 0]  # (C, d_out)
        V = layer.A[:, 0] if name not in cm.tied_names else layer.source.B[:, :, 0]  # (C, d_in)
        comps = torch.einsum("co,ci->coi", U, V)  # (C, d_out, d_in)
        W = layer.target_weight()
        return torch.einsum("bc,coi->boi", m, comps) + r_delta[:, None, None] * (W - comps.sum(0))[None]

    def run(weights: dict[str, Tensor]) -> Tensor:
        def hook(mod, args, out, name):  # noqa: ANN001
            y = torch.einsum("boi,bi->bo", weights[name], args[0])
            return y if mod.bias is None else y + mod.bias

        handles = [cm.layers[n].register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n in weights]
        try:
            return cm(x)
        finally:
            for h in handles:
                h.remove()

    def draw() -> dict[str, Tensor]:
        return {n: masked_weight(n, g + (1 - g) * torch.rand_like(g), torch.rand(g.shape[0])) for n, g in ci.items()}

    recon = (run(draw()) - target_out).pow(2).mean()
    layerwise = sum((run({n: w}) - target_out).pow(2).mean() for n, w in draw().items()) / len(names)
    imp = importance_minimality_loss(ci_upper, annealed_p(cfg, 0), cfg.importance_minimality_eps)
    loss = cfg.stochastic_recon_coeff * recon + cfg.stochastic_recon_layerwise_coeff * layerwise + cfg.importance_minimality_coeff * imp
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


class _LowerLeakyBefore(torch.autograd.Function):
    """The lower-leaky hard sigmoid as the toolkit computed it before 2026-12-02 (three selects)."""

    @staticmethod
    def forward(x: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        return x.clamp(0, 1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[0])
        ctx.alpha = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        below = torch.where(grad < 0, ctx.alpha * grad, torch.zeros_like(grad))
        inside = torch.where(x <= 1, grad, torch.zeros_like(grad))
        return torch.where(x <= 0, below, inside), None


def separate_leaky_hard_sigmoids(x: Tensor, alpha: float = 0.01) -> tuple[Tensor, Tensor]:
    """(lower-leaky, upper-leaky) hard sigmoids as two separate autograd paths, the step before
    2026-12-02 (what ``apd.methods.spd.leaky_hard_sigmoids`` fuses)."""
    from apd.methods.spd import upper_leaky_hard_sigmoid

    return _LowerLeakyBefore.apply(x, alpha), upper_leaky_hard_sigmoid(x, alpha)


def stochastic_mask_before(g: Tensor, r: Tensor) -> Tensor:
    """``apd.methods.spd.stochastic_mask`` before 2026-12-02: m = g + (1 − g)·r as three passes."""
    return g + (1 - g) * r
