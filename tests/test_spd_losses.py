"""SPD's loss terms against hand computations (SPEC §5.3), built to fail on wrong maths.

The random part of the stochastic masks is controlled, not mocked: ``apd.methods.spd.rand_rows``
(the one draw function of an SPD step) is replaced by a queue of chosen values, or wrapped to record
the real draws, and the expected terms are computed from those draws by a plain re-implementation:
per-row weight matrices W'(m) = Σ_c m_c U_c V_cᵀ + r_Δ (W − Σ_c U_c V_cᵀ), the causal importances
from the CI functions' parameters, MSE or the KL of softmaxes written out.
"""

import math

import pytest
import torch
from torch import Tensor, nn

import apd.distributed
import apd.methods.spd as spd_module
from apd import SPDConfig
from apd.methods import method_for
from apd.methods.spd import SPDStep, annealed_p, ci_functions, minimality_scale

# ---------------------------------------------------------------------------------------------- helpers


def _ci_params(cm, name: str) -> dict[str, Tensor]:
    """The parameters of an ``mlp`` CI function (one hidden layer): W1 [C, 1, h], b1 [C, h], W2 [C, h, 1], b2 [C, 1]."""
    p = dict(ci_functions(cm).fn(name).named_parameters())
    return {"W1": p["layers.net.0.W"], "b1": p["layers.net.0.b"], "W2": p["layers.net.2.W"], "b2": p["layers.net.2.b"]}


def _uv(cm, name: str) -> tuple[Tensor, Tensor]:
    """(U [C, d_out], V [C, d_in]) of a rank-one decomposed linear layer."""
    layer = cm.layers[name]
    return layer.B[:, :, 0], layer.A[:, 0, :]


def _gelu(z: Tensor) -> Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _pre(cm, name: str, a: Tensor) -> Tensor:
    """The CI pre-activation [B, C] from the layer input a [B, d_in], written out: per subcomponent c,
    Σ_h gelu(v_c W1[c,h] + b1[c,h]) W2[c,h] + b2[c] with v_c = V_c · a."""
    p = _ci_params(cm, name)
    _, V = _uv(cm, name)
    v = a @ V.T  # [B, C]
    hidden = _gelu(v[..., None] * p["W1"][:, 0, :] + p["b1"])  # [B, C, h]
    return (hidden * p["W2"][:, :, 0]).sum(-1) + p["b2"][:, 0]


def _masked_linear(x: Tensor, W: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, m: Tensor, r_delta: Tensor | None) -> Tensor:
    """y_b = W'_b x_b + bias with the per-row matrix W'_b = Σ_c m_bc U_c V_cᵀ (+ r_Δb (W − Σ_c U_c V_cᵀ))."""
    W_rows = torch.einsum("bc,co,ci->boi", m, U, V)
    if r_delta is not None:
        W_rows = W_rows + r_delta[:, None, None] * (W - U.T @ V)[None]
    y = torch.einsum("boi,bi->bo", W_rows, x)
    return y if bias is None else y + bias


def _distance(target: Tensor, out: Tensor, kind: str) -> Tensor:
    if kind == "mse":
        return ((target - out) ** 2).mean()
    p, q = torch.softmax(target, -1), torch.softmax(out, -1)
    return (p * (p.log() - q.log())).sum(-1).mean()  # KL(target ‖ decomposed), mean over rows


class _Recorder:
    """Wraps the real draw function and keeps every draw: (shape asked for, binary?, values)."""

    def __init__(self) -> None:
        self.draws: list[tuple[tuple[int, ...], bool, Tensor]] = []

    def __call__(self, like: Tensor, binary: bool = False) -> Tensor:
        r = apd.distributed.rand_rows(like, binary=binary)
        self.draws.append((tuple(like.shape), binary, r.detach().clone()))
        return r


class _Queue:
    """Hands out chosen draws in order, checking the shape asked for."""

    def __init__(self, values: list[list]) -> None:
        self.values = [torch.tensor(v) for v in values]

    def __call__(self, like: Tensor, binary: bool = False) -> Tensor:
        r = self.values.pop(0)
        assert r.shape == like.shape, f"draw of shape {tuple(like.shape)} asked for, {tuple(r.shape)} queued"
        return r.to(like.dtype)


# ------------------------------------------------------------------------------ hand-worked numbers, one matrix


def _one_matrix(cfg: SPDConfig):
    """W = [[1, 2]] decomposed into U_0 V_0ᵀ = [[1, 0]], U_1 V_1ᵀ = 2·[[0, 0.5]] = [[0, 1]] (so Δ = [[0, 1]]),
    with constant causal importances g = (0.5, 1) (pre-activations 0.5 and 1.5: g⁺ = (0.5, 1.005))."""
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    method = method_for(cfg)
    cm = method.build(nn.Sequential(lin), ["0"])
    with torch.no_grad():
        cm.layers["0"].A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]]]))
        cm.layers["0"].B.copy_(torch.tensor([[[1.0]], [[2.0]]]))
        for k, v in _ci_params(cm, "0").items():
            v.zero_()
            if k == "b2":
                v.copy_(torch.tensor([[0.5], [1.5]]))
    return method, cm


