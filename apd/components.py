"""Factored parameter components that replace a target's layers (SPEC §1.1, §5.1).

A decomposed matrix W [d_out, d_in] (``nn.Linear`` layout) becomes C components P_c = B_c A_c with
A [C, m, d_in] and B [C, d_out, m]; m = 1 gives SPD's rank-one subcomponents U_c V_cᵀ (B = U,
A = Vᵀ). The forward pass never materialises per-sample weights: it computes the inner activations
A_c x, scales them by the mask and maps them out through B_c.

Layer kinds (each a subclass): ``LinearComponents`` replaces an ``nn.Linear`` and, with its weight
transposed on the way in, a transposed-layout linear such as Hugging Face's ``Conv1D``
(y = x @ W + b, W [d_in, d_out]); ``EmbeddingComponents`` replaces an ``nn.Embedding`` (d_in = the
vocabulary: its inner activations are looked up by index, no one-hot product);
``TransposedComponents`` is the second use of a tied matrix.

Masks are inputs, not state. Each layer has non-persistent ``None`` buffers that a caller fills for
one call with ``torch.func.functional_call`` (see ``ComponentModel``). A mask has shape
[*lead, C] where *lead are the leading dimensions of the layer's input ([B] for vectors, [B, T] for
sequences, the index shape for an embedding); a [B, C] mask on a sequence input applies to every
position of its sample.

- ``mask`` s:  y = Σ_c s_c B_c A_c x + bias                         (the decomposed model)
- ``delta`` t: y = W x + Σ_c t_c B_c A_c x + bias                     (the target, moved along components)
- neither:     y = W x + bias                                         (the target itself)
- ``weight_delta_mask`` w [*lead] with ``mask``: y = Σ_c s_c P_c x + w·(W − Σ_c P_c) x + bias (SPD's
  Δ-component: what the components miss, under its own mask)
- ``shift`` [*lead, d_out] is added to the output in every mode: the Jacobian of the network's
  output with respect to it is ∂f/∂h_l, from which the gradient attribution is contracted.
- ``replace`` [*lead, d_out]: the output is this tensor whatever the input (no bias added; shift
  still is). It cuts the graph at the layer: derivatives with respect to one layer's output then
  follow only the paths that pass through no other decomposed layer.
- ``inner`` [*lead, C, m]: the inner activations A_c x of this very input, computed earlier (SPD's
  step computes them once for the causal-importance functions); used in place of recomputing them.
  The caller vouches that they belong to the input the layer receives; only the shape is checked.
- ``target_wx`` [*lead, d_out]: W x (no bias) of this very input, computed earlier (the target pass's
  output of a layer without bias), used by ``weight_delta_mask`` in place of recomputing it.

``delta`` makes attributions exact one-liners: ∂f/∂t_c at t = 0 is Σ_l ⟨∂f/∂h_l, P_{c,l} a_l⟩
(the gradient attribution), and t = -e_c gives f(x; θ* - P_c) (the ablation attribution).
"""

import math
from abc import ABC, abstractmethod
from enum import Enum

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "ComponentInit",
    "Components",
    "LinearComponents",
    "EmbeddingComponents",
    "TransposedComponents",
    "TiedLinear",
]


class ComponentInit(str, Enum):
    """How A and B are drawn.

    ``norm_matched`` (APD): A ~ N(0, 1/d_in), B scaled so that Σ_c B_c A_c has ``init_scale``² times
    the mean square of W. ``kaiming`` (SPD, as goodfire-ai/spd draws V and U): A ~ N(0, 1/d_in),
    B ~ N(0, 1/C) (Kaiming normal, linear gain, with fan d_in for A and C for B), times ``init_scale``."""

    norm_matched = "norm_matched"
    kaiming = "kaiming"


