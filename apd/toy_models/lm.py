"""A one-layer transformer language model, the Towards-Monosemanticity setting (SPEC §6).

Bricken et al.'s sizes: residual stream d_model = 128, one ReLU MLP of 512 neurons; here over the
characters of the shipped Shakespeare corpus (``apd.toy_models.lm_data``). Pre-LayerNorm, as in
GPT-2 and nanoGPT's ``model.py``::

    x = embed(tokens) + pos_embed(positions)
    x = x + attn(ln1(x))                          # "resid_mid"
    x = x + mlp(ln2(x))    mlp = down ∘ act ∘ up  # act: ReLU
    logits = unembed(ln_f(x))

Module names are the interface other code relies on: ``mlp.up`` and ``mlp.down`` are the matrices a
decomposition targets, ``mlp.act`` (an ``nn.ReLU``) holds the 512 neuron activations, ``attn.q``,
``attn.k``, ``attn.v``, ``attn.o`` are separate ``nn.Linear`` projections.

The MLP is reached without hooks (the forward has none, so ``torch.compile`` just works):
``mlp_io(tokens)`` returns the MLP's input, neuron activations and output (what SAEs and transcoders
train on), and ``forward(tokens, mlp_out=...)`` splices in a replacement MLP output: zeros for
zero-ablation, ``model.mlp.down(sae(acts))`` or ``transcoder(mlp_in)`` for "loss recovered".
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from apd.toy_models.lm_data import (
    CharTokenizer,
    CorpusError,
    Split,
    lm_batch,
    load_corpus,
    load_corpus_text,
    load_tokenizer,
    unigram_cross_entropy,
)

__all__ = [
    "LMConfig",
    "CausalSelfAttention",
    "MLP",
    "MLPActivations",
    "TransformerLM",
    "lm_loss",
    "evaluate_lm",
    "LMTrainResult",
    "train_lm",
    # the data side, re-exported so the whole target is one import away
    "CharTokenizer",
    "CorpusError",
    "Split",
    "lm_batch",
    "load_corpus",
    "load_corpus_text",
    "load_tokenizer",
    "unigram_cross_entropy",
]


@dataclass(kw_only=True)
class LMConfig:
    """Shape of the one-layer transformer.

    vocab_size: number of tokens (83 characters for the shipped corpus).
    seq_len: longest context; the learned positional embedding has this many rows.
    d_model: residual stream width. n_heads: attention heads (d_model / n_heads per head).
    d_mlp: MLP neurons. init_seed: seed of the weights' initialisation.
    """

    vocab_size: int = 83
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    init_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is split evenly over n_heads={self.n_heads}; choose d_model divisible by n_heads")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v``, ``o`` projections (with
    biases, or without: ``bias=False``, the 4-layer model's)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.o = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Float[Tensor, "B T d_model"]) -> Float[Tensor, "B T d_model"]:
        B, T, d = x.shape
        hs = d // self.n_heads
        q, k, v = (proj(x).view(B, T, self.n_heads, hs).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, nh, T, hs)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bfloat16 steps (apd.precision) on the CPU: the attention core in float32 on the projections'
            # bfloat16 outputs. torch's CPU attention is 2.6x slower forward and backward in bfloat16 than in
            # float32 (8 windows of 128 tokens, 4 heads of 32, one thread; either kernel), which cost the
            # 4-layer LM's all-layers bf16 step all that its matrix products gained (docs/guide/precision.md)
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """``down(act(up(x)))`` with ``act`` a ReLU module: 512 neurons between two ``nn.Linear``."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.act = nn.ReLU()
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.down(self.act(self.up(x)))


class MLPActivations(NamedTuple):
    """What flows through the MLP on a batch: its input (after ``ln2``), neurons, and output."""

    mlp_in: Float[Tensor, "B T d_model"]
    acts: Float[Tensor, "B T d_mlp"]
    mlp_out: Float[Tensor, "B T d_model"]


