"""Tiny token models for ``target=module`` runs in the browser's tests: a small ``TransformerLM`` and
a model of another architecture (embedding, one residual MLP, unembedding), both deterministic given
their seed, and a batch function of random token windows."""

import torch
from torch import Tensor, nn

from apd.toy_models.lm import LMConfig, TransformerLM

VOCAB, SEQ_LEN = 11, 12


def tiny_lm(seed: int = 0) -> TransformerLM:
    """A one-layer transformer: vocabulary 11, d_model 16, 32 MLP neurons (weights as initialised)."""
    return TransformerLM(LMConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=16, n_heads=2, d_mlp=32, init_seed=seed)).eval()


class EmbedMLP(nn.Module):
    """x = embed(tokens); x = x + fc_out(relu(fc_in(x))); logits = unembed(x)."""

    def __init__(self, vocab: int, d_model: int, d_hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.fc_in = nn.Linear(d_model, d_hidden)
        self.fc_out = nn.Linear(d_hidden, d_model)
        self.unembed = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        x = x + self.fc_out(torch.relu(self.fc_in(x)))
        return self.unembed(x)


def embed_mlp(seed: int = 0) -> EmbedMLP:
    torch.manual_seed(seed)
    return EmbedMLP(VOCAB, 8, 24).eval()


def tokens(batch_size: int, generator: torch.Generator | None) -> Tensor:
    """``[batch_size, 12]`` uniformly random token ids."""
    return torch.randint(0, VOCAB, (batch_size, SEQ_LEN), generator=generator)