class TiedLinear(nn.Module):
    """A linear layer whose weight is another ``nn.Linear``'s weight transposed, plus its own bias.

    Use it in a target model to declare a tied weight (the TMS decoder uses Wᵀ of the encoder):
    the shared matrix is then decomposed once and each component used at both places.
    """

    def __init__(self, source: nn.Linear, bias: bool = True):
        super().__init__()
        self._source = [source]  # a list, so the source is not registered (and counted) twice
        out_features = source.in_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def source(self) -> nn.Linear:
        return self._source[0]

    @property
    def weight(self) -> Float[Tensor, "d_in_src d_out_src"]:
        return self.source.weight.T

    def forward(self, x: Float[Tensor, "... d_out_src"]) -> Float[Tensor, "... d_in_src"]:
        return F.linear(x, self.source.weight.T, self.bias)


def _mask_for(s: Tensor, inner: Tensor, name: str) -> Tensor:
    """A mask [*lead, C] (or [B, C] on a sequence input) shaped to scale inner activations [*lead, C, m]."""
    lead = inner.shape[:-2]
    if s.dim() == 0 or s.shape[-1] != inner.shape[-2]:
        raise ValueError(
            f"{name} has shape {tuple(s.shape)} but the layer has C={inner.shape[-2]} components; "
            f"give a mask of shape [*lead, C] = {(*lead, inner.shape[-2])}"
        )
    if s.dim() == len(lead) + 1:
        return s.unsqueeze(-1)
    if s.dim() == 2 and len(lead) > 1:  # one row per sample, for every position of it
        if s.shape[0] not in (1, lead[0]):
            raise ValueError(f"{name} has batch size {s.shape[0]} but the layer input has {lead[0]}; give one mask row per sample")
        return s.reshape(s.shape[0], *([1] * (len(lead) - 1)), s.shape[1], 1)
    raise ValueError(
        f"{name} has shape {tuple(s.shape)}; the layer's inputs have leading dimensions {tuple(lead)}, so give "
        f"[*lead, C] = {(*lead, inner.shape[-2])} (or [B, C] for one mask per sequence)"
    )


def _scale_for(w: Tensor, y: Tensor) -> Tensor:
    """A per-position scale [*lead] shaped to multiply an output [*lead, d_out]."""
    return w.reshape(*w.shape, *([1] * (y.dim() - w.dim())))