class TransformerLM(nn.Module):
    """One pre-LN transformer block between a token + learned positional embedding and an unembedding.

    ``forward(tokens)`` maps ``[B, T]`` int64 token ids (T ≤ seq_len) to ``[B, T, vocab]`` next-token
    logits; ``forward(tokens, mlp_out=r)`` uses ``r`` in place of the MLP's output.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.seq_len, c.d_model)
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c.d_model, c.n_heads)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c.d_model, c.d_mlp)
        self.ln_f = nn.LayerNorm(c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size)
        self._init_weights(torch.Generator().manual_seed(c.init_seed))

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        # nanoGPT/GPT-2: N(0, 0.02) weights, zero biases, and the two projections that write to the
        # residual stream (attn.o, mlp.down) scaled down by sqrt(2 · n_layers).
        for name, p in self.named_parameters():
            if name.startswith(("ln1.", "ln2.", "ln_f.")):
                continue  # LayerNorm keeps weight 1, bias 0
            if name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 / math.sqrt(2) if name in ("attn.o.weight", "mlp.down.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def _check(self, tokens: Tensor) -> None:
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [B, T] int64 tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"T={tokens.shape[1]} exceeds the model's seq_len={self.config.seq_len}; use shorter windows")

    def resid_mid(self, tokens: Int[Tensor, "B T"]) -> Float[Tensor, "B T d_model"]:
        """The residual stream after attention, before the MLP."""
        self._check(tokens)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(pos)
        return x + self.attn(self.ln1(x))

    def logits(self, resid: Float[Tensor, "B T d_model"]) -> Float[Tensor, "B T vocab"]:
        """Unembed a final residual stream."""
        return self.unembed(self.ln_f(resid))

    def forward(self, tokens: Int[Tensor, "B T"], mlp_out: Float[Tensor, "B T d_model"] | None = None) -> Float[Tensor, "B T vocab"]:
        x = self.resid_mid(tokens)
        if mlp_out is None:
            mlp_out = self.mlp(self.ln2(x))
        elif mlp_out.shape != x.shape:
            raise ValueError(f"mlp_out has shape {tuple(mlp_out.shape)}; it replaces the MLP's output, of shape {tuple(x.shape)}")
        return self.logits(x + mlp_out)

    def mlp_io(self, tokens: Int[Tensor, "B T"]) -> MLPActivations:
        """The MLP's input (``ln2`` of the residual stream), its ReLU neuron activations and its output.

        Splice a reconstruction back with ``forward(tokens, mlp_out=...)``: ``mlp.down(acts_hat)`` for
        an SAE on the neurons, ``transcoder(mlp_in)`` for a transcoder.
        """
        mlp_in = self.ln2(self.resid_mid(tokens))
        acts = self.mlp.act(self.mlp.up(mlp_in))
        return MLPActivations(mlp_in, acts, self.mlp.down(acts))


def lm_loss(logits: Float[Tensor, "B T vocab"], targets: Int[Tensor, "B T"]) -> Tensor:
    """Mean next-token cross-entropy in nats/token."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokens: Int[Tensor, "N"],
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 64,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Mean cross-entropy (nats/token) over non-overlapping windows of ``seq_len`` tokens + 1 target.

    All ``(N - 1) // seq_len`` windows of the stream, or ``max_windows`` of them evenly spaced: no
    randomness, so the number is reproducible. ``forward`` maps inputs to logits (default ``model``;
    pass e.g. ``lambda x: model(x, mlp_out=torch.zeros(...))`` for an ablated model).
    """
    n_windows = (tokens.shape[0] - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"a stream of {tokens.shape[0]} tokens holds no window of {seq_len} + 1 tokens")
    starts = torch.arange(n_windows) * seq_len
    if max_windows is not None and max_windows < n_windows:
        starts = starts[torch.linspace(0, n_windows - 1, max_windows).round().long()]
    fwd = forward if forward is not None else model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in starts.split(batch_size):
        w = tokens[chunk[:, None] + torch.arange(seq_len + 1)].to(device)  # (b, seq_len + 1)
        logits = fwd(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


class LMTrainResult(TypedDict):
    final_loss: float
    """mean training loss over the last ``log_every`` steps (nats/token)"""
    heldout_loss: float
    """on ``eval_windows`` evenly spaced held-out windows after the last step"""
    history: list[dict[str, float]]
    seconds: float


def train_lm(
    model: TransformerLM,
    train_tokens: Int[Tensor, "N"],
    heldout_tokens: Int[Tensor, "M"],
    steps: int = 6_000,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 200,
    final_lr_fraction: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 0,
    log_every: int = 250,
    eval_windows: int = 256,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> LMTrainResult:
    """Train in place on windows of ``model.config.seq_len`` tokens drawn from ``train_tokens``.

    AdamW (betas 0.9, 0.99; weight decay on matrices and embeddings only, not on biases or LayerNorm),
    linear warm-up over ``warmup_steps`` then cosine decay to ``final_lr_fraction · lr``, gradient
    norm clipped to ``grad_clip``. Every ``log_every`` steps (and after the last) it logs the mean
    training loss since the last log and the held-out loss on ``eval_windows`` evenly spaced windows,
    and calls ``callback`` with that record.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, steps={steps})")
    device = next(model.parameters()).device
    T = model.config.seq_len
    g = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))  # fmt: skip

    def lr_factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        progress = (t - warmup_steps) / max(1, steps - warmup_steps)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    running, n_running = 0.0, 0
    model.train()
    for step in range(steps):
        w = lm_batch(train_tokens, batch_size, T + 1, g, device)  # (B, T + 1)
        loss = lm_loss(model(w[:, :-1]), w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        running += loss.item()
        n_running += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "train_loss": running / n_running,
                      "heldout_loss": evaluate_lm(model, heldout_tokens, T, max_windows=eval_windows),
                      "lr": lr_now, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            history.append(record)
            running, n_running = 0.0, 0
            if callback is not None:
                callback(record)
    return LMTrainResult(final_loss=history[-1]["train_loss"], heldout_loss=history[-1]["heldout_loss"],
                         history=history, seconds=time.perf_counter() - start)  # fmt: skip
