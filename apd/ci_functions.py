"""Causal-importance functions g_{l,c}(x) of SPD (SPEC §5.2), all C subcomponents of a layer at once.

Each maps what a layer sees to one pre-activation per subcomponent, [*lead, C]; SPD squashes it
with a leaky hard sigmoid into [0, 1] (``apd.sigmoids``). Every function takes the layer's inner
activations v = V_cᵀ a ([*lead, C, 1], rank-one subcomponents) and its input a ([*lead, d_in]):

- ``MLPCI`` (``ci_fn=mlp``, the paper's): per subcomponent a tiny MLP on its own scalar v_c (1 →
  hidden → … → 1, GELU), computed for every c in one broadcast operation; with one hidden layer
  on large inputs, by ``mlp_ci`` (one autograd node, computed in cache-sized chunks of rows).
- ``VectorMLPCI`` (``vector_mlp``): per subcomponent an MLP on the whole input vector a.
- ``SharedMLPCI`` (``shared_mlp``): one MLP per layer from a to C outputs (cheap; for language models).

An embedding's input is a token index, so the vector functions read its inner activations
v ∈ R^C (the token's row of every subcomponent) as its input vector instead. Weights are drawn as
goodfire-ai/spd draws them (Kaiming normal: ReLU gain into a hidden layer, linear gain into the
output), biases start at 0, from a given generator.
"""

import math
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["CIFn", "MLPCI", "VectorMLPCI", "SharedMLPCI", "make_ci_fn", "mlp_ci"]


class CIFn(str, Enum):
    """Which causal-importance function (module docstring)."""

    mlp = "mlp"
    vector_mlp = "vector_mlp"
    shared_mlp = "shared_mlp"
    global_mlp = "global_mlp"  # one network over every layer's input (apd.global_ci.GlobalMLPCI, built by SPD)


def _normal(shape: tuple[int, ...], fan_in: int, gain: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=generator) * (gain / math.sqrt(fan_in)))


class _ParallelLinear(nn.Module):
    """C independent linear maps d_in → d_out, one per subcomponent: [..., C, d_in] → [..., C, d_out]."""

    def __init__(self, C: int, d_in: int, d_out: int, gain: float, generator: torch.Generator):
        super().__init__()
        self.W = _normal((C, d_in, d_out), d_in, gain, generator)
        self.b = nn.Parameter(torch.zeros(C, d_out))

    def forward(self, x: Float[Tensor, "... C d_in"]) -> Float[Tensor, "... C d_out"]:
        if self.W.shape[1] == 1:  # a scalar per subcomponent: a broadcast product, no batched matmul
            return x * self.W[:, 0] + self.b
        if self.W.shape[2] == 1:
            return (x * self.W[..., 0]).sum(-1, keepdim=True) + self.b
        return torch.einsum("...ci,cio->...co", x, self.W) + self.b


class _Layers(nn.Module):
    """Linear maps through ``dims`` with GELU between: C parallel ones (``parallel``), or one shared."""

    def __init__(self, dims: list[int], parallel: bool, C: int, generator: torch.Generator):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            gain = 1.0 if last else math.sqrt(2.0)
            if not parallel:
                lin = nn.Linear(d_in, d_out)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(d_out, d_in, generator=generator) * (gain / math.sqrt(d_in)))
                    lin.bias.zero_()
                layers.append(lin)
            else:
                layers.append(_ParallelLinear(C, d_in, d_out, gain, generator))
            if not last:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


CHUNK_ELEMENTS = 1 << 17
"""``mlp_ci`` works through its rows in chunks of about this many hidden activations (512 KiB at
float32: every intermediate of a chunk stays in a core's L2 cache; 1 MiB on this machine's AMD EPYC)"""


FUSED_MIN_C = 64
"""MLPCI takes ``mlp_ci`` from this many subcomponents on (its [n, 1, C] broadcasts run along rows of
C; at C 20, TMS 5-2's, the plain composition was as fast or faster on a quiet core)"""