class Components(nn.Module, ABC):
    """C factored components of one use of a decomposed matrix, with the frozen target weight."""

    mask: Tensor | None
    delta: Tensor | None
    weight_delta_mask: Tensor | None
    shift: Tensor | None
    replace: Tensor | None
    inner: Tensor | None
    target_wx: Tensor | None

    kind: str = "base"

    def __init__(self, bias: Tensor | None):
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        for name in ("mask", "delta", "weight_delta_mask", "shift", "replace", "inner", "target_wx"):
            self.register_buffer(name, None, persistent=False)

    @property
    @abstractmethod
    def C(self) -> int: ...

    @property
    @abstractmethod
    def m(self) -> int: ...

    @abstractmethod
    def component_acts(self, x: Tensor) -> Float[Tensor, "... C m"]:
        """Inner activations: the rank-m code of x in each component."""

    @abstractmethod
    def output_map(self) -> Float[Tensor, "Cm d_out"]:
        """The components' output maps stacked: ``combine(inner) = inner.flatten(-2) @ output_map()``."""

    def combine(self, inner: Float[Tensor, "... C m"]) -> Float[Tensor, "... d_out"]:
        """Σ_c of each component's output map applied to its (already masked) inner activations."""
        return inner.flatten(-2) @ self.output_map()

    @abstractmethod
    def per_component_out(self, inner: Float[Tensor, "... C m"]) -> Float[Tensor, "... C d_out"]:
        """P_c x for every component separately (used by the activation attribution)."""

    def per_component_sq_norm(self, inner: Float[Tensor, "... C m"]) -> Float[Tensor, "... C"]:
        """‖P_c x‖² for every component, from its inner activations z_c = A_c x without forming P_c x:
        z_cᵀ (B_cᵀ B_c) z_c. The same numbers as ``per_component_out(inner).pow(2).sum(-1)`` in memory
        [*lead, C] rather than [*lead, C, d_out] (a language model's tokens × C × 512 would not fit)."""
        C, m = inner.shape[-2], inner.shape[-1]
        maps = self.output_map().reshape(C, m, -1)  # (C, m, d_out)
        gram = maps @ maps.transpose(1, 2)  # (C, m, m)
        return torch.einsum("...cm,cmn,...cn->...c", inner, gram, inner)

    @abstractmethod
    def target_weight(self) -> Float[Tensor, "d_out d_in"]:
        """The frozen target matrix W of this use (h = W a + bias), in nn.Linear layout."""

    def target_forward(self, x: Tensor) -> Float[Tensor, "... d_out"]:
        """W x with the frozen target weight (no bias)."""
        return F.linear(x, self.target_weight())

    def lead_shape(self, x: Tensor) -> torch.Size:
        """The leading dimensions of an input: one mask row per such position."""
        return x.shape[:-1]

    def _inner_acts(self, x: Tensor) -> Float[Tensor, "... C m"]:
        """``component_acts(x)``, or the precomputed ``inner`` buffer when the caller set it."""
        if self.inner is None:
            return self.component_acts(x)
        want = (*self.lead_shape(x), self.C, self.m)
        if tuple(self.inner.shape) != want:
            raise ValueError(f"precomputed inner activations have shape {tuple(self.inner.shape)} but this layer's input "
                             f"needs [*lead, C, m] = {want}; pass the component_acts of the input the layer receives")  # fmt: skip
        return self.inner

    def forward(self, x: Tensor) -> Float[Tensor, "... d_out"]:
        if self.replace is not None:
            return self.replace if self.shift is None else self.replace + self.shift
        mask, delta = self.mask, self.delta
        if mask is None:
            y = self.target_forward(x)
            if delta is not None:
                inner = self._inner_acts(x)
                y = y + self.combine(inner * _mask_for(delta, inner, "delta"))
        else:
            inner = self._inner_acts(x)
            s = _mask_for(mask, inner, "mask")
            if self.weight_delta_mask is not None:  # Σ s_c P_c x + w (W x − Σ P_c x)
                w = self.weight_delta_mask
                y = self.combine(inner * (s - w.reshape(*w.shape, *([1] * (s.dim() - w.dim())))))
                wx = self.target_forward(x) if self.target_wx is None else self.target_wx
                y = y + _scale_for(w, y) * wx
            else:
                y = self.combine(inner * s)
            if delta is not None:
                y = y + self.combine(inner * _mask_for(delta, inner, "delta"))
        if self.shift is not None:
            y = y + self.shift
        return y if self.bias is None else y + self.bias