def test_stochastic_losses_hand_worked_on_one_matrix(monkeypatch):
    """x = (2, 1), target y = 4. Each draw is (r for the two subcomponents, r_Δ); m = g + (1 − g) r.

    stochastic_recon (S = 2): draw 1 r = (0.2, 0.7), r_Δ = 0.5: m = (0.6, 1), y = 0.6·2 + 1·1 + 0.5·1 = 2.7,
    error² 1.69; draw 2 r = (0.6, 0.1), r_Δ = 0: m = (0.8, 1), y = 2.6, error² 1.96; mean 1.825.
    layerwise (one layer, S = 2): r = (0, 0), r_Δ = 1: y = 0.5·2 + 1 + 1 = 3, error² 1;
    r = (1, 1), r_Δ = 0.5: y = 2 + 1 + 0.5 = 3.5, error² 0.25; mean over layers and samples 0.625.
    importance minimality, p = 1: 0.5 + 1.005 = 1.505."""
    cfg = SPDConfig(C=2, n_mask_samples=2, stochastic_recon_coeff=2.0, stochastic_recon_layerwise_coeff=3.0,
                    importance_minimality_coeff=0.1, importance_minimality_eps=0.0, faithfulness_coeff=0.5,
                    faithfulness_norm="entries")  # fmt: skip
    method, cm = _one_matrix(cfg)
    queue = _Queue([[[0.2, 0.7]], [0.5], [[0.6, 0.1]], [0.0], [[0.0, 0.0]], [1.0], [[1.0, 1.0]], [0.5]])
    monkeypatch.setattr(spd_module, "rand_rows", queue)
    terms = method.loss_terms(cm, torch.tensor([[2.0, 1.0]]), 0)
    assert not queue.values  # every draw used: S = 2 for each stochastic loss, a Δ-mask with each
    assert terms["stochastic_recon"].item() == pytest.approx(1.825, rel=1e-6)
    assert terms["stochastic_recon_layerwise"].item() == pytest.approx(0.625, rel=1e-6)
    assert terms["importance_minimality"].item() == pytest.approx(1.505, rel=1e-6)
    assert terms["faithfulness"].item() == pytest.approx(0.5, rel=1e-6)  # ‖Δ‖² = 1 over N = 2 weights
    assert terms["total"].item() == pytest.approx(0.5 * 0.5 + 2 * 1.825 + 3 * 0.625 + 0.1 * 1.505, rel=1e-6)
    assert terms["l0"].item() == 2.0  # both g > τ = 0.1


def test_without_the_delta_component_the_masks_scale_the_components_alone(monkeypatch):
    """The same draws as above without Δ: y = 2.2 and 2.6, errors² 3.24 and 1.96 (mean 2.6). Draws of 0 and 1
    (what binomial sampling gives): r = (1, 0): m = (1, 1), y = 2 + 1 = 3, error² 1; r = (0, 1): error² 4."""
    cfg = SPDConfig(C=2, n_mask_samples=2, delta_component=False, faithfulness_coeff=1.0,
                    stochastic_recon_layerwise_coeff=None, importance_minimality_coeff=None)  # fmt: skip
    method, cm = _one_matrix(cfg)
    monkeypatch.setattr(spd_module, "rand_rows", _Queue([[[0.2, 0.7]], [[0.6, 0.1]]]))
    assert method.loss_terms(cm, torch.tensor([[2.0, 1.0]]), 0)["stochastic_recon"].item() == pytest.approx(2.6, rel=1e-6)
    monkeypatch.setattr(spd_module, "rand_rows", _Queue([[[1.0, 0.0]], [[0.0, 1.0]]]))
    # r = (0, 1): m = (0.5, 1), y = 1 + 1 = 2, error² 4; mean of 1 and 4
    assert method.loss_terms(cm, torch.tensor([[2.0, 1.0]]), 0)["stochastic_recon"].item() == pytest.approx(2.5, rel=1e-6)


def test_importance_minimality_hand_worked_with_p_eps_and_annealing():
    """g⁺ = (0.5, 1.005) on every row. p = 2, ε = 0.5: 1² + 1.505² = 3.265025. p annealed from 2 to 1 over
    a 10-step run: p(5) = 1.5. The decay from half the run on scales step 8 of 11 (frac 0.8) by 0.4."""
    x = torch.tensor([[2.0, 1.0], [1.0, -1.0]])
    method, cm = _one_matrix(SPDConfig(C=2, pnorm=2.0, importance_minimality_eps=0.5))
    assert method.loss_terms(cm, x, 0)["importance_minimality"].item() == pytest.approx(3.265025, rel=1e-6)
    cfg = SPDConfig(C=2, steps=10, pnorm=2.0, pnorm_final=1.0, importance_minimality_eps=0.0)
    method, cm = _one_matrix(cfg)
    assert annealed_p(cfg, 5) == 1.5
    assert method.loss_terms(cm, x, 5)["importance_minimality"].item() == pytest.approx(0.5**1.5 + 1.005**1.5, rel=1e-6)
    cfg = SPDConfig(C=2, steps=11, importance_minimality_decay_start_frac=0.5, importance_minimality_eps=0.0)
    method, cm = _one_matrix(cfg)
    assert minimality_scale(cfg, 8) == pytest.approx(0.4)
    assert method.loss_terms(cm, x, 8)["importance_minimality"].item() == pytest.approx(0.4 * 1.505, rel=1e-6)
    # frequency term β = 1: each subcomponent's mean times (1 + log2(1 + its sum over the 2 rows))
    method, cm = _one_matrix(SPDConfig(C=2, importance_minimality_beta=1.0, importance_minimality_eps=0.0))
    expected = 0.5 * (1 + math.log2(2.0)) + 1.005 * (1 + math.log2(3.01))
    assert method.loss_terms(cm, x, 0)["importance_minimality"].item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------- a two-layer MLP against a plain re-implementation


