"""Causal-importance functions g_{l,c}(x) of SPD (SPEC §5.2), all C subcomponents of a layer at once.

Each maps what a layer sees to one pre-activation per subcomponent, [*lead, C]; SPD squashes it
with a leaky hard sigmoid into [0, 1] (``apd.sigmoids``). Every function takes the layer's inner
activations v = V_cᵀ a ([*lead, C, 1], rank-one subcomponents) and its input a ([*lead, d_in]):

- ``MLPCI`` (``ci_fn=mlp``, the paper's): per subcomponent a tiny MLP on its own scalar v_c (1 →
  hidden → … → 1, GELU), computed for every c in one broadcast operation.
- ``VectorMLPCI`` (``vector_mlp``): per subcomponent an MLP on the whole input vector a.
- ``SharedMLPCI`` (``shared_mlp``): one MLP per layer from a to C outputs (cheap; for language models).

An embedding's input is a token index, so the vector functions read its inner activations
v ∈ R^C (the token's row of every subcomponent) as its input vector instead. Weights are drawn as
goodfire-ai/spd draws them (Kaiming normal: ReLU gain into a hidden layer, linear gain into the
output), biases start at 0, from a given generator.
"""

import math
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["CIFn", "MLPCI", "VectorMLPCI", "SharedMLPCI", "make_ci_fn"]


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


class MLPCI(nn.Module):
    """Per subcomponent an MLP on its scalar inner activation v_c (``ci_fn=mlp``)."""

    def __init__(self, C: int, hidden: list[int], generator: torch.Generator):
        super().__init__()
        self.layers = _Layers([1, *hidden, 1], True, C, generator)

    def forward(self, inner: Float[Tensor, "... C 1"], layer_input: Tensor) -> Float[Tensor, "... C"]:
        return self.layers(inner)[..., 0]


class VectorMLPCI(nn.Module):
    """Per subcomponent an MLP on the layer's whole input vector (``ci_fn=vector_mlp``)."""

    def __init__(self, C: int, d_in: int, hidden: list[int], generator: torch.Generator, reads_inner: bool = False):
        super().__init__()
        self.C, self.reads_inner = C, reads_inner
        self.layers = _Layers([d_in, *hidden, 1], True, C, generator)

    def forward(self, inner: Float[Tensor, "... C 1"], layer_input: Tensor) -> Float[Tensor, "... C"]:
        a = inner[..., 0] if self.reads_inner else layer_input
        return self.layers(a.unsqueeze(-2).expand(*a.shape[:-1], self.C, a.shape[-1]))[..., 0]


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