def _chunk_rows(C: int, H: int) -> int:
    return max(1, CHUNK_ELEMENTS // (C * H))


class _MLPCI(torch.autograd.Function):
    """out[..., c] = Σ_h w2[c, h]·gelu(v[..., c]·w1[c, h] + b1[c, h]) + b2[c] in one autograd node.

    The hidden activations are laid out [rows, H, C] (every reduction over h or over rows then runs
    along whole contiguous rows of C) and made chunk by chunk of rows, so that the ~10 elementwise
    passes over them read and write a core's cache instead of memory; nothing of size [rows, C, H] is
    kept for the backward, which recomputes each chunk's pre-activations (one multiply-add and one
    GELU) and makes every gradient from them in the same chunk."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:  # type: ignore[override]
        C = v.shape[-1]
        rows = v.reshape(-1, C)
        w1t, b1t, w2t = w1.t().contiguous(), b1.t().contiguous(), w2.t().contiguous()
        step = _chunk_rows(C, w1.shape[-1])
        outs = [(F.gelu(torch.addcmul(b1t, rows[s : s + step].unsqueeze(-2), w1t)) * w2t).sum(-2)
                for s in range(0, rows.shape[0], step)]  # fmt: skip
        return (torch.cat(outs) + b2).reshape(v.shape)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[:4])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        v, w1, b1, w2 = ctx.saved_tensors
        C = v.shape[-1]
        rows, grows = v.reshape(-1, C), grad.reshape(-1, C)
        w1t, b1t, w2t = w1.t().contiguous(), b1.t().contiguous(), w2.t().contiguous()
        step = _chunk_rows(C, w1.shape[-1])
        g_v, g_w1, g_b1, g_w2 = [], 0, 0, 0
        for s in range(0, rows.shape[0], step):
            vc, gc = rows[s : s + step].unsqueeze(-2), grows[s : s + step].unsqueeze(-2)  # [n, 1, C]
            h = torch.addcmul(b1t, vc, w1t)  # [n, H, C]
            g_w2 = g_w2 + (F.gelu(h) * gc).sum(0)
            gh = torch.ops.aten.gelu_backward(gc * w2t, h)  # the gradient at h
            g_v.append((gh * w1t).sum(-2))
            g_b1 = g_b1 + gh.sum(0)
            g_w1 = g_w1 + (gh * vc).sum(0)
        return torch.cat(g_v).reshape(v.shape), g_w1.t(), g_b1.t(), g_w2.t(), grows.sum(0)  # type: ignore[union-attr]


def mlp_ci(v: Float[Tensor, "... C"], w1: Float[Tensor, "C H"], b1: Float[Tensor, "C H"], w2: Float[Tensor, "C H"],
           b2: Float[Tensor, " C"]) -> Float[Tensor, "... C"]:  # fmt: skip
    """Per subcomponent c the MLP 1 → H → 1 with exact GELU, on its own scalar v[..., c]:
    Σ_h w2[c, h]·gelu(v[..., c]·w1[c, h] + b1[c, h]) + b2[c], with the value and gradients of that
    composition (to rounding) from one autograd node that runs under ``torch.func.vmap``."""
    return _MLPCI.apply(v, w1, b1, w2, b2)  # type: ignore[no-any-return]


class MLPCI(nn.Module):
    """Per subcomponent an MLP on its scalar inner activation v_c (``ci_fn=mlp``)."""

    def __init__(self, C: int, hidden: list[int], generator: torch.Generator):
        super().__init__()
        self.layers = _Layers([1, *hidden, 1], True, C, generator)

    def forward(self, inner: Float[Tensor, "... C 1"], layer_input: Tensor) -> Float[Tensor, "... C"]:
        net = self.layers.net
        # one hidden layer, C >= FUSED_MIN_C, at least two chunks of rows: mlp_ci (1.5-2x faster on the
        # 3-layer residual MLP's [1024, 200, 16]); on smaller inputs the plain composition's fewer ops
        # are as fast (under torch.compile the plain composition: inductor fuses it into fewer loops)
        C, H = net[0].W.shape[0], net[0].W.shape[-1]
        if (len(net) == 3 and C >= FUSED_MIN_C and inner[..., 0].numel() * H >= 2 * CHUNK_ELEMENTS
                and not torch.compiler.is_compiling()):  # fmt: skip
            return mlp_ci(inner[..., 0], net[0].W[:, 0], net[0].b, net[2].W[..., 0], net[2].b[:, 0])
        return self.layers(inner)[..., 0]


class VectorMLPCI(nn.Module):
    """Per subcomponent an MLP on the layer's whole input vector (``ci_fn=vector_mlp``)."""

    def __init__(self, C: int, d_in: int, hidden: list[int], generator: torch.Generator, reads_inner: bool = False):
        super().__init__()
        self.C, self.reads_inner = C, reads_inner
        self.layers = _Layers([d_in, *hidden, 1], True, C, generator)

    def forward(self, inner: Float[Tensor, "... C 1"], layer_input: Tensor) -> Float[Tensor, "... C"]:
        a = inner[..., 0] if self.reads_inner else layer_input
        # the first layer reads the same vector for every c: one matmul a @ [d_in, C·h] instead of
        # a batched one over a materialised [..., C, d_in]
        first, *rest = self.layers.net
        C, d_in, d_out = first.W.shape
        x = (a @ first.W.permute(1, 0, 2).reshape(d_in, C * d_out)).view(*a.shape[:-1], C, d_out) + first.b
        for layer in rest:
            x = layer(x)
        return x[..., 0]


class SharedMLPCI(nn.Module):
    """One MLP per layer from its input vector to its C pre-activations (``ci_fn=shared_mlp``)."""

    def __init__(self, C: int, d_in: int, hidden: list[int], generator: torch.Generator, reads_inner: bool = False):
        super().__init__()
        self.reads_inner = reads_inner
        self.layers = _Layers([d_in, *hidden, C], False, C, generator)

    def forward(self, inner: Float[Tensor, "... C 1"], layer_input: Tensor) -> Float[Tensor, "... C"]:
        return self.layers(inner[..., 0] if self.reads_inner else layer_input)


def make_ci_fn(kind: CIFn, C: int, d_in: int, hidden: list[int], generator: torch.Generator, reads_inner: bool = False) -> nn.Module:
    """A causal-importance function for a layer with C subcomponents and inputs of width d_in
    (``reads_inner``: the layer's input is a token index; read the inner activations instead)."""
    kind = CIFn(kind)
    if kind is CIFn.global_mlp:
        raise ValueError("ci_fn=global_mlp is one network for all layers (apd.global_ci.GlobalMLPCI), not a per-layer function")
    if kind is CIFn.mlp:
        return MLPCI(C, hidden, generator)
    width = C if reads_inner else d_in
    if kind is CIFn.vector_mlp:
        return VectorMLPCI(C, width, hidden, generator, reads_inner)
    return SharedMLPCI(C, width, hidden, generator, reads_inner)

