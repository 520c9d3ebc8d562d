"""``apd.ci_functions.mlp_ci`` (the one-node, chunked CI MLP) against the plain nn.Module composition:
the same values and gradients at float64, on several chunkings and under ``torch.func.vmap``."""

import pytest
import torch
import torch.nn.functional as F

import apd.ci_functions as cif
from apd.ci_functions import MLPCI, mlp_ci


def _plain(v, w1, b1, w2, b2):
    """The composition the paper writes, one broadcast op at a time (what mlp_ci must equal)."""
    return (F.gelu(v.unsqueeze(-1) * w1 + b1) * w2).sum(-1) + b2


def _params(C, H, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(C, H, generator=g, dtype=dtype) * 1.5 for _ in range(3)] + [torch.randn(C, generator=g, dtype=dtype)]


@pytest.mark.parametrize("lead", [(1,), (13,), (4, 7)])
@pytest.mark.parametrize("chunk_elements", [1, 30, 1 << 17])  # one row per chunk, uneven chunks with a remainder, one chunk
def test_mlp_ci_matches_the_composition_in_value_and_gradients(lead, chunk_elements, monkeypatch):
    monkeypatch.setattr(cif, "CHUNK_ELEMENTS", chunk_elements)
    C, H = 5, 3
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(*lead, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    params = [p.requires_grad_() for p in _params(C, H)]
    out_grad = torch.randn(*lead, C, generator=g, dtype=torch.float64)
    ours = mlp_ci(v, *params)
    ref = _plain(v, *params)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [v, *params], out_grad), torch.autograd.grad(ref, [v, *params], out_grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mlp_ci_passes_gradcheck():
    C, H = 3, 2
    v = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(C, H, seed=2)]
    assert torch.autograd.gradcheck(mlp_ci, (v, *params))


def test_mlpci_module_takes_the_fused_path_on_large_inputs_with_the_same_results(monkeypatch):
    """MLPCI switches to mlp_ci from FUSED_MIN_C subcomponents and two chunks of hidden activations on; the values and parameter
    gradients are the plain module's (state_dict names unchanged: the checkpoints still load)."""
    calls = []
    real = cif.mlp_ci
    monkeypatch.setattr(cif, "mlp_ci", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cif, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(cif, "FUSED_MIN_C", 6)
    m = MLPCI(6, [4], torch.Generator().manual_seed(0)).double()
    assert list(m.state_dict()) == ["layers.net.0.W", "layers.net.0.b", "layers.net.2.W", "layers.net.2.b"]
    inner = torch.randn(9, 5, 6, 1, dtype=torch.float64, requires_grad=True)
    out = m(inner, None)
    assert calls == [1]
    ref = m.layers(inner)[..., 0]  # the plain composition of the same module
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [inner, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    calls.clear()
    m(torch.randn(2, 6, 1, dtype=torch.float64), None)  # 2·6·4 = 48 < 2·64 hidden activations: plain
    assert calls == []
    monkeypatch.setattr(cif, "FUSED_MIN_C", 7)
    m(inner, None)  # fewer subcomponents than FUSED_MIN_C: plain
    assert calls == []


def test_mlp_ci_under_vmap_with_different_randomness_matches_a_loop_over_seeds(monkeypatch):
    """As decompose_seeds runs it: parameters stacked over seeds, torch.func.grad inside vmap with
    randomness="different" (each seed draws its own inputs)."""
    monkeypatch.setattr(cif, "CHUNK_ELEMENTS", 20)
    S, C, H, N = 3, 4, 3, 7
    stacked = [torch.stack(ps) for ps in zip(*(_params(C, H, seed=s) for s in range(S)))]

    def loss(params, fn):
        v = torch.randn(N, C, dtype=torch.float64) * 2
        return fn(v, *params).sin().sum(), v

    def run(fn):
        torch.manual_seed(5)
        return torch.func.vmap(lambda *p: torch.func.grad_and_value(lambda ps: loss(ps, fn), has_aux=True)(p),
                               randomness="different")(*stacked)  # fmt: skip

    (g_ours, (l_ours, v_ours)), (g_ref, (l_ref, v_ref)) = run(mlp_ci), run(_plain)
    torch.testing.assert_close(v_ours, v_ref, rtol=0, atol=0)  # the same draws, one per seed
    assert not torch.equal(v_ours[0], v_ours[1])
    torch.testing.assert_close(l_ours, l_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and each seed's slice is that seed's own gradient
    p0 = [p[0].clone().requires_grad_() for p in stacked]
    torch.testing.assert_close(torch.autograd.grad(mlp_ci(v_ours[0], *p0).sin().sum(), p0)[1], g_ours[1][0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hidden", [[], [4], [4, 3]])
@pytest.mark.parametrize("reads_inner", [False, True])
def test_vector_mlp_first_layer_as_one_matmul_matches_the_expanded_composition(hidden, reads_inner):
    """VectorMLPCI's first layer is a @ W reshaped to [d_in, C·h]: the values and gradients of the
    parallel layers applied to the input repeated for every subcomponent."""
    C, d = 5, 6
    fn = cif.VectorMLPCI(C, C if reads_inner else d, hidden, torch.Generator().manual_seed(3), reads_inner).double()
    inner = torch.randn(4, 3, C, 1, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, d, dtype=torch.float64, requires_grad=True)
    out = fn(inner, a)
    src = inner[..., 0] if reads_inner else a
    ref = fn.layers(src.unsqueeze(-2).expand(*src.shape[:-1], C, src.shape[-1]))[..., 0]  # the old, materialised way
    assert out.shape == (4, 3, C)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [inner if reads_inner else a, *fn.parameters()]
    for x, y in zip(torch.autograd.grad(out.sin().sum(), params), torch.autograd.grad(ref.sin().sum(), params)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_mlp_ci_second_derivatives_match_the_composition(monkeypatch):
    """create_graph=True backward passes (Adahessian) differentiate mlp_ci's backward: the same
    Hessian-vector products as the plain composition's."""
    monkeypatch.setattr(cif, "CHUNK_ELEMENTS", 16)
    C, H = 3, 2
    v = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(C, H, seed=4)]
    hvps = []
    for fn in (mlp_ci, _plain):
        grads = torch.autograd.grad(fn(v, *params).pow(3).sum(), [v, *params], create_graph=True)
        hvps.append(torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in grads), [v, *params]))
    for a, b in zip(*hvps):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
