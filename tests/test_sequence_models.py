"""Sequence models with token inputs: a 1-block transformer decomposed per position, embedding and
transposed-layout (GPT-2 ``Conv1D``) components, and modules whose weight the parent reads directly."""

import copy
import math

import pytest
import torch
from torch import nn

from apd import (
    APDConfig,
    ComponentModel,
    ModuleSelectionError,
    ablation_attributions,
    activation_attributions,
    decompose,
    decompose_seeds,
    gradient_attributions,
    gradient_attributions_loop,
    topk_mask,
)

V, D, T, HEADS, MLP = 11, 8, 5, 2, 12


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's GPT-2 ``Conv1D``: y = x @ W + b with W [d_in, d_out]."""

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.nf = d_out
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class Block(nn.Module):
    """Token embedding → causal attention with nn.Linear q/k/v/o → ReLU MLP (a Conv1D up-projection)
    → unembedding: [B, T] token ids to [B, T, V] logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up = Conv1D(MLP, D)
        self.act = nn.ReLU()
        self.down = nn.Linear(MLP, D)
        self.unembed = nn.Linear(D, V)

    def forward(self, tokens):
        B, S = tokens.shape
        h = self.embed(tokens) + self.pos[:S]
        q, k, v = (f(h).view(B, S, HEADS, D // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // HEADS)
        att = att.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(B, S, D))
        h = h + self.down(self.act(self.up(h)))
        return self.unembed(h)


MODULES = ["embed", "q", "k", "v", "o", "up", "down", "unembed"]


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def _tokens(B: int = 3, seed: int = 0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_layer_kinds_and_target_weights_in_linear_layout(block):
    cm = ComponentModel(block, MODULES, C=4, rank=2)
    assert cm.kinds == {"embed": "embedding", "q": "linear", "k": "linear", "v": "linear", "o": "linear",
                        "up": "transposed_linear", "down": "linear", "unembed": "linear"}  # fmt: skip
    W = cm.target_weights()
    torch.testing.assert_close(W["embed"], block.embed.weight.T)  # [d, vocab]: d_in is the vocabulary
    torch.testing.assert_close(W["up"], block.up.weight.T)  # [d_out, d_in], nn.Linear layout
    x = _tokens()
    torch.testing.assert_close(cm(x), block(x))  # no masks: the target itself


def test_components_summing_to_the_weights_reproduce_the_target_with_all_masks_one(block):
    """Full-rank components set to the weights' SVD (summing exactly to each weight, Embedding and
    Conv1D layout included) reproduce the target when every mask is 1, per position."""
    cm = ComponentModel(block, MODULES, C=3, rank=None)
    with torch.no_grad():
        for n in cm.matrix_names:
            layer = cm.layers[n]
            W = layer.target_weight()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            layer.A.zero_()
            layer.B.zero_()
            m = S.shape[0]
            layer.A[0, :m], layer.B[0, :, :m] = Vh, U * S  # component 0: all of W; 1, 2: zero
        for n, w in cm.summed_weights().items():
            torch.testing.assert_close(w, cm.layers[n].target_weight(), atol=1e-5, rtol=1e-5)
    x = _tokens(4)
    ones = torch.ones(4, T, 3)
    torch.testing.assert_close(cm(x, masks=ones), block(x), atol=1e-5, rtol=1e-5)
    per_module = {n: ones for n in cm.layer_names}
    torch.testing.assert_close(cm(x, masks=per_module), block(x), atol=1e-5, rtol=1e-5)
    # masks are per position: switching component 0 off at position 2 changes positions ≥ 2 only
    off = ones.clone()
    off[:, 2, 0] = 0
    out, ref = cm(x, masks=off), block(x)
    torch.testing.assert_close(out[:, :2], ref[:, :2], atol=1e-5, rtol=1e-5)
    assert (out[:, 2] - ref[:, 2]).abs().max() > 1e-2


def test_masks_per_module_and_shape_errors(block):
    cm = ComponentModel(block, ["up", "down"], C={"up": 3, "down": 5}, rank=1)
    assert cm.C_per_module() == {"up": 3, "down": 5}
    x = _tokens(2)
    zeroed = copy.deepcopy(block)
    with torch.no_grad():
        zeroed.up.weight.zero_()  # what a zero mask on every component of up leaves: its bias
        torch.testing.assert_close(cm(x, masks={"up": torch.zeros(2, T, 3)}), zeroed(x))  # down: its target weight
    with pytest.raises(ValueError, match="C=3 components"):
        cm(x, masks={"up": torch.zeros(2, T, 4)})
    with pytest.raises(ValueError, match="not decomposed"):
        cm(x, masks={"q": torch.zeros(2, T, 3)})
    with pytest.raises(ValueError, match="different numbers of components"):
        _ = cm.C


@pytest.mark.parametrize("mode", ["auto", "per_sample", "hidden", "jacfwd", "jacrev"])
def test_every_gradient_mode_equals_the_per_output_loop_per_position(block, mode):
    cm = ComponentModel(block, MODULES, C=4, rank=1, init_scale=0.5)
    x = _tokens(3, seed=1)  # int64 token ids
    expected = gradient_attributions_loop(cm, x)
    assert expected.shape == (3, T, 4)
    torch.testing.assert_close(gradient_attributions(cm, x, mode), expected, rtol=1e-4, atol=1e-7)


def test_per_position_attribution_is_the_gradient_of_that_positions_mask(block):
    """A[b, t, c] = Σ_o (∂f_o/∂s_{b,t,c})² at s = 1 around the target, checked by autograd on a
    per-position delta for one (b, t, c)."""
    cm = ComponentModel(block, ["up", "down"], C=3, rank=1, init_scale=0.5)
    x = _tokens(2, seed=2)
    attr = gradient_attributions(cm, x, "hidden")
    b, t, c = 1, 3, 2

    def f(scale):
        delta = torch.zeros(2, T, 3)
        delta[b, t, c] = scale
        return cm(x, delta=delta)[b].flatten()

    jac = torch.autograd.functional.jacobian(f, torch.tensor(0.0))
    assert attr[b, t, c].item() == pytest.approx(jac.pow(2).sum().item(), rel=1e-4)
    # position 0's components cannot affect earlier positions; later ones' cannot affect position 0
    assert attr[:, 0].gt(0).all()


def test_ablation_and_activation_attributions_per_position(block):
    cm = ComponentModel(block, ["up", "down"], C=3, rank=1, init_scale=0.5)
    x = _tokens(2, seed=3)
    abl = ablation_attributions(cm, x)
    b, t, c = 0, 2, 1
    delta = torch.zeros(2, T, 3)
    delta[b, t, c] = -1.0
    with torch.no_grad():
        expected = (cm(x) - cm(x, delta=delta))[b].pow(2).sum()
    assert abl.shape == (2, T, 3) and abl[b, t, c].item() == pytest.approx(expected.item(), rel=1e-5)
    act = activation_attributions(cm, x)
    with cm.capture(["up", "down"], inputs=True) as a_in, torch.no_grad():
        cm(x)
    P = cm.component_weights()
    P["up"] = P["up"].transpose(1, 2)  # component_weights() is in Conv1D's own layout [C, d_in, d_out]
    manual = sum((P[n][c] @ a_in[n][b, t]).pow(2).sum() for n in ("up", "down"))
    assert act[b, t, c].item() == pytest.approx(manual.item(), rel=1e-5)


def test_batch_topk_selects_over_every_position_of_the_batch():
    attr = torch.rand(4, 6, 5)
    mask = topk_mask(attr, 1.5, batch_topk=True)
    assert mask.shape == (4, 6, 5) and mask.sum() == math.floor(1.5 * 24)
    threshold = attr.flatten().topk(36).values.min()
    assert torch.equal(mask.bool(), attr >= threshold)
    per_position = topk_mask(attr, 2, batch_topk=False)
    assert torch.equal(per_position.sum(-1), torch.full((4, 6), 2.0))


@pytest.mark.parametrize("mode", ["per_sample", "hidden", "jacfwd", "jacrev"])
def test_apd_trains_on_token_batches_with_per_position_masks(block, mode):
    gen = torch.Generator().manual_seed(0)
    cfg = APDConfig(C=6, rank=1, topk=2.0, attribution="gradient", gradient_mode=mode, output_loss="kl",
                    act_recon_coeff=1.0, act_recon_modules=["act"], simplicity_coeff=0.1, lr=1e-2, steps=25, log_every=8)  # fmt: skip
    logged = []
    dec = decompose(block, lambda: torch.randint(0, V, (8, T), generator=gen), cfg, ["embed", "up", "down"], progress=False,
                    callback=lambda s, t: logged.append(t))  # fmt: skip
    assert logged[-1]["total"] < logged[0]["total"]
    assert logged[-1]["l0"] == pytest.approx(2.0, abs=0.01)  # 2 active components per *position*
    assert dec.component_weights()["embed"].shape == (6, D, V)
    assert dec.component_weights()["up"].shape == (6, D, MLP)  # the layout of Conv1D's own weight [d_in, d_out]


@pytest.mark.parametrize("attribution", ["ablation", "activation"])
def test_other_attributions_and_lp_train_on_token_batches(block, attribution):
    gen = torch.Generator().manual_seed(1)
    for extra in (dict(attribution=attribution), dict(attribution=attribution, topk=None, lp_sparsity_coeff=0.1)):
        cfg = APDConfig(C=4, rank=1, output_loss="kl", lr=1e-2, steps=6, log_every=5, **extra)
        dec = decompose(block, lambda: torch.randint(0, V, (4, T), generator=gen), cfg, ["up", "down"], progress=False)
        assert torch.isfinite(dec.A["up"]).all() and dec.history[-1]["total"] > 0


def test_seeds_at_once_on_token_batches(block):
    gen = torch.Generator().manual_seed(2)
    cfg = APDConfig(C=4, rank=1, topk=1.0, output_loss="kl", lr=1e-2, steps=5, log_every=4)
    decs = decompose_seeds(block, lambda: torch.randint(0, V, (4, T), generator=gen), cfg, ["embed", "down"], [0, 1],
                           progress=False)  # fmt: skip
    assert len(decs) == 2 and not torch.equal(decs[0].A["embed"], decs[1].A["embed"])


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.out = nn.Linear(D, V)
        self.unused = nn.Linear(D, D)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_a_weight_read_directly_by_its_parent_is_refused():
    with pytest.raises(ModuleSelectionError, match=r"'attn.out_proj' cannot be decomposed.*nn.Linear projections"):
        ComponentModel(WithMHA(), ["attn.out_proj", "out"], C=2)


def test_a_module_never_called_is_refused_at_the_first_batch():
    cfg = APDConfig(C=2, topk=1.0, steps=2)
    with pytest.raises(ModuleSelectionError, match=r"\['unused'\] are never called"):
        decompose(WithMHA(), [torch.randint(0, V, (2, T))], cfg, ["out", "unused"], progress=False)
