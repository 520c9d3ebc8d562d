import pytest
import torch
from torch import nn

from apd import ComponentModel, LinearComponents, ModuleSelectionError, TiedLinear
from apd.component_model import resolve_modules


def _layer(d_out=3, d_in=4, C=5, rank=None, bias=True):
    lin = nn.Linear(d_in, d_out, bias=bias)
    return lin, LinearComponents(lin.weight, lin.bias, C, rank, generator=torch.Generator().manual_seed(0))


def test_masked_forward_matches_explicit_per_sample_weights():
    lin, comp = _layer()
    x, s = torch.randn(6, 4), torch.rand(6, 5)
    comp.mask = s
    P = comp.component_weights()  # (C, d_out, d_in)
    expected = torch.stack([(s[b, :, None, None] * P).sum(0) @ x[b] for b in range(6)]) + lin.bias
    torch.testing.assert_close(comp(x), expected)


def test_target_and_delta_modes():
    lin, comp = _layer()
    x, t = torch.randn(6, 4), torch.randn(6, 5)
    torch.testing.assert_close(comp(x), lin(x))
    comp.delta = t
    P = comp.component_weights()
    moved = torch.stack([(lin.weight + (t[b, :, None, None] * P).sum(0)) @ x[b] for b in range(6)]) + lin.bias
    torch.testing.assert_close(comp(x), moved)


def test_rank_budget_and_summed_weight():
    _, comp = _layer(d_out=6, d_in=8, C=3, rank=1)
    assert comp.A.shape == (3, 1, 8) and comp.B.shape == (3, 6, 1)
    assert all(torch.linalg.matrix_rank(P) <= 1 for P in comp.component_weights())
    torch.testing.assert_close(comp.summed_weight(), comp.component_weights().sum(0))
    _, full = _layer(d_out=6, d_in=8, C=3)
    assert full.A.shape == (3, 6, 8)  # full rank m = min(d_in, d_out)


@pytest.mark.parametrize("rank", [1, 2, None])
def test_per_component_squared_norms_equal_the_norms_of_the_outputs(rank):
    _, comp = _layer(d_out=6, d_in=8, C=3, rank=rank)
    x = torch.randn(2, 5, 8)
    inner = comp.component_acts(x)
    P = comp.component_weights()  # (C, d_out, d_in)
    by_hand = torch.einsum("cod,btd->btco", P, x).pow(2).sum(-1)  # ‖P_c x‖² per position
    torch.testing.assert_close(comp.per_component_sq_norm(inner), by_hand)
    torch.testing.assert_close(comp.per_component_sq_norm(inner), comp.per_component_out(inner).pow(2).sum(-1))


def test_mask_broadcasts_over_sequence_dims():
    _, comp = _layer()
    x, s = torch.randn(2, 7, 4), torch.rand(2, 5)
    comp.mask = s
    out = comp(x)
    comp.mask = s[:1]
    torch.testing.assert_close(out[0], comp(x[:1])[0])


class Sequential2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_component_model_leaves_user_model_alone_and_all_ones_mask_equals_sum():
    model = Sequential2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = ComponentModel(model, ["fc*"], C=4)
    assert isinstance(model.fc1, nn.Linear) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for n, p in cm.model.named_parameters() if not n.endswith((".A", ".B")))
    x = torch.randn(5, 4)
    torch.testing.assert_close(cm(x), model(x))
    # components that sum exactly to W (component 0 = the SVD of W, the rest zero):
    # the all-ones masked model is then the target
    with torch.no_grad():
        for n in cm.matrix_names:
            layer = cm.layers[n]
            U, S, Vh = torch.linalg.svd(layer.weight, full_matrices=False)
            layer.A.zero_()
            layer.B.zero_()
            layer.A[0], layer.B[0] = Vh, U * S
    torch.testing.assert_close(cm(x, masks=torch.ones(5, 4)), model(x), atol=1e-5, rtol=1e-5)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 2, bias=False)
        self.dec = TiedLinear(self.enc)

    def forward(self, x):
        return torch.relu(self.dec(self.enc(x)))


def test_tied_linear_is_decomposed_once_and_used_twice():
    model = Tied()
    cm = ComponentModel(model, ["enc", "dec"], C=3)
    assert cm.matrix_names == ["enc"] and cm.tied_names == {"dec": "enc"}
    assert cm.n_weights() == 10
    assert len(list(cm.component_parameters())) == 2
    x, s = torch.rand(4, 5), torch.rand(4, 3)
    P = cm.layers["enc"].component_weights()
    expected = torch.stack(
        [torch.relu((s[b, :, None, None] * P).sum(0).T @ ((s[b, :, None, None] * P).sum(0) @ x[b]) + model.dec.bias) for b in range(4)]
    )
    torch.testing.assert_close(cm(x, masks=s), expected)


def test_declared_tie_between_plain_linears():
    model = nn.Sequential(nn.Linear(5, 2, bias=False), nn.Linear(2, 5))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight.T)
    cm = ComponentModel(model, ["0", "1"], C=3, tied={"1": "0"})
    assert cm.matrix_names == ["0"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(cm(x), model(x))
    with torch.no_grad():
        model[1].weight.add_(1.0)
    with pytest.raises(ModuleSelectionError, match="differ"):
        ComponentModel(model, ["0", "1"], C=3, tied={"1": "0"})


def test_tied_without_its_source_is_an_error():
    with pytest.raises(ModuleSelectionError, match="select that module too"):
        ComponentModel(Tied(), ["dec"], C=3)


def test_bad_patterns_name_the_pattern_and_candidates():
    with pytest.raises(ModuleSelectionError, match=r"'fc9'.*\['fc1', 'fc2'\]"):
        resolve_modules(Sequential2(), ["fc9"])
    with pytest.raises(ModuleSelectionError, match=r"'act'.*ReLU"):
        resolve_modules(Sequential2(), ["act"])
    assert resolve_modules(Sequential2(), ["fc2", "fc1", "*"]) == ["fc1", "fc2"]


def test_replace_mode_outputs_the_given_tensor_and_cuts_the_graph():
    lin, comp = _layer()
    x = torch.randn(6, 4, requires_grad=True)
    h = torch.randn(6, 3)
    comp.replace = h
    torch.testing.assert_close(comp(x), h)  # no bias added, the input ignored
    assert not comp(x).requires_grad
    comp.shift = torch.ones(6, 3)
    torch.testing.assert_close(comp(x), h + 1)
    comp.replace = comp.shift = None
    torch.testing.assert_close(comp.target_forward(x), x @ lin.weight.T)