def _init_factors(
    C: int, m: int, d_in: int, d_out: int, w_rms: float, init: ComponentInit, init_scale: float,
    generator: torch.Generator | None, dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(A [C, m, d_in], B [C, d_out, m]) drawn on the CPU from ``generator`` (A first, then B)."""
    if init is ComponentInit.norm_matched:
        # A ~ N(0, 1/d_in), B ~ N(0, σ_B²): an entry of Σ_c B_c A_c has variance C·m·σ_B²/d_in;
        # σ_B makes it init_scale² times the mean square of W.
        std_a = 1.0 / math.sqrt(d_in)
        std_b = init_scale * w_rms / (std_a * math.sqrt(C * m))
    else:
        std_a = init_scale / math.sqrt(d_in)
        std_b = init_scale / math.sqrt(C)
    a = torch.randn(C, m, d_in, generator=generator, dtype=dtype, device="cpu") * std_a
    b = torch.randn(C, d_out, m, generator=generator, dtype=dtype, device="cpu") * std_b
    return a, b


class LinearComponents(Components):
    """Replaces an ``nn.Linear`` (or a transposed-layout linear, given its weight in ``nn.Linear``
    layout): y = Σ_c s_c B_c (A_c x) + bias, with W and bias frozen buffers."""

    kind = "linear"

    def __init__(
        self,
        weight: Float[Tensor, "d_out d_in"],
        bias: Float[Tensor, " d_out"] | None,
        C: int,
        rank: int | None = None,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
        init: ComponentInit = ComponentInit.norm_matched,
    ):
        super().__init__(bias)
        d_out, d_in = weight.shape
        m = min(d_in, d_out) if rank is None else rank
        self.register_buffer("weight", weight.detach().clone())
        w_rms = weight.detach().pow(2).mean().sqrt().clamp_min(1e-8).item()
        a, b = _init_factors(C, m, d_in, d_out, w_rms, ComponentInit(init), init_scale, generator, weight.dtype)
        self.A = nn.Parameter(a.to(weight.device))
        self.B = nn.Parameter(b.to(weight.device))

    @property
    def C(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.A.shape[1]

    def component_weights(self) -> Float[Tensor, "C d_out d_in"]:
        return torch.einsum("com,cmi->coi", self.B, self.A)

    def summed_weight(self) -> Float[Tensor, "d_out d_in"]:
        """Σ_c B_c A_c as one [d_out, C·m] @ [C·m, d_in] product."""
        return self.B.permute(1, 0, 2).flatten(1) @ self.A.flatten(0, 1)

    def component_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C m"]:
        return (x @ self.A.flatten(0, 1).T).unflatten(-1, (self.C, self.m))

    def output_map(self) -> Float[Tensor, "Cm d_out"]:
        return self.B.transpose(1, 2).flatten(0, 1)

    def per_component_out(self, inner: Float[Tensor, "... C m"]) -> Float[Tensor, "... C d_out"]:
        return torch.einsum("...cm,com->...co", inner, self.B)

    def target_weight(self) -> Float[Tensor, "d_out d_in"]:
        return self.weight


class EmbeddingComponents(LinearComponents):
    """Replaces an ``nn.Embedding`` of a vocabulary of V tokens into d dimensions.

    The decomposed matrix is the embedding table transposed, W [d, V] (d_in = V, as if the input
    were one-hot); component c's inner activation on token i is A_c[:, i], looked up by index.
    """

    kind = "embedding"

    def lead_shape(self, x: Int[Tensor, "..."]) -> torch.Size:
        return x.shape

    def component_acts(self, x: Int[Tensor, "..."]) -> Float[Tensor, "... C m"]:
        return F.embedding(x, self.A.flatten(0, 1).T).unflatten(-1, (self.C, self.m))

    def target_forward(self, x: Int[Tensor, "..."]) -> Float[Tensor, "... d"]:
        return F.embedding(x, self.weight.T)


class TransposedComponents(Components):
    """The second use of a tied matrix: y = Σ_c s_c A_cᵀ (B_cᵀ x) + own bias, sharing A and B."""

    kind = "tied"

    def __init__(self, source: LinearComponents, bias: Float[Tensor, " d"] | None):
        super().__init__(bias)
        self._source = [source]  # not a submodule: its parameters belong to the source's name

    @property
    def source(self) -> LinearComponents:
        return self._source[0]

    @property
    def C(self) -> int:
        return self.source.C

    @property
    def m(self) -> int:
        return self.source.m

    def component_acts(self, x: Float[Tensor, "... d_out_src"]) -> Float[Tensor, "... C m"]:
        src = self.source
        return (x @ src.B.transpose(1, 2).flatten(0, 1).T).unflatten(-1, (src.C, src.m))

    def output_map(self) -> Float[Tensor, "Cm d_in_src"]:
        return self.source.A.flatten(0, 1)

    def per_component_out(self, inner: Float[Tensor, "... C m"]) -> Float[Tensor, "... C d_in_src"]:
        return torch.einsum("...cm,cmi->...ci", inner, self.source.A)

    def target_weight(self) -> Float[Tensor, "d_in_src d_out_src"]:
        return self.source.weight.T