def _mlp_setup(cfg: SPDConfig):
    """Linear(3, 4) → ReLU → Linear(4, 2), three subcomponents per matrix; the CI functions' output biases
    moved so that the causal importances fall below 0, inside (0, 1) and above 1 on the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    method = method_for(cfg)
    cm = method.build(model, ["0", "2"])
    with torch.no_grad():
        for n in cm.layer_names:
            _ci_params(cm, n)["b2"].add_(torch.tensor([[0.4], [0.8], [1.3]]))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) * 2
    return method, cm, model, x


def _reference(cm, model, x: Tensor, cfg: SPDConfig, draws: list[Tensor], step: int) -> dict[str, float]:
    """Every SPD term of one step, written out (the draws in the order the step asks for them: per mask
    sample and per layer in module order, the subcomponents' r, then r_Δ when there is a Δ-component;
    first for stochastic_recon, then for the layerwise loss)."""
    names = ["0", "2"]
    lins = {"0": model[0], "2": model[2]}
    draws = list(draws)
    with torch.no_grad():
        a0 = x
        h0 = a0 @ lins["0"].weight.T + lins["0"].bias
        a2 = torch.relu(h0)
        target = a2 @ lins["2"].weight.T + lins["2"].bias
        inputs = {"0": a0, "2": a2}
        pre = {n: _pre(cm, n, inputs[n]) for n in names}
        g = {n: pre[n].clamp(0, 1) for n in names}
        g_up = {n: torch.where(pre[n] > 1, 1 + cfg.leaky_alpha * (pre[n] - 1), pre[n].clamp(0, 1)) for n in names}

        def forward(masked: dict[str, tuple[Tensor, Tensor | None]]) -> Tensor:
            h = x
            for i, n in enumerate(names):
                lin = lins[n]
                if n in masked:
                    U, V = _uv(cm, n)
                    h = _masked_linear(h, lin.weight, lin.bias, U, V, *masked[n])
                else:
                    h = h @ lin.weight.T + lin.bias
                if i == 0:
                    h = torch.relu(h)
            return h

        def draw_masks() -> dict[str, tuple[Tensor, Tensor | None]]:
            out = {}
            for n in names:
                r = draws.pop(0)
                r_delta = draws.pop(0) if cfg.delta_component else None
                out[n] = (g[n] + (1 - g[n]) * r, r_delta)
            return out

        S = cfg.n_mask_samples
        kind = "mse" if cfg.output_loss is None else cfg.output_loss.value  # unset: MSE (Method.__init__)
        terms: dict[str, float] = {}
        if cfg.coefficient("faithfulness"):
            sq = {n: ((lins[n].weight - _uv(cm, n)[0].T @ _uv(cm, n)[1]) ** 2).sum() for n in names}
            if cfg.faithfulness_norm.value == "relative":  # the default: each matrix's share of its own ‖W‖², averaged
                terms["faithfulness"] = float(sum(sq[n] / (lins[n].weight ** 2).sum() for n in names) / len(names))
            else:
                terms["faithfulness"] = float(sum(sq.values()) / sum(lins[n].weight.numel() for n in names))
        if cfg.coefficient("stochastic_recon"):
            terms["stochastic_recon"] = float(sum(_distance(target, forward(draw_masks()), kind) for _ in range(S)) / S)
        if cfg.coefficient("stochastic_recon_layerwise"):
            total = 0.0
            for _ in range(S):
                masks = draw_masks()
                total += sum(float(_distance(target, forward({n: masks[n]}), kind)) for n in names)
            terms["stochastic_recon_layerwise"] = total / (len(names) * S)
        if cfg.coefficient("ci_masked_recon"):
            terms["ci_masked_recon"] = float(_distance(target, forward({n: (g[n], None) for n in names}), kind))
        if cfg.coefficient("importance_minimality"):
            p, eps, beta = annealed_p(cfg, step), cfg.importance_minimality_eps, cfg.importance_minimality_beta
            total = 0.0
            for n in names:
                powered = (g_up[n] + eps) ** p  # [B, C]
                mean, summed = powered.mean(0), powered.sum(0)
                total += float((mean * (1 + beta * torch.log2(1 + summed))).sum())
            terms["importance_minimality"] = total * minimality_scale(cfg, step)
        terms["l0"] = float(sum((g[n] > cfg.ci_threshold).float().sum(-1).mean() for n in names))
        assert not draws, f"{len(draws)} draws left over"
        terms["_g_inside"] = float(sum(((g[n] > 0) & (g[n] < 1)).sum() for n in names))
        terms["_g_clamped"] = float(sum(((pre[n] < 0) | (pre[n] > 1)).sum() for n in names))
    return terms


COEFFS = {"faithfulness_coeff": 0.7, "stochastic_recon_coeff": 1.3, "stochastic_recon_layerwise_coeff": 0.6,
          "ci_masked_recon_coeff": 0.9, "importance_minimality_coeff": 0.05}  # fmt: skip


def _check_against_reference(monkeypatch, cfg: SPDConfig, step: int = 0) -> list[tuple[tuple[int, ...], bool, Tensor]]:
    method, cm, model, x = _mlp_setup(cfg)
    recorder = _Recorder()
    monkeypatch.setattr(spd_module, "rand_rows", recorder)
    torch.manual_seed(5)
    terms = method.loss_terms(cm, x, step)
    ref = _reference(cm, model, x, cfg, [r for _, _, r in recorder.draws], step)
    assert ref.pop("_g_inside") >= 4 and ref.pop("_g_clamped") >= 4  # the batch exercises every part of the squashing
    for name, value in ref.items():
        assert terms[name].item() == pytest.approx(value, rel=2e-5, abs=1e-9), name
    expected_total = sum(cfg.coefficient(n) * v for n, v in ref.items() if n != "l0")
    assert terms["total"].item() == pytest.approx(expected_total, rel=2e-5)
    assert set(terms) == {"total", "l0", *(n for n in ref if n != "l0")}
    # the draws asked for: per sample and layer the subcomponents' r [B, C], then r_Δ [B]
    per_layer = [(6, 3), (6,)] if cfg.delta_component else [(6, 3)]
    assert [s for s, _, _ in recorder.draws] == per_layer * 2 * cfg.n_mask_samples * 2
    return recorder.draws


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("output_loss", ["mse", "kl"])
@pytest.mark.parametrize("delta_component", [True, False])
def test_every_spd_term_matches_the_written_out_computation(monkeypatch, S, output_loss, delta_component):
    """stochastic recon averaged over S samples, layerwise averaged over layers and samples, Δ under
    its own mask, KL of softmaxes, CI-masked recon, faithfulness (relative per matrix; over all N weights
    with S = 3), minimality."""
    cfg = SPDConfig(C=3, ci_hidden=[2], n_mask_samples=S, output_loss=output_loss, delta_component=delta_component,
                    faithfulness_norm="entries" if S == 3 else "relative", **COEFFS)  # fmt: skip
    draws = _check_against_reference(monkeypatch, cfg)
    assert not any(binary for _, binary, _ in draws)
    assert all(bool(((r > 0) & (r < 1)).all()) for _, _, r in draws)  # continuous r ~ U(0, 1)


def test_binomial_sampling_draws_each_r_from_zero_and_one(monkeypatch):
    """sampling=binomial: the subcomponents' r are 0 or 1 (both occur), so each mask is g or 1."""
    cfg = SPDConfig(C=3, ci_hidden=[2], n_mask_samples=2, sampling="binomial", **COEFFS)
    draws = _check_against_reference(monkeypatch, cfg)
    masks = torch.cat([r.flatten() for shape, _, r in draws if len(shape) == 2])
    assert [binary for shape, binary, _ in draws if len(shape) == 2] == [True] * 8
    assert set(masks.tolist()) == {0.0, 1.0}
    # and the real draw function honours it: over many rows about half are ones
    r = apd.distributed.rand_rows(torch.empty(4000, 3), binary=True)
    assert set(r.unique().tolist()) == {0.0, 1.0} and abs(r.mean().item() - 0.5) < 0.03


