"""A multi-layer Llama-style character transformer: the model behind the ``lm_4l`` target.

Plain torch (no ``transformers``): pre-RMSNorm blocks, bias-free ``nn.Linear`` everywhere, separate
``q``/``k``/``v``/``o`` projections, a ReLU MLP ``down ∘ act ∘ up``, learned positions and an untied
unembedding, over the characters of the shipped Shakespeare corpus (``apd.toy_models.lm_data``)::

    x = embed(tokens) + pos_embed(positions)
    for block in layers:
        x = x + block.attn(block.attn_norm(x))
        x = x + block.mlp(block.mlp_norm(x))
    logits = unembed(norm_f(x))

Module names are the interface: ``layers.{i}.attn.{q,k,v,o}`` and ``layers.{i}.mlp.{up,down}`` are
the matrices a decomposition targets (6 per layer), ``layers.{i}.mlp.act`` holds the MLP neurons.
With no biases, zeroing a block's six matrices makes that block the identity (its attention and MLP
both write zero); ``forward(tokens, skip=...)`` skips blocks, the zero-ablation of a layer.

Why a ReLU MLP (two matrices) rather than SwiGLU (three): 24 matrices for four layers instead of 28
(the decomposition's cost grows with the number of matrices), neurons like the one-layer model's
(so SAE / transcoder baselines read the same kind of activations), and a file small enough to ship
in float32.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from apd.toy_models.lm import CausalSelfAttention

__all__ = ["MultiLMConfig", "Attention", "ReLUMLP", "Block", "MultiLayerLM", "BLOCK_MATRICES"]

BLOCK_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
"""The decomposable matrices of one block, relative to ``layers.{i}``."""


@dataclass(kw_only=True)
class MultiLMConfig:
    """Shape of the multi-layer transformer.

    vocab_size: tokens (83 characters for the shipped corpus). seq_len: longest context (rows of the
    learned positional embedding). n_layers: blocks. d_model: residual width. n_heads: attention
    heads (d_model / n_heads per head). d_mlp: MLP neurons per block. init_seed: seed of the init.
    """

    vocab_size: int = 83
    seq_len: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 256
    init_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is split evenly over n_heads={self.n_heads}; choose d_model divisible by n_heads")


class Attention(CausalSelfAttention):
    """Causal multi-head self-attention, bias-free ``q``, ``k``, ``v``, ``o`` projections."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__(d_model, n_heads, bias=False)


class ReLUMLP(nn.Module):
    """``down(act(up(x)))``, bias-free, ``act`` a ReLU module."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp, bias=False)
        self.act = nn.ReLU()
        self.down = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One pre-RMSNorm block: attention, then the MLP, each added to the residual stream."""

    def __init__(self, c: MultiLMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.attn = Attention(c.d_model, c.n_heads)
        self.mlp_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.mlp = ReLUMLP(c.d_model, c.d_mlp)

    def forward(self, x: Float[Tensor, "B T d_model"]) -> Float[Tensor, "B T d_model"]:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class MultiLayerLM(nn.Module):
    """``n_layers`` pre-RMSNorm blocks between token + learned positional embeddings and an untied unembedding.

    ``forward(tokens)`` maps ``[B, T]`` int64 token ids (T ≤ seq_len) to ``[B, T, vocab]`` next-token
    logits; ``forward(tokens, skip={i, ...})`` skips those blocks (equal to zeroing their matrices).
    """

    def __init__(self, config: MultiLMConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.seq_len, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm_f = nn.RMSNorm(c.d_model, eps=1e-6)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_weights(torch.Generator().manual_seed(c.init_seed))

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        # nanoGPT: N(0, 0.02), the projections writing to the residual stream scaled by 1/sqrt(2 n_layers)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if "norm" in name:
                continue  # RMSNorm keeps weight 1
            std = resid_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def matrix_names(self, layer: int | None = None) -> list[str]:
        """The decomposable matrices (``layers.{i}.attn.q`` ...), of one layer or of all in order."""
        layers = range(self.config.n_layers) if layer is None else [layer]
        return [f"layers.{i}.{m}" for i in layers for m in BLOCK_MATRICES]

    def forward(self, tokens: Int[Tensor, "B T"], skip: Collection[int] = ()) -> Float[Tensor, "B T vocab"]:
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [B, T] int64 tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"T={tokens.shape[1]} exceeds the model's seq_len={self.config.seq_len}; use shorter windows")
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(pos)
        for i, block in enumerate(self.layers):
            if i not in skip:
                x = block(x)
        return self.unembed(self.norm_f(x))
