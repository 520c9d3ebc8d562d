"""apd.baselines.layers on a tiny 2-layer model built here: each layer's MLP input / output read by
hooks, a transcoder holding a layer's own MLP recovers all of its loss (zeros none), and one
transcoder per layer trains and is scored with its curve."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apd.baselines import (
    SAETrainConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    capture_module_io,
    module_loss_recovered,
    replaced_outputs,
    train_layer_transcoders,
)

VOCAB, D, HIDDEN, T = 11, 8, 16, 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, unembedding: a 2-layer model with a named MLP per layer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.unembed = nn.Linear(D, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim > 1 else 0.3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


MODULES = ["blocks.0.mlp", "blocks.1.mlp"]


def draw(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, T + 1), generator=generator)


TEACHER = TinyLM().eval()
"""an untouched copy of the model: the loss is the distance of the model's next-token distribution
to the unmodified model's (random weights have no next-token task to score)"""


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    with torch.no_grad():
        target = TEACHER(batch[:, :-1]).softmax(dim=-1)
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1, VOCAB))


def mlp_transcoder(mlp: nn.Sequential) -> StandardSAE:
    """A ReLU transcoder whose encoder is the MLP's first layer and decoder its second: the MLP itself."""
    up, down = mlp[0], mlp[2]
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=HIDDEN, d_out=D, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(up.weight.T)
        sae.b_enc.copy_(up.bias)
        sae.W_dec.copy_(down.weight.T)
        sae.b_dec.copy_(down.bias)
    return sae


@pytest.fixture
def model() -> TinyLM:
    return TinyLM().eval()


def test_each_layers_mlp_input_and_output_are_read_by_name(model):
    batch = draw(torch.Generator().manual_seed(1))
    io = capture_module_io(model, MODULES, lambda m: loss_fn(m, batch))
    x = model.embed(batch[:, :-1])
    for i, name in enumerate(MODULES):
        block = model.blocks[i]
        mlp_in = block.ln(x)
        inputs, outputs = io[name]
        assert inputs.shape == (4 * T, D) and outputs.shape == (4 * T, D)
        torch.testing.assert_close(inputs, mlp_in.reshape(-1, D).detach())
        torch.testing.assert_close(outputs, block.mlp(mlp_in).reshape(-1, D).detach())
        x = block(x)
    assert all(not m._forward_hooks for m in model.modules())  # the hooks are gone afterwards


def test_the_exact_mlp_as_transcoder_recovers_the_whole_loss_and_zeros_none(model):
    batch = draw(torch.Generator().manual_seed(2))
    for i, name in enumerate(MODULES):
        sae = mlp_transcoder(model.blocks[i].mlp)
        exact = module_loss_recovered(model, batch, loss_fn, name, sae)
        assert exact["loss_ablated"] != pytest.approx(exact["loss_clean"], abs=1e-3)  # the layer matters
        assert exact["loss"] == pytest.approx(exact["loss_clean"], abs=1e-5)
        assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
        zero = module_loss_recovered(model, batch, loss_fn, name, lambda x: torch.zeros_like(x))
        assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    # replacing layer 1 leaves layer 0's input and output as they were
    with replaced_outputs(model, {"blocks.1.mlp": None}):
        io = capture_module_io(model, ["blocks.0.mlp"], lambda m: loss_fn(m, batch))
    torch.testing.assert_close(io["blocks.0.mlp"], capture_module_io(model, ["blocks.0.mlp"], lambda m: loss_fn(m, batch))["blocks.0.mlp"])


def test_bad_module_names_are_refused_with_the_names_there_are(model):
    batch = draw(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"not in the model.*blocks\.0"):
        capture_module_io(model, ["blocks.2.mlp"], lambda m: loss_fn(m, batch))
    with pytest.raises(ValueError, match="returns a ModuleList|not called"):
        capture_module_io(model, ["blocks"], lambda m: loss_fn(m, batch))


def test_one_transcoder_per_layer_trains_with_its_curve_and_is_scored(model):
    eval_batch = torch.randint(0, VOCAB, (16, T + 1), generator=torch.Generator().manual_seed(4))
    cfg = SAETrainConfig(steps=150, batch_size=96, lr=1e-2, init_sample_size=96, eval_every=10, converge_metric="loss_recovered")

    def make(name: str, d_in: int, d_out: int) -> TopKSAE:
        return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=32, k=4, d_out=d_out, apply_b_dec_to_input=False))

    layers = train_layer_transcoders(model, MODULES, make, draw, loss_fn, eval_batch, cfg)
    assert list(layers) == MODULES
    for name, layer in layers.items():
        s = layer.scores
        assert layer.sae.cfg.d_in == D and layer.sae.cfg.d_out == D and s["l0"] == pytest.approx(4)
        assert 0.5 < s["loss_recovered"] <= 1.0 + 1e-6 and 0 <= s["fvu"] < 0.5, (name, s)
        curve = layer.result.curve
        assert curve["step"].tolist() == list(range(10, 151, 10)) and layer.result.converged in (True, False)
        assert curve["loss_recovered"][-1] == pytest.approx(s["loss_recovered"])  # the curve's last point is the score
        assert curve["loss_recovered"][-1] > curve["loss_recovered"][0]
    with pytest.raises(ValueError, match="autoencoder"):
        train_layer_transcoders(model, MODULES[:1], lambda n, i, o: TopKSAE(TopKSAEConfig(d_in=i, d_sae=8, k=2)), draw, loss_fn,
                                eval_batch, cfg)  # fmt: skip