def test_importance_minimality_and_its_schedules_match_the_written_out_computation(monkeypatch):
    """p annealed 2 → 0.5 (at step 7 of 11), ε 0.01, the frequency term β = 0.5, the decay from 0.3 of the
    run on (step 7: scale 1 − (0.7 − 0.3)/0.7), the upper-leaky slope α = 0.2 above 1."""
    cfg = SPDConfig(C=3, ci_hidden=[2], steps=11, leaky_alpha=0.2, pnorm=2.0, pnorm_final=0.5, pnorm_anneal_start_frac=0.2,
                    pnorm_anneal_end_frac=0.8, importance_minimality_eps=0.01, importance_minimality_beta=0.5,
                    importance_minimality_decay_start_frac=0.3, **COEFFS)  # fmt: skip
    assert annealed_p(cfg, 7) == pytest.approx(2.0 - 1.5 * (7 / 11 - 0.2) / 0.6)
    assert minimality_scale(cfg, 7) == pytest.approx(1 - (0.7 - 0.3) / 0.7)
    _check_against_reference(monkeypatch, cfg, step=7)


def test_gradients_of_the_total_match_the_written_out_computation(monkeypatch):
    """The gradient reaches U, V and the CI functions as the written-out total's does (same draws)."""
    cfg = SPDConfig(C=3, ci_hidden=[2], n_mask_samples=2, **COEFFS)
    method, cm, model, x = _mlp_setup(cfg)
    recorder = _Recorder()
    monkeypatch.setattr(spd_module, "rand_rows", recorder)
    params = list(cm.trainable_parameters().values())
    total = method.loss_terms(cm, x, 0)["total"]
    got = torch.autograd.grad(total, params)

    draws = [r for _, _, r in recorder.draws]
    with torch.enable_grad():
        ref_total = _reference_total_with_grad(cm, model, x, cfg, draws)
    want = torch.autograd.grad(ref_total, params)
    for name, a, b in zip(cm.trainable_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def _reference_total_with_grad(cm, model, x, cfg, draws):
    """The written-out total of ``_reference`` kept differentiable (the squashing's straight-through
    gradient: the lower one passes gradient inside [0, 1] and, below 0, α times the downward-pushing part)."""
    names = ["0", "2"]
    lins = {"0": model[0], "2": model[2]}
    draws = list(draws)
    alpha = cfg.leaky_alpha
    a2 = torch.relu(x @ lins["0"].weight.T + lins["0"].bias)
    target = a2 @ lins["2"].weight.T + lins["2"].bias
    pre = {"0": _pre(cm, "0", x), "2": _pre(cm, "2", a2)}
    for n in names:  # every pre-activation is away from 0 and 1, where the squashings' subgradients are chosen
        assert bool(((pre[n] - 0).abs() > 1e-4).all() and ((pre[n] - 1).abs() > 1e-4).all())
    g = {n: _LowerLeaky.apply(pre[n], alpha) for n in names}
    g_up = {n: torch.where(pre[n] > 1, 1 + alpha * (pre[n] - 1), pre[n].clamp(0, 1)) for n in names}

    def forward(masked):
        h = x
        for i, n in enumerate(names):
            lin = lins[n]
            h = _masked_linear(h, lin.weight, lin.bias, *_uv(cm, n), *masked[n]) if n in masked else h @ lin.weight.T + lin.bias
            if i == 0:
                h = torch.relu(h)
        return h

    def draw_masks():
        out = {}
        for n in names:
            r = draws.pop(0)
            out[n] = (g[n] + (1 - g[n]) * r, draws.pop(0))
        return out

    S = cfg.n_mask_samples
    faith = sum(((lins[n].weight - _uv(cm, n)[0].T @ _uv(cm, n)[1]) ** 2).sum() / (lins[n].weight ** 2).sum() for n in names) / 2
    recon = sum(_distance(target, forward(draw_masks()), "mse") for _ in range(S)) / S
    layerwise = 0
    for _ in range(S):
        masks = draw_masks()
        layerwise = layerwise + sum(_distance(target, forward({n: masks[n]}), "mse") for n in names)
    layerwise = layerwise / (2 * S)
    ci_recon = _distance(target, forward({n: (g[n], None) for n in names}), "mse")
    imp = sum(((g_up[n] + cfg.importance_minimality_eps) ** cfg.pnorm).mean(0).sum() for n in names)
    c = cfg.coefficient
    return (c("faithfulness") * faith + c("stochastic_recon") * recon + c("stochastic_recon_layerwise") * layerwise
            + c("ci_masked_recon") * ci_recon + c("importance_minimality") * imp)  # fmt: skip


class _LowerLeaky(torch.autograd.Function):
    """SPEC §5.2's lower-leaky hard sigmoid, written independently of the library's."""

    @staticmethod
    def forward(ctx, x, alpha):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        below = (x < 0) * torch.minimum(grad, torch.zeros_like(grad)) * ctx.alpha
        return torch.where(x < 0, below, grad * (x <= 1)), None


def test_the_step_asks_for_one_r_per_row_and_subcomponent_and_one_r_delta_per_row():
    """SPDStep.stochastic_masks with the real draws: m = g + (1 − g) r lies in [g, 1]; r_Δ in [0, 1)."""
    cfg = SPDConfig(C=3, ci_hidden=[2])
    method, cm, model, x = _mlp_setup(cfg)
    ctx = method.step_context(cm, x, 0)
    assert isinstance(ctx, SPDStep)
    masks, deltas = ctx.stochastic_masks()
    for n, g in ctx.ci.items():
        assert masks[n].shape == g.shape and deltas is not None and deltas[n].shape == g.shape[:-1]
        assert bool((masks[n] >= g - 1e-7).all() and (masks[n] <= 1).all())
        r = (masks[n] - g) / (1 - g).clamp_min(1e-6)
        inside = g < 0.99
        assert r[inside].std().item() > 0.1  # a random r, not a constant
        assert bool(((deltas[n] >= 0) & (deltas[n] < 1)).all()) and deltas[n].std().item() > 0.1


# ---------------------------------------------------------------------------------------------- the warm-up


def _adamw_by_hand(params: list[Tensor], grads_of, steps: int, lr: float, wd: float) -> None:
    """AdamW (β 0.9, 0.999, ε 1e-8, decoupled weight decay) written out."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = grads_of(params)
        with torch.no_grad():
            for p, g, m_i, v_i in zip(params, grads, m, v):
                p.mul_(1 - lr * wd)
                m_i.mul_(0.9).add_(0.1 * g)
                v_i.mul_(0.999).add_(0.001 * g * g)
                p.sub_(lr * (m_i / (1 - 0.9**t)) / ((v_i / (1 - 0.999**t)).sqrt() + 1e-8))


def test_the_faithfulness_warmup_is_adamw_on_the_faithfulness_loss_alone():
    """K AdamW steps (the configured lr and weight decay) on Σ_l ‖W_l − Σ_c U_c V_cᵀ‖² / N, N counting the
    weights of every matrix; with a leading instance dimension each instance is its own run."""
    from apd.methods import Factors

    cfg = SPDConfig(C=3, faithfulness_warmup_steps=7, faithfulness_warmup_lr=0.05, faithfulness_warmup_weight_decay=0.2,
                    faithfulness_warmup_tol=None)  # the AdamW part alone (the least-squares finish: below)
    method, cm, model, x = _mlp_setup(cfg)
    W = cm.target_weights()
    names = list(W)
    start = {n: (cm.layers[n].A.detach().clone(), cm.layers[n].B.detach().clone()) for n in names}
    N = sum(w.numel() for w in W.values())
    assert N == 12 + 8

    def grads_of(params):
        params = [p.detach().requires_grad_() for p in params]
        loss = sum(((W[n] - torch.einsum("com,cmi->oi", params[2 * i + 1], params[2 * i])) ** 2).sum()
                   for i, n in enumerate(names)) / N  # fmt: skip
        return torch.autograd.grad(loss, params)

    expected = [t.clone() for n in names for t in start[n]]
    _adamw_by_hand(expected, grads_of, 7, 0.05, 0.2)

    factors = Factors(A={n: cm.layers[n].A for n in names}, B={n: cm.layers[n].B for n in names})
    method.warmup(factors, W)
    for i, n in enumerate(names):
        torch.testing.assert_close(cm.layers[n].A.detach(), expected[2 * i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cm.layers[n].B.detach(), expected[2 * i + 1], rtol=1e-5, atol=1e-6)
        assert cm.layers[n].A.grad is None and cm.layers[n].B.grad is None

    # two instances stacked: each moves as it would alone
    stacked = Factors(A={n: torch.stack([start[n][0], 2 * start[n][0]]).requires_grad_() for n in names},
                      B={n: torch.stack([start[n][1], -start[n][1]]).requires_grad_() for n in names})  # fmt: skip
    method.warmup(stacked, W)
    for i, n in enumerate(names):
        torch.testing.assert_close(stacked.A[n][0].detach(), expected[2 * i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked.B[n][0].detach(), expected[2 * i + 1], rtol=1e-5, atol=1e-6)
    second = [t.clone() for n in names for t in (2 * start[n][0], -start[n][1])]
    _adamw_by_hand(second, grads_of, 7, 0.05, 0.2)
    for i, n in enumerate(names):
        torch.testing.assert_close(stacked.A[n][1].detach(), second[2 * i], rtol=1e-5, atol=1e-6)

    # no warm-up steps: nothing moves
    idle = Factors(A={n: start[n][0].clone().requires_grad_() for n in names}, B={n: start[n][1].clone().requires_grad_() for n in names})
    method_for(SPDConfig(C=3, faithfulness_warmup_steps=0, faithfulness_warmup_tol=None)).warmup(idle, W)
    assert all(torch.equal(idle.A[n], start[n][0]) for n in names)


# ------------------------------------------------------------------------- squashing at its edges, defaults, C = 1


def test_the_hard_sigmoids_at_exactly_0_and_1_and_with_their_default_slope():
    """The subgradients chosen at the kinks (at 0 the lower one leaks only upwards and the upper one
    passes the gradient; at 1 both pass it), and α = 0.01 by default; the fused pair's backward is
    the sum of the two separate ones' (bug (e): it used to drop the upper one's at 0)."""
    from apd.methods.spd import leaky_hard_sigmoids, lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid

    x = torch.tensor([0.0, 0.0, 1.0, -2.0, 3.0], requires_grad=True)
    g = torch.tensor([3.0, -2.0, 3.0, -1.0, 1.0])
    (lower_leaky_hard_sigmoid(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, -0.02, 3.0, -0.01, 0.0]))
    x.grad = None
    up = upper_leaky_hard_sigmoid(x)
    torch.testing.assert_close(up.detach(), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.02]))
    (up * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([3.0, -2.0, 3.0, 0.0, 0.01]))
    x.grad = None
    lower, upper = leaky_hard_sigmoids(x)
    torch.testing.assert_close(upper.detach(), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.02]))
    torch.autograd.backward([lower, upper], [g, 2 * g])
    # at 0: the lower one's upward leak (g < 0) plus the upper one's 2g; at 1: both (3 + 6); below 0: the leak; above 1: α·(2g)
    torch.testing.assert_close(x.grad, torch.tensor([6.0, -4.02, 9.0, -0.01, 0.02]))


def test_the_minimality_decay_reaches_zero_at_the_last_step_of_a_two_step_run():
    cfg = SPDConfig(steps=2, importance_minimality_decay_start_frac=0.0)
    assert [minimality_scale(cfg, s) for s in (0, 1)] == [1.0, 0.0]
    assert minimality_scale(SPDConfig(steps=1, importance_minimality_decay_start_frac=0.0), 0) == 1.0


def test_one_subcomponent_per_matrix_hand_worked(monkeypatch):
    """C = 1: W = [[1, 2]], U V_ᵀ = [[1, 1]], Δ = [[0, 1]], g = 0.5; x = (2, 1), target 4. r = 0.5, r_Δ = 1:
    m = 0.75, y = 0.75·3 + 1·1 = 3.25, error² 0.5625."""
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    cfg = SPDConfig(C=1, stochastic_recon_layerwise_coeff=None, importance_minimality_coeff=None)
    method = method_for(cfg)
    cm = method.build(nn.Sequential(lin), ["0"])
    with torch.no_grad():
        cm.layers["0"].A.copy_(torch.tensor([[[1.0, 1.0]]]))
        cm.layers["0"].B.copy_(torch.tensor([[[1.0]]]))
        for k, v in _ci_params(cm, "0").items():
            v.fill_(0.5 if k == "b2" else 0.0)
    monkeypatch.setattr(spd_module, "rand_rows", _Queue([[[0.5]], [1.0]]))
    assert method.loss_terms(cm, torch.tensor([[2.0, 1.0]]), 0)["stochastic_recon"].item() == pytest.approx(0.5625, rel=1e-6)


def test_one_warmup_step_moves_the_factors():
    from apd.methods import Factors

    cfg = SPDConfig(C=3, faithfulness_warmup_steps=1, faithfulness_warmup_tol=None)
    method, cm, model, x = _mlp_setup(cfg)
    before = cm.layers["0"].A.detach().clone()
    method.warmup(Factors(A={n: cm.layers[n].A for n in ("0", "2")}, B={n: cm.layers[n].B for n in ("0", "2")}), cm.target_weights())
    # AdamW's first step moves every entry by about lr (1e-2) against its gradient's sign, plus the decay
    assert (cm.layers["0"].A.detach() - before).abs().min().item() > 5e-3


def test_the_least_squares_finish_brings_every_instance_within_tol_and_leaves_fitted_ones_alone():
    """least_squares_fit on a rank-3 W with C = 4 rank-one pieces: an instance far off ends within tol,
    an instance already within tol is untouched; relative_error is ‖W − Σ B A‖ / ‖W‖ by hand."""
    from apd.methods.spd import least_squares_fit, relative_error

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 3, generator=g) @ torch.randn(3, 5, generator=g)
    A = torch.randn(2, 4, 1, 5, generator=g) * 0.1
    B = torch.randn(2, 4, 6, 1, generator=g) * 0.1
    # instance 1: an exact rank-3 factorisation (plus a zero piece), slightly perturbed
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B[1, :3, :, 0], A[1, :3, 0, :] = (U[:, :3] * S[:3]).T, Vh[:3]
    B[1, 3], A[1, 3] = 0.0, 0.0
    A[1, 0, 0, 0] += 1e-4
    by_hand = torch.stack([(W - torch.einsum("com,cmi->oi", B[i], A[i])).norm() / W.norm() for i in range(2)])
    torch.testing.assert_close(relative_error(A, B, W), by_hand)
    assert by_hand[0] > 0.5 and by_hand[1] < 1e-3
    A1, B1 = A[1].clone(), B[1].clone()
    err = least_squares_fit(A, B, W, tol=1e-3)
    assert err[0] <= 1e-3 and torch.equal(A[1], A1) and torch.equal(B[1], B1)
    torch.testing.assert_close(relative_error(A, B, W), err)
    # damped: the fitted pieces stay of the weight's size instead of large ones that cancel
    assert torch.einsum("com,cmi->coi", B[0], A[0]).flatten(1).norm(dim=1).max() < 3 * W.norm()


def test_the_warmup_warns_when_C_is_below_a_matrix_rank():
    from apd.methods import Factors

    torch.manual_seed(0)
    method = method_for(SPDConfig(C=1, faithfulness_warmup_steps=5))
    cm = method.build(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), ["0", "2"])  # ranks 3 and 2
    names = list(cm.target_weights())
    with pytest.warns(UserWarning, match=r"C is below the rank of .*set C \(or C_per_module\)"):
        method.warmup(Factors(A={n: cm.layers[n].A for n in names}, B={n: cm.layers[n].B for n in names}), cm.target_weights())


# ------------------------------------------------------------------------- data-parallel importance minimality


def _minimality_rank(rank: int, world: int, port: int, g_full: Tensor, out: str) -> None:
    import os

    import torch.distributed as dist

    from apd.losses.importance_minimality import importance_minimality_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = g_full.chunk(world)[rank].clone().requires_grad_()
        loss = importance_minimality_loss({"a": rows, "b": rows[:, :2] * 0.5}, p=1.5, eps=0.01, beta=0.7)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": rows.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_minimality_frequency_term_over_two_processes_is_the_global_batchs(tmp_path):
    """Two gloo processes, each with half the rows: each gets the whole batch's loss (the frequency term's
    sums are global), and its rows' gradient is world-size times their share of the one-process gradient
    (so the averaged parameter gradient is one process's)."""
    import socket

    import torch.multiprocessing as mp

    from apd.losses.importance_minimality import importance_minimality_loss

    g_full = torch.rand(6, 3, generator=torch.Generator().manual_seed(0)) * 1.2  # 6 rows, C = 3 (some above 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_minimality_rank, args=(2, port, g_full, str(tmp_path / "r")), nprocs=2, join=True)
    rows = g_full.clone().requires_grad_()
    full = importance_minimality_loss({"a": rows, "b": rows[:, :2] * 0.5}, p=1.5, eps=0.01, beta=0.7)
    full.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"r.{rank}")
        assert got["loss"].item() == pytest.approx(full.item(), rel=1e-6)
        torch.testing.assert_close(got["grad"], 2 * rows.grad.chunk(2)[rank], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- evaluation


def test_eval_masks_l0_and_metrics_by_hand():
    """Evaluation masks are g; L0 counts g > τ per row and layer; the thresholded model runs with
    masks 1[g > τ]; ci_mean, alive subcomponents (g > τ somewhere), saturated and dead layers."""
    cfg = SPDConfig(C=3, ci_hidden=[2], ci_threshold=0.3)
    method, cm, model, x = _mlp_setup(cfg)
    with torch.no_grad():
        a2 = torch.relu(model[0](x))
        g = {"0": _pre(cm, "0", x).clamp(0, 1), "2": _pre(cm, "2", a2).clamp(0, 1)}
    masks = method.eval_masks(cm, x)
    for n in g:
        torch.testing.assert_close(masks[n], g[n])
        assert not masks[n].requires_grad
    l0 = method.mask_l0(masks)
    per = {n: (g[n] > 0.3).float().sum(-1).mean().item() for n in g}
    assert l0 == pytest.approx({"l0": per["0"] + per["2"], "l0/0": per["0"], "l0/2": per["2"]})
    target = model(x)
    metrics = method.eval_metrics(cm, x, masks, target)
    with torch.no_grad():
        hard = {n: (g[n] > 0.3).float() for n in g}
        h = torch.relu(_masked_linear(x, model[0].weight, model[0].bias, *_uv(cm, "0"), hard["0"], None))
        out = _masked_linear(h, model[2].weight, model[2].bias, *_uv(cm, "2"), hard["2"], None)
    assert metrics["ci_thresholded_recon_mse"] == pytest.approx(((out - target) ** 2).mean().item(), rel=1e-5)
    for n in g:
        assert metrics[f"ci_mean/{n}"] == pytest.approx(g[n].mean().item(), rel=1e-6)
        assert metrics[f"n_alive/{n}"] == float((g[n] > 0.3).any(0).sum())
    assert all(0 < hard[n].mean() < 1 for n in hard)  # the threshold keeps some subcomponents and drops others
    assert metrics["ci_saturated_layers"] == [] and metrics["ci_dead_layers"] == []
    assert method.run_warnings(metrics) == []


def test_saturated_and_dead_layers_are_reported_with_the_fix():
    cfg = SPDConfig(C=3, ci_hidden=[2])
    method, cm, model, x = _mlp_setup(cfg)
    with torch.no_grad():
        _ci_params(cm, "0")["b2"].fill_(50.0)  # every g = 1 on layer 0
        _ci_params(cm, "2")["b2"].fill_(-50.0)  # every g = 0 on layer 2
    masks = method.eval_masks(cm, x)
    metrics = method.eval_metrics(cm, x, masks, model(x))
    assert metrics["ci_saturated_layers"] == ["0"] and metrics["ci_dead_layers"] == ["2"]
    assert metrics["n_alive/0"] == 3.0 and metrics["n_alive/2"] == 0.0
    assert metrics["ci_mean/0"] == 1.0 and metrics["ci_mean/2"] == 0.0
    assert method.run_warnings(metrics) == [
        "the causal importances of ['0'] saturate (g > τ on over 90% of inputs and subcomponents): "
        "importance_minimality_coeff is too low for them, or C too small; raise the coefficient (x3) or C",
        "every subcomponent of ['2'] is inactive on every input (g <= τ): importance_minimality_coeff is too high; lower it (/3)",
    ]
    # over 90% of (input, subcomponent) pairs on: saturated (28 of 30); exactly 90% (27 of 30): not
    on = torch.ones(10, 3)
    on[0, :2] = 0.0
    xs = x[:1].expand(10, 3)
    assert method.eval_metrics(cm, xs, {"0": on, "2": 1 - on}, model(xs))["ci_saturated_layers"] == ["0"]
    on[1, 0] = 0.0
    assert method.eval_metrics(cm, xs, {"0": on, "2": 1 - on}, model(xs))["ci_saturated_layers"] == []


def test_l0_counts_strictly_above_the_threshold():
    """g exactly τ is not active: g = (0.1, 1) at τ = 0.1 is one active subcomponent."""
    method, cm = _one_matrix(SPDConfig(C=2))
    with torch.no_grad():
        _ci_params(cm, "0")["b2"].copy_(torch.tensor([[0.1], [1.5]]))
    x = torch.tensor([[2.0, 1.0]])
    terms = method.loss_terms(cm, x, 0)
    assert terms["l0"].item() == 1.0
    masks = method.eval_masks(cm, x)
    assert method.mask_l0(masks)["l0"] == 1.0
    metrics = method.eval_metrics(cm, x, masks, cm(x))
    # thresholded: only subcomponent 1 (U_1 V_1ᵀ = [[0, 1]]): y = 1 against the target 4
    assert metrics["n_alive/0"] == 1.0 and metrics["ci_thresholded_recon_mse"] == pytest.approx(9.0)


def test_evaluation_of_a_token_model_counts_every_position():
    """[B, T, C] masks with T != C: L0 and alive subcomponents over every (sample, position) row."""
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    method = method_for(SPDConfig(C=3, ci_fn="shared_mlp", ci_threshold=0.2))
    cm = method.build(emb, ["0", "1"])
    x = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(0))
    g = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(1))
    g[..., 2] = 0.1  # subcomponent 2 never above τ
    masks = {"0": g, "1": g.flip(0)}
    per = (g > 0.2).float().sum(-1).mean().item()
    assert method.mask_l0(masks) == pytest.approx({"l0": 2 * per, "l0/0": per, "l0/1": per})
    metrics = method.eval_metrics(cm, x, masks, emb(x))
    assert metrics["n_alive/0"] == 2.0 and metrics["n_alive/1"] == 2.0


