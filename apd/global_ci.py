"""A global causal-importance function (VPD, "Interpreting Language Model Parameters", 2026; ``SPDConfig.ci_fn=global_mlp``).

The per-layer CI functions of ``apd.ci_functions`` see one layer's input, so a layer's g cannot use
what another layer sees (an attention query's importance depends on the keys). VPD's global CI
function reads every decomposed layer use's input at once: each input RMS-normalised over its last
dimension (so a wide or large-valued layer does not drown the others), concatenated, then one MLP
(GELU between the ``ci_hidden`` widths) to every layer use's C pre-activations, split back per
layer use. It runs per position: all layer uses must share their leading dimensions (batch, or
batch and position). An embedding's input is a token index, so its inner activations (the token's
row of every subcomponent, width C) stand in for its input vector, as in the per-layer functions.
(VPD's own global function is a small bidirectional transformer over positions; this one is the
per-position MLP form.)
"""

import math
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["GlobalMLPCI", "rms_normalise"]


def rms_normalise(a: Float[Tensor, "... d"], eps: float = 1e-6) -> Float[Tensor, "... d"]:
    """a / sqrt(mean(a²) + ε) over the last dimension (no learned scale)."""
    return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)


class GlobalMLPCI(nn.Module):
    """One MLP from every layer use's RMS-normalised input (concatenated) to every layer use's C
    pre-activations. ``layers``: per layer use (in ``cm.layer_names`` order) its (C, input width,
    reads_inner): reads_inner for an embedding, whose width is then C."""

    def __init__(self, layers: Mapping[str, tuple[int, int, bool]], hidden: Sequence[int], generator: torch.Generator):
        super().__init__()
        if not layers:
            raise ValueError("a global CI function needs at least one layer")
        self.names = list(layers)
        self.Cs = [layers[n][0] for n in self.names]
        self.widths = [layers[n][1] for n in self.names]
        self.reads_inner = {n: layers[n][2] for n in self.names}
        dims = [sum(self.widths), *hidden, sum(self.Cs)]
        mods: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            lin = nn.Linear(d_in, d_out)
            with torch.no_grad():  # Kaiming normal as the per-layer functions: ReLU gain into a hidden layer
                lin.weight.copy_(torch.randn(d_out, d_in, generator=generator) * ((1.0 if last else math.sqrt(2.0)) / math.sqrt(d_in)))
                lin.bias.zero_()
            mods.append(lin)
            if not last:
                mods.append(nn.GELU())
        self.net = nn.Sequential(*mods)

    def forward(self, layer_inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Float[Tensor, "*lead C"]]:
        """Pre-activations per layer use from each layer use's input ([*lead, d_in]) and, for an
        embedding, its inner activations ([*lead, C, 1])."""
        parts, lead = [], None
        for n, width in zip(self.names, self.widths):
            a = inner[n][..., 0] if self.reads_inner[n] else layer_inputs[n]
            if a.shape[-1] != width:
                raise ValueError(f"the global CI function reads {width} features of {n!r}, got {tuple(a.shape)}")
            if lead is None:
                lead = a.shape[:-1]
            elif a.shape[:-1] != lead:
                raise ValueError(f"ci_fn=global_mlp reads every decomposed layer per position, but {n!r}'s input has leading "
                                 f"dimensions {tuple(a.shape[:-1])} where {self.names[0]!r}'s has {tuple(lead)}; decompose layers "
                                 "that see the same positions, or use a per-layer ci_fn (mlp, vector_mlp, shared_mlp)")  # fmt: skip
            parts.append(rms_normalise(a.to(self.net[0].weight.dtype)))
        out = self.net(torch.cat(parts, -1))
        return dict(zip(self.names, out.split(self.Cs, -1)))