# ----------------------------------------------------------------------------------- building and config


def test_build_draws_kaiming_factors_and_ci_functions_from_the_seed():
    """A ~ N(0, 1/d_in)·init_scale, B ~ N(0, 1/C)·init_scale from a generator seeded with the seed (A then
    B, matrix by matrix); the CI functions from their own stream seeded with seed + 1_000_003."""
    from apd.ci_functions import MLPCI

    cfg = SPDConfig(C=3, ci_hidden=[2], init_scale=2.0)
    method = method_for(cfg)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cm = method.build(model, ["0", "2"], seed=11)
    gen = torch.Generator().manual_seed(11)
    for n, (d_out, d_in) in (("0", (4, 3)), ("2", (2, 4))):
        A = torch.randn(3, 1, d_in, generator=gen) * (2.0 / math.sqrt(d_in))
        B = torch.randn(3, d_out, 1, generator=gen) * (2.0 / math.sqrt(3))
        torch.testing.assert_close(cm.layers[n].A.detach(), A)
        torch.testing.assert_close(cm.layers[n].B.detach(), B)
    ci_gen = torch.Generator().manual_seed(11 + 1_000_003)
    for n in ("0", "2"):
        expected = MLPCI(3, [2], ci_gen)
        for (k, p), q in zip(ci_functions(cm).fn(n).named_parameters(), expected.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), msg=k)
    default_seed = method_for(SPDConfig(C=3, ci_hidden=[2], init_scale=2.0, seed=11)).build(model, ["0", "2"])
    torch.testing.assert_close(default_seed.layers["2"].B, cm.layers["2"].B)


def test_build_passes_a_declared_tie_and_sizes_the_second_uses_ci_function():
    """tied={'dec': 'enc'}: one matrix used twice; the second use's vector CI function reads its input
    of width d_out of the source, and the step runs."""
    enc = nn.Linear(4, 2, bias=False)
    dec = nn.Linear(2, 4)
    with torch.no_grad():
        dec.weight.copy_(enc.weight.T)
    model = nn.Sequential(enc, nn.ReLU(), dec)
    cfg = SPDConfig(C=3, ci_fn="shared_mlp", ci_hidden=[5])
    method = method_for(cfg)
    cm = method.build(model, ["0", "2"], tied={"2": "0"})
    assert cm.tied_names == {"2": "0"} and cm.matrix_names == ["0"]
    assert ci_functions(cm).fn("2").layers.net[0].weight.shape == (5, 2) and ci_functions(cm).fn("0").layers.net[0].weight.shape == (5, 4)
    terms = method.loss_terms(cm, torch.randn(8, 4), 0)
    assert torch.isfinite(terms["total"])


def test_compile_ci_wraps_each_ci_function_in_torch_compile():
    """Checked without compiling (the compiled run itself is a slow test): the forward is a dynamo wrapper."""
    cm = method_for(SPDConfig(C=2, compile_ci=True)).build(nn.Sequential(nn.Linear(3, 2)), ["0"])
    assert callable(ci_functions(cm).fn("0").forward) and hasattr(ci_functions(cm).fn("0").forward, "_torchdynamo_orig_callable")


EDGES_OK = [dict(C=1), dict(C_per_module={"0": 1}), dict(ci_hidden=[1]), dict(init_scale=1e-6), dict(leaky_alpha=0.0),
            dict(pnorm=2.0), dict(pnorm_final=2.0), dict(pnorm_anneal_start_frac=0.5, pnorm_anneal_end_frac=0.5),
            dict(pnorm_anneal_end_frac=1.0), dict(importance_minimality_decay_start_frac=1.0),
            dict(importance_minimality_decay_start_frac=0.0), dict(importance_minimality_eps=0.0),
            dict(importance_minimality_beta=0.0), dict(n_mask_samples=1), dict(faithfulness_warmup_steps=0),
            dict(faithfulness_warmup_lr=1e-9), dict(faithfulness_warmup_weight_decay=0.0), dict(ci_threshold=0.0),
            dict(stochastic_recon_coeff=None, ci_masked_recon_coeff=None),  # layerwise alone
            dict(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None, ci_masked_recon_coeff=1.0),
            dict(delta_component=False, faithfulness_coeff=1e-3)]  # fmt: skip


@pytest.mark.parametrize("kwargs", EDGES_OK, ids=lambda k: ",".join(k))
def test_config_accepts_the_edges_of_every_range(kwargs):
    SPDConfig(**kwargs)


EDGES_BAD = [  # (config, its whole error message)
    (dict(C_per_module={"0": 1.5}), "SPDConfig.C_per_module['0']=1.5: every matrix needs a whole number of subcomponents >= 1"),
    (dict(C_per_module={"0": True}), "SPDConfig.C_per_module['0']=True: every matrix needs a whole number of subcomponents >= 1"),
    (dict(ci_hidden=[4, 0]), "SPDConfig.ci_hidden=[4, 0]: hidden widths must be >= 1"),
    (dict(init_scale=0.0), "SPDConfig.init_scale=0.0: must be > 0"),
    (dict(leaky_alpha=1.0), "SPDConfig.leaky_alpha=1.0: must lie in [0, 1)"),
    (dict(leaky_alpha=-0.1), "SPDConfig.leaky_alpha=-0.1: must lie in [0, 1)"),
    (dict(pnorm=2.5), "SPDConfig.pnorm=2.5: p must lie in (0, 2] (the paper uses 1 or 2; LMs anneal 2 -> 0.4)"),
    (dict(pnorm_final=0.0), "SPDConfig.pnorm_final=0.0: must lie in (0, 2], or None for no annealing"),
    (dict(pnorm_final=2.5), "SPDConfig.pnorm_final=2.5: must lie in (0, 2], or None for no annealing"),
    (dict(pnorm_anneal_start_frac=0.6, pnorm_anneal_end_frac=0.5),
     "SPDConfig.pnorm_anneal_start_frac=0.6, pnorm_anneal_end_frac=0.5: need 0 <= start <= end <= 1"),
    (dict(pnorm_anneal_end_frac=1.5), "SPDConfig.pnorm_anneal_start_frac=0.0, pnorm_anneal_end_frac=1.5: need 0 <= start <= end <= 1"),
    (dict(importance_minimality_decay_start_frac=-0.1),
     "SPDConfig.importance_minimality_decay_start_frac=-0.1: must lie in [0, 1] (1: no decay)"),
    (dict(importance_minimality_eps=-1.0), "SPDConfig.importance_minimality_eps=-1.0: must be >= 0"),
    (dict(importance_minimality_beta=-1.0), "SPDConfig.importance_minimality_beta=-1.0: must be >= 0"),
    (dict(n_mask_samples=0), "SPDConfig.n_mask_samples=0: must be >= 1"),
    (dict(faithfulness_warmup_steps=-1), "SPDConfig.faithfulness_warmup_steps=-1: must be >= 0"),
    (dict(faithfulness_warmup_lr=0.0), "SPDConfig.faithfulness_warmup_lr=0.0: must be > 0"),
    (dict(faithfulness_warmup_weight_decay=-0.1), "SPDConfig.faithfulness_warmup_weight_decay=-0.1: must be >= 0"),
    (dict(ci_threshold=-0.1), "SPDConfig.ci_threshold=-0.1: τ must lie in [0, 1)"),
    (dict(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=0.0),
     "SPDConfig: every reconstruction loss is off (stochastic_recon_coeff, stochastic_recon_layerwise_coeff, "
     "ci_masked_recon_coeff, adversarial_recon_coeff); without one nothing ties the subcomponents to the target's outputs"),
    (dict(delta_component=False, faithfulness_coeff=0.0),
     "SPDConfig: delta_component=False and faithfulness_coeff off: nothing keeps Σ_c U_c V_cᵀ equal to the weights; "
     "set faithfulness_coeff (e.g. 1.0) or delta_component=True"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,message", EDGES_BAD, ids=lambda k: ",".join(k) if isinstance(k, dict) else "")
def test_config_refuses_just_outside_every_range_with_the_whole_message(kwargs, message):
    from apd import ConfigError

    with pytest.raises(ConfigError) as caught:
        SPDConfig(**kwargs)
    assert str(caught.value) == message
